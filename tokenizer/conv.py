"""Convolutions whose CPU weight gradients do not depend on the thread count.

Why: oneDNN computes a convolution's weight and bias gradients as a reduction over the batch and the
positions that it splits across the intra-op threads, so the last bits depend on the split (measured
on the Fashion-MNIST tokenizer's first backward: every conv weight/bias gradient differs by up to
6e-6 between 1 and 2 threads, while the forward, the data gradients and every other parameter
gradient are bit-equal). The nearest-code choice of the quantizer amplifies such a rounding into
another training trajectory (BENCHMARKS.md, main job, session 10: FID 9.7 vs 21.2). Here the data
gradient keeps every thread and the weight/bias gradients run on one thread, a fixed split for any
configured (or granted) thread count; it costs ~18% of a CPU tokenizer step (BENCHMARKS.md, issue 24).
GPUs and no-grad calls take the library path unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _ConvFixedSplit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, stride, padding, dilation, groups):
        # under autocast the conv runs in the autocast dtype, as nn.Conv2d's would: cast here, once, and
        # save the cast copies (what autocast's own graph saves); gradients go back in the inputs' dtypes
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        xc, wc, bc = x.to(dt), w.to(dt), (b.to(dt) if b is not None else None)
        ctx.save_for_backward(xc, wc)
        ctx.conf = (stride, padding, dilation, groups, b is not None)
        ctx.dtypes = (x.dtype, w.dtype, b.dtype if b is not None else None)
        fn = F.conv1d if x.dim() == 3 else F.conv2d
        with torch.autocast(dev, enabled=False):
            return fn(xc, wc, bc, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        stride, padding, dilation, groups, has_b = ctx.conf
        gy = gy.to(x.dtype)
        zeros = [0] * (x.dim() - 2)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(gy, x, w, None, stride, padding, dilation, False, zeros,
                                                     groups, [True, False, False])[0].to(ctx.dtypes[0])
        need_w, need_b = ctx.needs_input_grad[1], has_b and ctx.needs_input_grad[2]
        if need_w or need_b:
            n = torch.get_num_threads()
            torch.set_num_threads(1)   # one thread: the reduction's split no longer follows the thread count
            try:
                _, gw, gb = torch.ops.aten.convolution_backward(
                    gy, x, w, [w.shape[0]] if has_b else None, stride, padding, dilation, False, zeros, groups,
                    [False, need_w, need_b])
            finally:
                torch.set_num_threads(n)
            gw = gw.to(ctx.dtypes[1]) if gw is not None else None
            gb = gb.to(ctx.dtypes[2]) if gb is not None else None
        return gx, gw, gb, None, None, None, None


def _fixed_split(conv: nn.modules.conv._ConvNd, x: torch.Tensor, w: torch.Tensor, b) -> bool:
    return (x.device.type == "cpu" and torch.is_grad_enabled() and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple) and (w.requires_grad or (b is not None and b.requires_grad)))


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state dict) with thread-count-independent CPU weight gradients."""

    def _conv_forward(self, input, weight, bias):
        if _fixed_split(self, input, weight, bias):
            return _ConvFixedSplit.apply(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)


class Conv1d(nn.Conv1d):
    """``nn.Conv1d`` with thread-count-independent CPU weight gradients (see ``Conv2d``)."""

    def _conv_forward(self, input, weight, bias):
        if _fixed_split(self, input, weight, bias):
            return _ConvFixedSplit.apply(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)
