"""The one door from the model to the CPU engine.

Each function takes the operands of one plain PyTorch op and returns the CPU engine's result, or
None, and the caller (``ar_model.layers``, ``ar_model.loss``, ``sampling.logits``) runs its own
plain op. Tensors on any other device return None at the first check, before anything of the engine
is imported: a GPU run never imports, builds or calls the kernels (``tests/test_cpu_dispatch.py``
checks ``sys.modules``). On the CPU the engine picks per call: groupgen's kernels where built and
faster (``kernels``, ``train_ops``), else the CPU forms of ``nn_ops``, else None.
"""
from __future__ import annotations

import torch


def _cpu(x: torch.Tensor) -> bool:
    return x.device.type == "cpu"


def bf16_trains_faster(device: torch.device) -> bool:
    """Whether training in bf16 beats fp32 on ``device``: always on a GPU; on a CPU where it multiplies
    bf16 natively and faster than fp32 (``kernels.bf16_trains_faster``)."""
    if device.type != "cpu":
        return True
    from . import kernels
    return kernels.bf16_trains_faster()


def linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``F.linear(x, module.weight, module.bias)``: decode sizes on a packed weight (inference), or
    bf16 training with the faster weight-gradient GEMM."""
    if not _cpu(x):
        return None
    from . import nn_ops, train_ops
    y = nn_ops.decode_linear(module, x)
    return y if y is not None else train_ops.linear(x, module.weight, module.bias)


def release_packed(module: torch.nn.Module) -> None:
    """Free ``module``'s packed decode weight, if CPU decoding made one."""
    import sys
    nn_ops = sys.modules.get(__package__ + ".nn_ops")   # never made one if never imported
    if nn_ops is not None:
        nn_ops.release_packed(module)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor | None:
    if not _cpu(x):
        return None
    from . import kernels, train_ops
    y = kernels.rms_norm(x, w, eps)   # decode sizes: one pass
    return y if y is not None else train_ops.rms_norm(x, w, eps)   # training: one pass each way


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    if not _cpu(x):
        return None
    from . import kernels, train_ops
    y = kernels.rope(x, cos, sin)
    return y if y is not None else train_ops.rope(x, cos, sin)


def swiglu(h: torch.Tensor) -> torch.Tensor | None:
    if not _cpu(h):
        return None
    from . import kernels, train_ops
    y = kernels.swiglu(h)
    return y if y is not None else train_ops.swiglu(h)


def dropout(x: torch.Tensor, p: float) -> torch.Tensor | None:
    """Training-mode dropout (0 < p < 1) of a float tensor."""
    if not _cpu(x) or not x.is_floating_point():
        return None
    from . import nn_ops
    return nn_ops.dropout(x, p)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor | None:
    if not _cpu(q):
        return None
    from . import nn_ops
    return nn_ops.causal_attention(q, k, v, dropout_p)


def decode_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, n: int) -> torch.Tensor | None:
    """q [B, H, 1, D] over cache rows 0..n-1 (no mask), computed in fp32 over either cache dtype."""
    if not _cpu(kc):
        return None
    from . import nn_ops
    return nn_ops.decode_attention(q, kc, vc, n)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """Mean CE of logits [N, V] against long targets [N] in fp32, without an fp32 copy of the logits."""
    if not _cpu(logits) or logits.shape[0] == 0:
        return None
    from . import nn_ops
    return nn_ops.cross_entropy(logits, target)


def topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``k`` largest per row in ascending index order (the sampler's filter), or None."""
    if not _cpu(x):
        return None
    from . import kernels
    return kernels.topk(x, k)
