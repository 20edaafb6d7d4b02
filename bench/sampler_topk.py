"""The sampler's top-k filter on the CPU: ``torch.topk`` vs ``ar_model.cpu.kernels.topk``.

    python bench/sampler_topk.py [--quick] [--json out.json]

One decode position's top-k over guided logits (8 images = 8 rows after the guidance combination):
G = 1 with K = 16384, k = 2000 (LlamaGen's GPT-B setting) and one group of G = 8 with K = 2048,
k = 256 (eight of these per position). Logits are N(0, 3) fp32. ``torch.topk`` unsorted (what the
sampler used before) and sorted, and the kernel, whose kept columns come out in index order.
Cases interleaved; microseconds per call (median of ``--reps`` batches of ``--calls`` calls).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import bench_parser, interleave, machine_info, median, parse_bench_args, spread, write_json

from ar_model.cpu import kernels as cpu_kernels

SHAPES = [(8, 16384, 2000), (8, 2048, 256)]
QUICK = [(2, 64, 8)]


def main(argv=None) -> dict:
    ap = bench_parser(__doc__, reps=7)
    ap.add_argument("--calls", type=int, default=200, help="calls per timed batch")
    a = parse_bench_args(ap, argv)
    calls = 5 if a.quick else a.calls
    R: dict = {"machine": machine_info(a.threads), "kernels": cpu_kernels.unavailable_reason() or "built",
               "shapes": {}}
    for rows, K, k in QUICK if a.quick else SHAPES:
        x = torch.randn(rows, K, generator=torch.Generator().manual_seed(0)) * 3
        cases = {"torch.topk": lambda: [torch.topk(x, k, sorted=False) for _ in range(calls)],
                 "torch.topk sorted": lambda: [torch.topk(x, k) for _ in range(calls)]}
        if cpu_kernels.kernels() is not None:
            cases["kernel"] = lambda: [cpu_kernels.topk(x, k) for _ in range(calls)]
        t = interleave(cases, 2 if a.quick else a.reps, warmup=1, log=None)
        row = {n: {"us": 1e6 * median(v) / calls, "s": spread(v),
                   "ratio": median(t["torch.topk"]) / median(v)} for n, v in t.items()}
        R["shapes"][f"{rows}x{K}:k={k}"] = row
        print(f"[{rows}, {K}] k={k}: " + "  ".join(f"{n} {r['us']:8.1f} us ({r['ratio']:.2f}x)"
                                                   for n, r in row.items()), flush=True)
    write_json(a.json, R)
    return R


if __name__ == "__main__":
    main()
