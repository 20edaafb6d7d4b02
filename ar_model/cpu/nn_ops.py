"""The CPU's own forms of the model's layers, each faster there than the PyTorch op it replaces and
equal to it up to the order of fp32 sums: decode-time packed linears, dropout without ``bernoulli_``,
causal attention as matmuls for bf16 training, and a cross entropy that never makes fp32 logits.
Reached only through ``dispatch`` (with CPU tensors); the model files keep the plain formulation.
"""
from __future__ import annotations

import weakref

import torch

from . import kernels, train_ops

# ------------------------------------------------------------------------------- decode linears


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
# linear layer, dropped with the module or by ``release_packed`` (GPT.release_packed after sampling).
_PACKED: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()

# Rows taken by the packed path. Below MIN_ROWS, F.linear is as fast (bench/decode_linear.py); dtypes
# missing from MIN_ROWS have no packed kernel.
MAX_ROWS = 64
MIN_ROWS = {torch.float32: 4, torch.bfloat16: 2}
# Rows taken by groupgen's GEMM where it runs: from kernels.linear_min_rows(dtype) up to
# KERNEL_MAX_ROWS. fp32: MKL's packed GEMM is as fast at 32 rows and faster at 64 (decode_linear.py:
# 54 vs 55 ms, 114 vs 86 ms); bf16 handles at most 32 rows.
KERNEL_MAX_ROWS = 32


def linear_path(dtype: torch.dtype, rows: int) -> str | None:
    """How a decode linear of ``rows`` rows of ``dtype`` runs on this CPU: ``"kernel"`` (groupgen's
    GEMM: fp32 with AVX-512 for 4..32 rows; bf16 with AMX for 1..32 rows or, without AMX, with
    AVX-512F FMAs for 2..32 rows where ``kernels.bf16_fma_preferred``), ``"packed"`` (the library
    GEMM on a weight packed for that row count, up to ``MAX_ROWS``) or None (``F.linear``).

    ``F.linear`` on the CPU brings the weight into the GEMM's blocked layout on every call; at decode
    sizes that reorder is a large part of the cost. A GPT-B decode step's linears at 16 rows: fp32
    56 ms with ``F.linear``, 39 ms MKL packed, 30 ms with the kernel; bf16 32 ms, oneDNN packed
    20-24 ms, AMX kernel 12 ms; without AMX, oneDNN packed 25 ms, AVX-512F kernel 16 ms."""
    lo = kernels.linear_min_rows(dtype)
    if lo is not None and lo <= rows <= KERNEL_MAX_ROWS:
        return "kernel"
    if MIN_ROWS.get(dtype, MAX_ROWS + 1) <= rows <= MAX_ROWS:
        return "packed"
    return None


def decode_linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``module``'s linear on a weight packed once and reused until the weight or the path changes
    (inference, a few rows), or None where ``F.linear`` should run."""
    w, b = module.weight, module.bias
    if (x.dtype != w.dtype or torch.is_grad_enabled() or (b is not None and b.dtype != w.dtype)
            or (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != x.dtype)):
        return None
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    path = linear_path(w.dtype, rows)
    if path is None:
        return None
    # The library GEMMs pack for one row count (MKL's packed GEMM requires it; for oneDNN the layout
    # it picks, and so the rounding, depends on it): results depend only on the input, never on
    # earlier calls. The kernels' layouts do not depend on the row count.
    key = (w.data_ptr(), w._version, w.dtype, "kernel" if path == "kernel" else rows)
    hit = _PACKED.get(module)
    if hit is None or hit[0] != key:
        hit = (key, kernels.pack(w) if path == "kernel" else _pack_weight(w, rows))
        _PACKED[module] = hit
    packed = hit[1]
    if packed is None:
        return None
    x2 = x.reshape(rows, x.shape[-1])
    y = kernels.linear(x2, packed, b, w.shape[0]) if path == "kernel" else _packed_mm(x2, packed, w, b, rows)
    return y.view(*x.shape[:-1], w.shape[0])


def release_packed(module: torch.nn.Module) -> None:
    _PACKED.pop(module, None)


# -------------------------------------------------------------------------------------- dropout


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of a float CPU tensor, 0 < p < 1. CPU ``bernoulli_`` costs ~40 ns per
    element (more than a bf16 GPT-B layer's matmuls spend per element of activation). With the
    kernels the mask comes from a counter-based generator in one pass (``train_ops.dropout``; ~0.5 ms
    for a GPT-B activation against ~9 ms forward + backward below). Without them the keep mask is
    built from 64-bit draws of the global generator cut into four 15-bit uniforms with integer ops
    only (p is rounded to a multiple of 1/32768)."""
    y = train_ops.dropout(x, p)
    if y is not None:
        return y
    n = x.numel()
    r = torch.empty((n + 3) // 4, dtype=torch.int64).random_().view(torch.int16)[:n].view(x.shape)
    # (u - thr) >> 15 is -1 where u < thr, else 0: +1 gives the keep mask without bool tensors
    # (bool -> float conversions are not vectorised on the CPU).
    keep = r.bitwise_and_(0x7FFF).sub_(min(round(p * 32768), 32767)).bitwise_right_shift_(15).add_(1)
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


# ------------------------------------------------------------------------------------ attention


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


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor | None:
    """bf16 training: the matmul attention above (same math; no dropout, no GQA), else None."""
    if (q.dtype == torch.bfloat16 and k.dtype == v.dtype == q.dtype and torch.is_grad_enabled()
            and dropout_p == 0.0 and q.shape == k.shape == v.shape and q.shape[2] <= MATMUL_ATTENTION_MAX_T):
        return _MatmulCausalAttention.apply(q, k, v)
    return None


def decode_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, n: int) -> torch.Tensor | None:
    """One query over the cache prefix 0..n-1 on the kernel (fp32 inside, fp32 or bf16 cache), or
    None for SDPA (autograd on, or a case the kernel does not take)."""
    return None if torch.is_grad_enabled() else kernels.attention(q, kc, vc, n)


# -------------------------------------------------------------------------------- cross entropy
# F.cross_entropy(logits.float(), target) on the CPU walks the whole [N, V] matrix six times: the
# fp32 copy, log-softmax, NLL and, backward, a zero fill, the log-softmax gradient and the cast
# back. At GPT-B's shape (2048 rows x 16384 codes) that was ~6% of a bf16 training step. Here the
# rows go through in blocks that stay in cache: forward keeps only each row's log-sum-exp, backward
# rebuilds ``softmax - onehot`` block by block straight into the gradient, in the logits' dtype.
# With the kernels, fp32 and bf16 logits take csrc/cpu_train.cpp's cross entropy instead: one pass per
# row each way ([2048, 16384] bf16, forward + backward: 41 + 72 ms blocked, 13 + 35 ms kernel).

BLOCK_ELEMS = 1 << 18   # fp32 elements per block (1 MiB: an L2-sized working set)


class _KernelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        lse, nll = torch.ops.groupgen.cross_entropy_forward(logits, target)
        ctx.save_for_backward(logits, target, lse)
        return (nll.sum(dtype=torch.float64) / logits.shape[0]).float()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, target, lse = ctx.saved_tensors
        scale = float(grad_out.float()) / logits.shape[0]
        return torch.ops.groupgen.cross_entropy_backward(logits, target, lse, scale), None


class _BlockedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        N, V = logits.shape
        ctx.rows = rows = max(1, BLOCK_ELEMS // max(V, 1))
        lse = torch.empty(N, dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        for i in range(0, N, rows):
            blk, t = logits[i : i + rows], target[i : i + rows, None]
            picked = torch.log_softmax(blk, -1, dtype=torch.float32).gather(1, t).squeeze(1)
            lse[i : i + rows] = blk.gather(1, t).squeeze(1).float() - picked
            total -= picked.sum(dtype=torch.float64)
        ctx.save_for_backward(logits, target, lse)
        return (total / N).float()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, target, lse = ctx.saved_tensors
        N, rows = logits.shape[0], ctx.rows
        grad = torch.empty_like(logits)
        scale = grad_out.float() / N
        for i in range(0, N, rows):
            # a new fp32 tensor (promotion), so the saved logits are never written
            p = torch.sub(logits[i : i + rows], lse[i : i + rows, None]).exp_()   # softmax
            t = target[i : i + rows, None]
            p.scatter_add_(1, t, torch.full(t.shape, -1.0, dtype=p.dtype, device=p.device))
            grad[i : i + rows] = p.mul_(scale)
        return grad, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean CE of CPU logits [N, V] (N > 0) against long targets [N], fp32 arithmetic (sum in fp64)."""
    if logits.dtype in (torch.float32, torch.bfloat16) and kernels.kernels() is not None:
        return _KernelCrossEntropy.apply(logits.contiguous(), target.contiguous())
    return _BlockedCrossEntropy.apply(logits.contiguous(), target.contiguous())
