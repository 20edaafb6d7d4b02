"""Why ``ar_model.cpu.nn_ops.decode_linear`` exists: ``F.linear`` vs prepacked weights at decode sizes.

    python bench/decode_linear.py [--quick] [--json out.json]

One GPT-B decode step's linear layers (12 x [qkv 2304x768, wo 768x768, w13 4096x768, w2 768x2048]
plus the 16384x768 output head; 444 MB of fp32 weights, so every call reads its weight from
memory) run for a few row counts, without autograd:
- ``F.linear``: PyTorch's CPU GEMM, which brings the weight into its blocked layout on every call;
- ``packed``: the weight packed once into the library GEMM's layout (MKL packed sgemm for fp32,
  oneDNN for bf16) and reused;
- ``kernel`` (where ``ar_model.cpu.kernels`` is built): groupgen's GEMM on its own packed layout,
  AVX-512 for fp32; bf16 up to 32 rows, on AMX where the CPU and OS allow it, else on AVX-512F.
``nn_ops.linear_path`` picks ``kernel`` in ``cpu_kernels.linear_min_rows(dtype)..nn_ops.KERNEL_MAX_ROWS``
rows, ``packed`` otherwise in its row range. Packing happens in the warmup. Cases interleaved;
milliseconds per whole step (median); ratios are F.linear / case; GB/s = weight bytes / median time.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import bench_parser, interleave, machine_info, median, parse_bench_args, spread, write_json

from ar_model.cpu import kernels as cpu_kernels
from ar_model.cpu.nn_ops import _pack_weight, _packed_mm

GPT_B = [(2304, 768), (768, 768), (4096, 768), (768, 2048)] * 12 + [(16384, 768)]
MICRO = [(192, 64), (64, 64), (256, 64), (64, 128)] * 2 + [(512, 64)]


def main(argv=None) -> dict:
    ap = bench_parser(__doc__, reps=7)
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,128")
    a = parse_bench_args(ap, argv)
    shapes = MICRO if a.quick else GPT_B
    reps = 2 if a.quick else a.reps
    R: dict = {"machine": machine_info(a.threads), "rows": {}}
    R["kernels"] = cpu_kernels.unavailable_reason() or (
        "built, bf16 on AMX" if cpu_kernels.amx_bf16() else
        f"built, bf16 on AVX-512F ({'used' if cpu_kernels.bf16_fma_preferred() else 'measured only: oneDNN decodes'})")
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        ws = [torch.randn(n, k, generator=g).to(dtype) for n, k in shapes]
        gbytes = sum(w.numel() * w.element_size() for w in ws) / 1e9
        # Measured wherever the kernel runs, also where Linear does not route to it (for bf16 on other
        # vendors' AVX512-BF16, see cpu_kernels.bf16_fma_preferred), so such a machine can decide.
        kernel_packs = [cpu_kernels.pack(w) for w in ws] if cpu_kernels.kernels() is not None else None
        for rows in (int(r) for r in a.rows.split(",")):
            xs = {k: torch.randn(rows, k, generator=g).to(dtype) for k in {k for _, k in shapes}}
            packs = [_pack_weight(w, rows) for w in ws]
            cases = {"F.linear": lambda: [F.linear(xs[w.shape[1]], w) for w in ws],
                     "packed": lambda: [_packed_mm(xs[w.shape[1]], p, w, None, rows) for w, p in zip(ws, packs)]}
            if kernel_packs is not None and (dtype == torch.float32 or rows <= 32):   # bf16: up to 32 rows
                cases["kernel"] = lambda: [cpu_kernels.linear(xs[w.shape[1]], p, None, w.shape[0])
                                           for w, p in zip(ws, kernel_packs)]
            with torch.inference_mode():
                t = interleave(cases, reps, warmup=1, log=None)
            row = {n: {"ms": 1e3 * median(v), "s": spread(v), "GB/s": gbytes / median(v),
                       "ratio": median(t["F.linear"]) / median(v)} for n, v in t.items()}
            R["rows"][f"{str(dtype)[6:]}:{rows}"] = row
            print(f"{str(dtype)[6:]:8s} rows {rows:4d}: " + "  ".join(
                f"{n} {r['ms']:7.2f} ms ({r['GB/s']:5.1f} GB/s, {r['ratio']:.2f}x)" for n, r in row.items()), flush=True)
    write_json(a.json, R)
    return R


if __name__ == "__main__":
    main()
