"""Decode attention on the CPU: SDPA vs ``ar_model.cpu.kernels``'s kernel, at GPT-B's shapes.

    python bench/decode_attention.py [--quick] [--json out.json]

One decode step's 12 layers attend one query per head (16 rows = 8 images x 2 for guidance, 12
heads of 64) over the filled prefix of a [16, 12, 257, 64] KV cache, for a few prefix lengths, in
fp32 and bf16. Cases interleaved; milliseconds per whole step (median); GB/s = cache bytes read
(K and V prefixes) / median time; ratio = SDPA / kernel.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import bench_parser, interleave, machine_info, median, parse_bench_args, spread, write_json

from ar_model.cpu import kernels as cpu_kernels


def main(argv=None) -> dict:
    ap = bench_parser(__doc__, reps=7)
    ap.add_argument("--lengths", default="17,64,128,192,251")
    a = parse_bench_args(ap, argv)
    B, H, D, T, layers = (2, 2, 16, 33, 2) if a.quick else (16, 12, 64, 257, 12)
    lengths = [5, 33] if a.quick else [int(n) for n in a.lengths.split(",")]
    reps = 2 if a.quick else a.reps
    if cpu_kernels.kernels() is None:
        raise SystemExit(f"decode_attention: no kernel to compare ({cpu_kernels.unavailable_reason()})")
    R: dict = {"machine": machine_info(a.threads), "shape": [B, H, T, D], "layers": layers, "lengths": {}}
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        caches = [[torch.randn(B, H, T, D, generator=g).to(dtype) for _ in range(2)] for _ in range(layers)]
        q = torch.randn(B, H, 1, D, generator=g).to(dtype)
        for n in lengths:
            cases = {"sdpa": lambda: [F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n]) for k, v in caches],
                     "kernel": lambda: [cpu_kernels.attention(q, k, v, n) for k, v in caches]}
            with torch.inference_mode():
                t = interleave(cases, reps, warmup=1, log=None)
            gbytes = layers * 2 * B * H * n * D * q.element_size() / 1e9
            row = {c: {"ms": 1e3 * median(v), "s": spread(v), "GB/s": gbytes / median(v)} for c, v in t.items()}
            row["ratio"] = median(t["sdpa"]) / median(t["kernel"])
            R["lengths"][f"{str(dtype)[6:]}:{n}"] = row
            print(f"{str(dtype)[6:]:8s} prefix {n:4d}: SDPA {row['sdpa']['ms']:6.2f} ms ({row['sdpa']['GB/s']:5.1f} GB/s)  "
                  f"kernel {row['kernel']['ms']:6.2f} ms ({row['kernel']['GB/s']:5.1f} GB/s)  ratio {row['ratio']:.2f}",
                  flush=True)
    write_json(a.json, R)
    return R


if __name__ == "__main__":
    main()
