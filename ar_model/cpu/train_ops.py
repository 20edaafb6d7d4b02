"""Autograd functions for the CPU training step on groupgen's kernels (``csrc/cpu_train.cpp``).

Each entry point returns None where it does not apply (no kernels, not the CPU, autograd off,
fewer than ``MIN_ROWS`` rows, unsupported dtypes), and the caller (``dispatch``, for ``layers``) keeps its PyTorch
ops. Results follow the PyTorch formulation in ``layers`` rounding for rounding, except where a
reduction's order differs (fp32 sums, ~1e-7 relative); bench/ar_vs_llamagen.py measures the step.
- ``linear``: bf16 ``F.linear`` whose weight gradient is a contiguous-source GEMM
  (``kernels.weight_grad``): oneDNN runs autograd's g^T @ x ~1.7x slower than the forward.
- ``rms_norm``: fp32 RMSNorm forward and backward in one pass each, its output already in bf16
  when autocast will cast it for the next matmul.
- ``rope``: the rotation forward (and backward: the inverse rotation) in one pass, bf16 in and out.
- ``swiglu``: silu(a) * b forward and backward, the backward writing d[a | b] in one tensor.
- ``dropout``: the keep mask from a counter-based generator (Philox4x32-10) seeded by one draw of
  the global generator; the backward pass regenerates the mask instead of saving it. Unlike the
  others it applies to inputs of any size, with or without autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels

MIN_ROWS = 256   # training-sized inputs only; decode and small inputs keep their own paths


def _applies(x: torch.Tensor, rows: int) -> bool:
    return (rows >= MIN_ROWS and x.device.type == "cpu" and torch.is_grad_enabled()
            and kernels.kernels() is not None)


def _autocast_bf16() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


# ---------------------------------------------------------------------------------------- linear


class _LinearBF16(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        dx = (g2 @ w).view(x.shape) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])
            dw = kernels.weight_grad(g2, x2) if kernels.weight_grad_supported(g2, x2) else g2.t() @ x2
        db = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor | None:
    """bf16 training (autocast to bf16, or bf16 input and weight as in DeepSpeed's bf16 mode): the
    operands cast as autocast would cast them, then ``_LinearBF16``."""
    if not _applies(x, x.numel() // max(x.shape[-1], 1)):
        return None
    if not (_autocast_bf16() or x.dtype == w.dtype == torch.bfloat16):
        return None
    x16, w16 = x.to(torch.bfloat16), w.to(torch.bfloat16)
    b16 = b.to(torch.bfloat16) if b is not None else None
    return _LinearBF16.apply(x16, w16, b16)


# ------------------------------------------------------------------------------------ pointwise


class _RMSNormFP32(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, eps: float, bf16_out: bool) -> torch.Tensor:
        y, rstd = torch.ops.groupgen.rms_norm_train(x, w, eps, bf16_out)
        ctx.save_for_backward(x, w, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w, rstd = ctx.saved_tensors
        dx, dw = torch.ops.groupgen.rms_norm_backward(dy.contiguous(), x, w, rstd)
        return dx, dw, None, None


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor | None:
    """``layers.RMSNorm`` for fp32 x and weight; under bf16 autocast the output is bf16 (the cast
    the next matmul would make), else fp32."""
    D = x.shape[-1] if x.dim() else 0
    if not D or x.dtype != torch.float32 or w.dtype != torch.float32 or not _applies(x, x.numel() // D):
        return None
    return _RMSNormFP32.apply(x.contiguous(), w.contiguous(), float(eps), _autocast_bf16())


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return torch.ops.groupgen.rope(x, cos, sin)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return torch.ops.groupgen.rope(g.contiguous(), cos, -sin), None, None   # the inverse rotation


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """``layers.apply_rope`` for x [B, T, H, D] (fp32 or bf16, heads dense in each row)."""
    if (x.dim() != 4 or x.shape[-1] % 2 or x.dtype not in (torch.float32, torch.bfloat16)
            or x.stride(-1) != 1 or x.stride(-2) != x.shape[-1] or not _applies(x, x.shape[0] * x.shape[1])):
        return None
    return _RoPE.apply(x, cos.float().contiguous(), sin.float().contiguous())


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h)
        return torch.ops.groupgen.swiglu(h)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (h,) = ctx.saved_tensors
        return torch.ops.groupgen.swiglu_backward(h, g.contiguous())


def swiglu(h: torch.Tensor) -> torch.Tensor | None:
    """``F.silu(a) * b`` for ``h = [a | b]`` [..., 2H] (fp32 or bf16)."""
    D = h.shape[-1] if h.dim() else 0
    if not D or D % 2 or h.dtype not in (torch.float32, torch.bfloat16) or not _applies(h, h.numel() // D):
        return None
    return _SwiGLU.apply(h.contiguous())


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        ctx.p, ctx.seed = p, seed
        return torch.ops.groupgen.dropout_apply(x, seed, p)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return torch.ops.groupgen.dropout_apply(g.contiguous(), ctx.seed, ctx.p), None, None   # the same mask


def dropout(x: torch.Tensor, p: float) -> torch.Tensor | None:
    """Training-mode dropout of fp32 or bf16 ``x`` on the CPU (p rounded to a multiple of 1/65536),
    reproducible under ``torch.manual_seed``: the seed is one draw of the global generator."""
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or not 0.0 < p < 1.0
            or kernels.kernels() is None):
        return None
    seed = int(torch.empty((), dtype=torch.int64).random_())
    return _Dropout.apply(x, float(p), seed)
