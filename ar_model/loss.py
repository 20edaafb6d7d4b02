"""Mean cross entropy of (possibly bf16) logits, computed in fp32 without an fp32 copy of them.

``F.cross_entropy(logits.float(), target)`` on the CPU walks the whole ``[N, V]`` matrix six
times: the fp32 copy, log-softmax, NLL and, backward, a zero fill, the log-softmax gradient and
the cast back. At LlamaGen GPT-B's shape (2048 rows x 16384 codes) that was ~6% of a bf16
training step. Here the rows go through in blocks that stay in cache: forward keeps only each
row's log-sum-exp, backward rebuilds ``softmax - onehot`` block by block straight into the
gradient, in the logits' dtype. Where groupgen's CPU kernels are built, fp32 and bf16 logits go
through ``cpu_train.cpp``'s cross entropy instead: one pass per row each way, same formulation
([2048, 16384] bf16, forward + backward: 41 + 72 ms blocked, 13 + 35 ms kernel; most of the
kernel's backward is page faults of the fresh 67 MB gradient). Other devices use
``F.cross_entropy`` (already fused there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ar_model import cpu_kernels

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
    """Mean CE over rows of ``logits`` [N, V] (any float dtype) against ``target`` [N]; fp32 result
    and fp32 arithmetic (the sum in fp64) whatever the logits' dtype."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: expected logits [N, V] and target [N], got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    target = target.long()
    if logits.device.type != "cpu" or logits.shape[0] == 0:
        return F.cross_entropy(logits.float(), target)
    if logits.dtype in (torch.float32, torch.bfloat16) and cpu_kernels.kernels() is not None:
        return _KernelCrossEntropy.apply(logits.contiguous(), target.contiguous())
    return _BlockedCrossEntropy.apply(logits.contiguous(), target.contiguous())
