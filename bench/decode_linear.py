"""Why ``ar_model.layers.Linear`` exists: ``F.linear`` vs prepacked weights at decode sizes.

    python bench/decode_linear.py [--quick] [--json out.json]

One GPT-B decode step's linear layers (12 x [qkv 2304x768, wo 768x768, w13 4096x768, w2 768x2048]
plus the 16384x768 output head; 444 MB of fp32 weights, so every call reads its weight from
memory) run for a few row counts: ``F.linear(x, W)`` against ``Linear`` without autograd, which
packs each weight once into the GEMM's blocked layout (MKL packed GEMM for fp32, oneDNN for bf16)
and reuses it. Packing happens in the warmup. Cases interleaved; milliseconds per whole step
(median), ratio = F.linear / packed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import interleave, machine_info, median, spread, write_json

from ar_model.layers import Linear

GPT_B = [(2304, 768), (768, 768), (4096, 768), (768, 2048)] * 12 + [(16384, 768)]
MICRO = [(192, 64), (64, 64), (256, 64), (64, 128)] * 2 + [(512, 64)]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 reps: a smoke test")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    shapes = MICRO if a.quick else GPT_B
    reps = 2 if a.quick else a.reps
    R: dict = {"machine": machine_info(a.threads), "rows": {}}
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        lins = []
        for n, k in shapes:
            lin = Linear(k, n, bias=False)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(n, k, generator=g))
            lins.append(lin.to(dtype))
        for rows in (int(r) for r in a.rows.split(",")):
            xs = {k: torch.randn(rows, k, generator=g).to(dtype) for k in {k for _, k in shapes}}
            cases = {"F.linear": lambda: [F.linear(xs[m.in_features], m.weight) for m in lins],
                     "packed": lambda: [m(xs[m.in_features]) for m in lins]}
            with torch.inference_mode():
                t = interleave(cases, reps, warmup=1, log=None)
            for m in lins:
                m.release_packed()
            row = {n: {"ms": 1e3 * median(v), "s": spread(v)} for n, v in t.items()}
            row["ratio"] = median(t["F.linear"]) / median(t["packed"])
            R["rows"][f"{str(dtype)[6:]}:{rows}"] = row
            print(f"{str(dtype)[6:]:8s} rows {rows:4d}: F.linear {row['F.linear']['ms']:8.2f} ms  "
                  f"packed {row['packed']['ms']:8.2f} ms  ratio {row['ratio']:.2f}", flush=True)
    write_json(a.json, R)
    return R


if __name__ == "__main__":
    main()
