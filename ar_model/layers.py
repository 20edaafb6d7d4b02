"""Llama building blocks shared by the GPT trunk and the sub-token head.

Pre-norm RMSNorm (fp32 inside), fused-qkv attention with optional GQA and rotary embeddings
(interleaved pairs, as LlamaGen), SwiGLU with the gate and up projections fused in one matmul.
Two attention paths: ``forward`` over a whole causal sequence (``causal_attention``), and ``step``
that writes one token into a preallocated cache and attends to the filled prefix only (no mask;
on the CPU with ``cpu_kernels``'s kernel where it is built). Linear layers are ``Linear`` (an
``nn.Linear`` that packs its weight once for CPU decoding).
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ar_model import cpu_kernels, cpu_train_ops


def ffn_hidden(dim: int, ffn_mult: float, multiple_of: int) -> int:
    """LlamaGen's SwiGLU width: round_up(int(ffn_mult * int(8 * dim / 3)), multiple_of)."""
    h = int(ffn_mult * int(2 * 4 * dim / 3))
    return multiple_of * math.ceil(h / multiple_of)


# ---------------------------------------------------------------------------------------------
# Rotary tables. A table has one row per sequence index and head_dim/2 columns (one per pair).


def rope_angles_1d(n: int, head_dim: int, base: float) -> torch.Tensor:
    """Angles [n, head_dim/2] for positions 0..n-1 (built on the CPU even under a meta device)."""
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))
    return torch.outer(torch.arange(n, dtype=torch.float64, device="cpu"), freqs)


def rope_angles_2d(h: int, w: int, head_dim: int, base: float) -> torch.Tensor:
    """Angles [h*w, head_dim/2] in raster order: the first half of the pairs rotate with the row,
    the second half with the column (same frequencies in both halves, as LlamaGen)."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.float64, device="cpu")[: half // 2] / half))
    rows = torch.arange(h, dtype=torch.float64, device="cpu").repeat_interleave(w)   # raster: p -> (p // w, p % w)
    cols = torch.arange(w, dtype=torch.float64, device="cpu").repeat(h)
    return torch.cat([torch.outer(rows, freqs), torch.outer(cols, freqs)], dim=1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` [B, T, H, D] by tables ``cos``/``sin`` [T, D/2].

    Computed as one complex multiply in fp32 (result cast back to ``x``'s dtype): 2.5-3.5x faster
    forward+backward than the real-valued pair arithmetic, whose strided bf16 products are not
    vectorised on the CPU, and one rounding instead of three in bf16."""
    pairs = x.float().unflatten(-1, (-1, 2))
    if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(st % 2 for st in pairs.stride()[:-1]):
        pairs = pairs.contiguous()   # view_as_complex needs each pair adjacent and aligned
    rot = torch.view_as_complex(pairs) * torch.complex(cos.float(), sin.float())[:, None, :]
    return torch.view_as_real(rot).flatten(-2).to(x.dtype)


# ---------------------------------------------------------------------------------------------


def _pack_weight(w: torch.Tensor, rows: int):
    """``w`` reordered once into the CPU GEMM's own blocked layout (oneDNN for bf16, MKL's packed
    GEMM for fp32), or None where this PyTorch build has no such kernel."""
    try:
        if w.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available():
            return torch.ops.mkldnn._reorder_linear_weight(w, rows)
        if w.dtype == torch.float32 and torch.backends.mkl.is_available():
            return torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
    except (AttributeError, RuntimeError, NotImplementedError):
        pass
    return None


def _packed_mm(x: torch.Tensor, packed, w: torch.Tensor, b: torch.Tensor | None, rows: int) -> torch.Tensor:
    """x [rows, K] @ w^T (+ b) with ``packed = _pack_weight(w, rows)``."""
    if w.dtype == torch.bfloat16:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, b, "none", [], "")
    return torch.ops.mkl._mkl_linear(x.contiguous(), packed, w, b, rows)


# Packed weights live outside the modules (so deepcopy, .to() and state_dict never see them), one per
# Linear, dropped with the module or by Linear.release_packed() (GPT.release_packed after sampling).
_PACKED: "weakref.WeakKeyDictionary[Linear, tuple]" = weakref.WeakKeyDictionary()


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) with a faster CPU inference path.

    ``F.linear`` on the CPU brings the weight into the GEMM kernel's blocked layout on every call.
    At decode sizes (a few rows: batch x 2 for guidance) that reorder is a large part of the cost,
    since each call reads its whole weight anyway. Without autograd, for a few rows, this layer
    packs its weight once and reuses it until the weight or the path changes or
    ``release_packed()`` is called. Paths, by dtype and row count:
    - ``kernel``: groupgen's own GEMM (``cpu_kernels``, where built): fp32 with AVX-512 for 4..32
      rows, bf16 with AMX for 1..32 rows or, without AMX, with AVX-512F for 2..32 rows;
    - ``packed``: the library GEMM on a weight packed for that row count (MKL's packed sgemm for
      fp32, oneDNN for bf16), up to ``MAX_ROWS`` rows;
    - ``F.linear`` otherwise (training, GPUs, fewer than ``MIN_ROWS`` or more than ``MAX_ROWS``),
      except bf16 training on the CPU, whose weight gradient ``cpu_train_ops.linear`` computes from
      a contiguous copy (``F.linear``'s forward and input gradient, a faster weight-gradient GEMM).
    Results equal ``F.linear`` up to the order of the fp32 accumulation. A GPT-B decode step's
    linears at 16 rows: fp32 56 ms with ``F.linear``, 39 ms MKL packed, 30 ms with the kernel;
    bf16 32 ms, oneDNN packed 20-24 ms, AMX kernel 12 ms; on a CPU without AMX, oneDNN packed 25 ms,
    AVX-512F kernel 16 ms (``bench/decode_linear.py``).
    """

    # Rows taken by the packed path. Below MIN_ROWS, F.linear is as fast (decode_linear.py); dtypes
    # missing from MIN_ROWS have no packed kernel.
    MAX_ROWS = 64
    MIN_ROWS = {torch.float32: 4, torch.bfloat16: 2}
    # Rows taken by cpu_kernels's kernels where they run: from cpu_kernels.linear_min_rows(dtype) up
    # to KERNEL_MAX_ROWS. fp32: MKL's packed GEMM is as fast at 32 rows and faster at 64
    # (decode_linear.py: 54 vs 55 ms, 114 vs 86 ms); bf16 handles at most 32 rows.
    KERNEL_MAX_ROWS = 32

    @classmethod
    def path(cls, dtype: torch.dtype, rows: int) -> str | None:
        """``"kernel"``, ``"packed"`` or None (``F.linear``) for ``rows`` rows of ``dtype``."""
        lo = cpu_kernels.linear_min_rows(dtype)
        if lo is not None and lo <= rows <= cls.KERNEL_MAX_ROWS:
            return "kernel"
        if cls.MIN_ROWS.get(dtype, cls.MAX_ROWS + 1) <= rows <= cls.MAX_ROWS:
            return "packed"
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.device.type == "cpu" and x.dtype == w.dtype and not torch.is_grad_enabled()
                and (not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") == x.dtype)):
            rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
            path = self.path(w.dtype, rows)
            if path is not None:
                y = self._packed_linear(x.reshape(rows, x.shape[-1]), rows, path == "kernel")
                if y is not None:
                    return y.view(*x.shape[:-1], w.shape[0])
        y = cpu_train_ops.linear(x, w, self.bias)   # bf16 training on the CPU
        return y if y is not None else F.linear(x, w, self.bias)

    def _packed_linear(self, x: torch.Tensor, rows: int, kernel: bool) -> torch.Tensor | None:
        w, b = self.weight, self.bias
        if b is not None and b.dtype != w.dtype:
            return None
        # The library GEMMs pack for one row count (MKL's packed GEMM requires it; for oneDNN the
        # layout it picks, and so the rounding, depends on it): results depend only on the input,
        # never on earlier calls. The kernels' layouts do not depend on the row count.
        key = (w.data_ptr(), w._version, w.dtype, "kernel" if kernel else rows)
        hit = _PACKED.get(self)
        if hit is None or hit[0] != key:
            hit = (key, cpu_kernels.pack(w) if kernel else _pack_weight(w, rows))
            _PACKED[self] = hit
        packed = hit[1]
        if packed is None:
            return None
        if kernel:
            return cpu_kernels.linear(x, packed, b, w.shape[0])
        return _packed_mm(x, packed, w, b, rows)

    def release_packed(self) -> None:
        _PACKED.pop(self, None)


class Dropout(nn.Dropout):
    """nn.Dropout with faster CPU paths. CPU ``bernoulli_`` costs ~40 ns per element (more than
    a bf16 GPT-B layer's matmuls spend per element of activation). With groupgen's kernels the mask
    comes from a counter-based generator in one pass (``cpu_train_ops.dropout``; ~0.5 ms for a GPT-B
    activation against ~9 ms forward + backward for the fallback below). Without them the keep mask
    is built from 64-bit draws of the global generator cut into four 15-bit uniforms with integer ops
    only (p is rounded to a multiple of 1/32768). Other devices use F.dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p
        if not self.training or p <= 0.0 or x.device.type != "cpu" or p >= 1.0 or not x.is_floating_point():
            return F.dropout(x, p, self.training)
        y = cpu_train_ops.dropout(x, p)
        if y is not None:
            return y
        n = x.numel()
        r = torch.empty((n + 3) // 4, dtype=torch.int64).random_().view(torch.int16)[:n].view(x.shape)
        # (u - thr) >> 15 is -1 where u < thr, else 0: +1 gives the keep mask without bool tensors
        # (bool -> float conversions are not vectorised on the CPU).
        keep = r.bitwise_and_(0x7FFF).sub_(min(round(p * 32768), 32767)).bitwise_right_shift_(15).add_(1)
        return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = cpu_kernels.rms_norm(x, self.weight, self.eps)   # decode sizes on the CPU: one pass, same math
        if y is None:
            y = cpu_train_ops.rms_norm(x, self.weight, self.eps)   # CPU training: one pass each way
        if y is not None:
            return y
        # fp32 inside: bf16 mean-of-squares loses too much precision.
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


class _MatmulCausalAttention(torch.autograd.Function):
    """Causal softmax attention as batched matmuls with the probabilities kept for backward.

    On the CPU, SDPA's flash kernel takes ~6x longer backward than forward in bf16 (GPT-B layer,
    [8, 12, 256, 64]: 52 ms forward+backward); with the [B*H, T, T] probabilities saved (12 MiB
    at T = 256) the backward is four bf16 bmm and one softmax-gradient pass: 31 ms. Scores are
    rounded to the input dtype before the (fp32-internal) softmax, as in non-flash attention."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, H, T, D = q.shape
        q3, k3, v3 = (t.reshape(B * H, T, D) for t in (q, k, v))
        mask = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
        p = torch.softmax(torch.baddbmm(mask, q3, k3.transpose(1, 2), alpha=D ** -0.5), -1)
        ctx.save_for_backward(q3, k3, v3, p)
        return torch.bmm(p, v3).view(B, H, T, D)

    @staticmethod
    def backward(ctx, grad_o: torch.Tensor):
        q3, k3, v3, p = ctx.saved_tensors
        B_H, T, D = q3.shape
        g3 = grad_o.reshape(B_H, T, D)
        dv = torch.bmm(p.transpose(1, 2), g3)
        ds = torch._softmax_backward_data(torch.bmm(g3, v3.transpose(1, 2)), p, -1, p.dtype)
        dq = torch.bmm(ds, k3).mul_(D ** -0.5)
        dk = torch.bmm(ds.transpose(1, 2), q3).mul_(D ** -0.5)
        shape = grad_o.shape
        return dq.view(shape), dk.view(shape), dv.view(shape)


MATMUL_ATTENTION_MAX_T = 1024   # the saved probabilities grow as T^2


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                     **sdpa_kw) -> torch.Tensor:
    """Causal attention [B, H, T, D] -> [B, H, T, D]: SDPA, except bf16 training on the CPU
    (matmul attention above, which is faster there; same math, no dropout, no GQA)."""
    if (q.device.type == "cpu" and q.dtype == torch.bfloat16 and k.dtype == v.dtype == q.dtype
            and torch.is_grad_enabled() and dropout_p == 0.0 and q.shape == k.shape == v.shape
            and q.shape[2] <= MATMUL_ATTENTION_MAX_T):
        return _MatmulCausalAttention.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, **sdpa_kw)


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, n_kv_head: int, attn_dropout: float = 0.0):
        super().__init__()
        assert dim % n_head == 0 and n_head % n_kv_head == 0
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.head_dim = dim // n_head
        self.attn_dropout = attn_dropout
        self.wqkv = Linear(dim, (n_head + 2 * n_kv_head) * self.head_dim, bias=False)
        self.wo = Linear(n_head * self.head_dim, dim, bias=False)
        # SDPA's GQA flag only when needed (it may select a slower kernel).
        self._sdpa_kw = {"enable_gqa": True} if n_kv_head != n_head else {}

    def _qkv(self, x, cos, sin):
        H, Hk = self.n_head, self.n_kv_head
        qkv = self.wqkv(x).unflatten(-1, (H + 2 * Hk, self.head_dim))    # [B, T, heads, hd]
        qk, v = qkv[:, :, : H + Hk], qkv[:, :, H + Hk :]
        if cos is not None:   # q and k rotated in one pass (half the elementwise ops)
            rotated = cpu_kernels.rope(qk, cos, sin)   # decode sizes on the CPU: one kernel
            if rotated is None:
                rotated = cpu_train_ops.rope(qk, cos, sin)   # CPU training: one pass each way
            qk = rotated if rotated is not None else apply_rope(qk, cos, sin)
        q, k = qk.split([H, Hk], dim=2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = o.shape
        return self.wo(o.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))

    def forward(self, x, cos=None, sin=None):
        """Causal self-attention over the whole sequence ``x`` [B, T, dim]."""
        q, k, v = self._qkv(x, cos, sin)
        p = self.attn_dropout if self.training else 0.0
        o = causal_attention(q, k, v, p, **self._sdpa_kw)
        return self._out(o)

    def step(self, x, cos, sin, kc: torch.Tensor, vc: torch.Tensor, idx: int):
        """One token ``x`` [B, 1, dim] at sequence index ``idx``: write k/v into the caches
        ``kc``/``vc`` [B, n_kv_head, T_max, head_dim] and attend to indices 0..idx."""
        q, k, v = self._qkv(x, cos, sin)
        kc[:, :, idx : idx + 1] = k   # rounded to the cache dtype (a bf16 cache under fp32 compute)
        vc[:, :, idx : idx + 1] = v
        # The query is the newest token, so the filled prefix needs no mask.
        o = None
        if kc.device.type == "cpu" and not torch.is_grad_enabled():
            o = cpu_kernels.attention(q, kc, vc, idx + 1)   # fp32 inside, whatever the cache dtype
        if o is None:
            dt = torch.promote_types(q.dtype, kc.dtype)
            o = F.scaled_dot_product_attention(q.to(dt), kc[:, :, : idx + 1].to(dt), vc[:, :, : idx + 1].to(dt),
                                               **self._sdpa_kw)
        return self._out(o.to(q.dtype))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.w13 = Linear(dim, 2 * hidden, bias=False)   # [gate; up] in one matmul
        self.w2 = Linear(hidden, dim, bias=False)

    def forward(self, x):
        h = self.w13(x)
        gated = cpu_kernels.swiglu(h)   # decode sizes on the CPU: one pass, same math
        if gated is None:
            gated = cpu_train_ops.swiglu(h)   # CPU training: one pass each way
        if gated is None:
            a, b = h.split(self.hidden, -1)
            gated = F.silu(a) * b
        return self.w2(gated)


class Block(nn.Module):
    def __init__(self, dim: int, n_head: int, n_kv_head: int, hidden: int, norm_eps: float,
                 attn_dropout: float = 0.0, resid_dropout: float = 0.0, ffn_dropout: float = 0.0):
        super().__init__()
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.attention = Attention(dim, n_head, n_kv_head, attn_dropout)
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.feed_forward = FeedForward(dim, hidden)
        self.resid_dropout = Dropout(resid_dropout)
        self.ffn_dropout = Dropout(ffn_dropout)

    def forward(self, x, cos=None, sin=None):
        x = x + self.resid_dropout(self.attention(self.attention_norm(x), cos, sin))
        return x + self.ffn_dropout(self.feed_forward(self.ffn_norm(x)))

    def step(self, x, cos, sin, kc, vc, idx: int):
        x = x + self.resid_dropout(self.attention.step(self.attention_norm(x), cos, sin, kc, vc, idx))
        return x + self.ffn_dropout(self.feed_forward(self.ffn_norm(x)))


def init_weights(module: nn.Module, std: float) -> None:
    """N(0, std) for every linear and embedding weight (biases zero), as LlamaGen."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)
