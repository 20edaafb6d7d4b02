"""Mean cross entropy over rows, in fp32 whatever the logits' dtype.

On the CPU the engine's form (``ar_model.cpu.nn_ops.cross_entropy``) never makes an fp32 copy of
(bf16) logits; elsewhere ``F.cross_entropy`` is already fused.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ar_model.cpu import dispatch


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean CE over rows of ``logits`` [N, V] (any float dtype) against ``target`` [N]; fp32 result
    and fp32 arithmetic (the sum in fp64) whatever the logits' dtype."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: expected logits [N, V] and target [N], got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    target = target.long()
    loss = dispatch.cross_entropy(logits, target)
    return loss if loss is not None else F.cross_entropy(logits.float(), target)
