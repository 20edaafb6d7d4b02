"""The CPU training kernels (``ar_model/cpu_train_ops.py``) against the PyTorch ops they replace,
on GPT-B's shapes (batch 8 x 256 tokens, width 768, SwiGLU 2048, 12 heads of 64, vocab 16384).

    python bench/train_kernels.py [--quick] [--json out.json]

- weight gradient of each GPT-B linear, bf16: autograd's ``g.t() @ x`` vs ``cpu_kernels.weight_grad``
  (the kernel's transpose, then a contiguous-source GEMM; training skips it for weights under
  ``cpu_kernels.WEIGHT_GRAD_MIN_NUMEL``, i.e. GPT-B's wo), and the transpose alone vs PyTorch's
  ``g.t().contiguous()``;
- RMSNorm (fp32 in, bf16 out as under autocast), RoPE (bf16 q and k) and SwiGLU (bf16) forward +
  backward: the PyTorch formulation in ``layers`` (what runs with the kernels off) vs the kernels.
Cases interleaved; milliseconds per call (median of ``--reps``); ratio = PyTorch / kernel.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import bench_parser, interleave, machine_info, median, parse_bench_args, spread, write_json

from ar_model.cpu import kernels as cpu_kernels, train_ops as cpu_train_ops
from ar_model.layers import RMSNorm, apply_rope

FULL = dict(tokens=2048, batch=8, dim=768, hidden=2048, heads=12, head_dim=64, vocab=16384)
QUICK = dict(tokens=256, batch=2, dim=64, hidden=128, heads=4, head_dim=16, vocab=512)


def _fwd_bwd(fn, *inputs):
    """fn(*inputs) forward + backward with a ones gradient (inputs require grad)."""
    def run():
        for t in inputs:
            t.grad = None
        y = fn(*inputs)
        y.backward(torch.ones_like(y))
    return run


def _with_kernels(on: bool, fn):
    """fn with the training kernels on (``cpu_train_ops``' own row threshold) or off."""
    def run():
        default = cpu_train_ops.MIN_ROWS
        cpu_train_ops.MIN_ROWS = default if on else 10 ** 9
        try:
            fn()
        finally:
            cpu_train_ops.MIN_ROWS = default
    return run


def main(argv=None) -> dict:
    a = parse_bench_args(bench_parser(__doc__, reps=7), argv)
    S = QUICK if a.quick else FULL
    reps = 2 if a.quick else a.reps
    R: dict = {"machine": machine_info(a.threads), "kernels": cpu_kernels.unavailable_reason() or "built",
               "settings": S, "cases": {}}
    if cpu_kernels.kernels() is None:
        print(f"kernels unavailable: {R['kernels']}")
        write_json(a.json, R)
        return R
    g = torch.Generator().manual_seed(0)
    T, D, Hd = S["tokens"], S["dim"], S["hidden"]
    cases: dict[str, dict] = {}
    qkv = (S["heads"] * 3) * S["head_dim"]
    for name, n, k in [("wqkv", qkv, D), ("wo", D, D), ("w13", 2 * Hd, D), ("w2", D, Hd), ("head", S["vocab"], D)]:
        gr = torch.randn(T, n, generator=g).bfloat16()
        x = torch.randn(T, k, generator=g).bfloat16()
        cases[f"weight grad {name} [{n}x{k}]"] = {
            "pytorch": lambda gr=gr, x=x: gr.t() @ x, "kernel": lambda gr=gr, x=x: cpu_kernels.weight_grad(gr, x)}
    gr = torch.randn(T, 2 * Hd, generator=g).bfloat16()
    cases[f"transpose [{T}x{2 * Hd}] bf16"] = {
        "pytorch": lambda: gr.t().contiguous(), "kernel": lambda: torch.ops.groupgen.transpose2d(gr)}

    norm = RMSNorm(D)
    xs = torch.randn(S["batch"], T // S["batch"], D, generator=g).requires_grad_()

    def rms():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return norm(xs)
    run = _fwd_bwd(lambda x: rms(), xs)
    cases["RMSNorm fwd+bwd (fp32 in, bf16 out)"] = {"pytorch": _with_kernels(False, run), "kernel": _with_kernels(True, run)}

    L, H, hd = T // S["batch"], 2 * S["heads"], S["head_dim"]
    ang = torch.rand(L, hd // 2, generator=g) * 6
    cos, sin = ang.cos(), ang.sin()
    qk = torch.randn(S["batch"], L, H, hd, generator=g).bfloat16().requires_grad_()
    cases[f"RoPE fwd+bwd q,k [{S['batch']}x{L}x{H}x{hd}] bf16"] = {
        "pytorch": _fwd_bwd(lambda t: apply_rope(t, cos, sin), qk),
        "kernel": _fwd_bwd(lambda t: cpu_train_ops.rope(t, cos, sin), qk)}

    h = torch.randn(S["batch"], L, 2 * Hd, generator=g).bfloat16().requires_grad_()
    cases[f"SwiGLU fwd+bwd [{T}x{2 * Hd}] bf16"] = {
        "pytorch": _fwd_bwd(lambda t: (lambda a, b: F.silu(a) * b)(*t.split(Hd, -1)), h),
        "kernel": _fwd_bwd(lambda t: cpu_train_ops.swiglu(t), h)}

    for name, fns in cases.items():
        t = interleave(fns, reps, warmup=1, log=None)
        row = {n: {"ms": 1e3 * median(v), "s": spread(v)} for n, v in t.items()}
        row["ratio"] = median(t["pytorch"]) / median(t["kernel"])
        R["cases"][name] = row
        print(f"{name:44s} pytorch {row['pytorch']['ms']:8.2f} ms  kernel {row['kernel']['ms']:8.2f} ms  "
              f"({row['ratio']:.2f}x)", flush=True)
    write_json(a.json, R)
    return R


if __name__ == "__main__":
    main()
