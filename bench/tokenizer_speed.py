"""Tokenizer encode / decode speed on the CPU at a small batch (random weights; speed only).

    python bench/tokenizer_speed.py [--quick] [--batch 2] [--json out.json]

Default presets: ImageNet-256 LlamaGen VQ-16 (configs/tokenizer/llamagen_vq16.yaml) and MGVQ-G8 f16
(configs/tokenizer/mgvq_g8_f16.yaml); ``--quick`` uses the Fashion-MNIST VQ / MGVQ-G8 configs.
Encode and decode of every preset and precision are interleaved; images/s from medians.
"""
from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import REPO, bench_parser, hwm_mb, interleave, machine_info, median, parse_bench_args, spread, write_json

from groupgen.config import load_config
from tokenizer.model import build_tokenizer
from tokenizer.train import TokenizerTrainConfig

FULL = {"VQ-16": "configs/tokenizer/llamagen_vq16.yaml", "MGVQ-G8": "configs/tokenizer/mgvq_g8_f16.yaml"}
QUICK = {"VQ": "configs/tokenizer/fmnist_vq.yaml", "MGVQ-G8": "configs/tokenizer/fmnist_mgvq_g8.yaml"}


def main(argv=None) -> dict:
    ap = bench_parser(__doc__, reps=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--precisions", default="fp32,bf16")
    a = parse_bench_args(ap, argv)
    torch.manual_seed(0)
    presets = QUICK if a.quick else FULL
    R: dict = {"machine": machine_info(a.threads), "batch": a.batch, "reps": a.reps, "presets": presets}
    cases = {}
    for name, path in presets.items():
        tok = build_tokenizer(load_config(TokenizerTrainConfig, REPO / path)).eval()
        lay = tok.layout
        R[f"{name}/params_M"] = sum(p.numel() for p in tok.parameters()) / 1e6
        R[f"{name}/layout"] = f"L={lay.L} K={list(lay.K)} image {lay.image_size}x{lay.image_size}x{lay.channels}"
        x = torch.rand(a.batch, lay.channels, lay.image_size, lay.image_size) * 2 - 1
        codes = tok.encode(x)
        for prec in a.precisions.split(","):
            ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if prec == "bf16" else nullcontext

            def enc(tok=tok, x=x, ctx=ctx):
                with torch.inference_mode(), ctx():
                    return tok.encode(x)

            def dec(tok=tok, codes=codes, ctx=ctx):
                with torch.inference_mode(), ctx():
                    return tok.decode_codes(codes)

            cases[f"{name}/{prec}/encode"] = enc
            cases[f"{name}/{prec}/decode"] = dec
        print(f"{name}: {R[f'{name}/params_M']:.1f}M params, {R[f'{name}/layout']}", flush=True)
    times = interleave(cases, a.reps, warmup=a.warmup, log=lambda m: print(m, flush=True))
    for k, t in times.items():
        R[k] = {"s": spread(t), "img_s": a.batch / median(t)}
    for name in presets:
        for prec in a.precisions.split(","):
            e, d = median(times[f"{name}/{prec}/encode"]), median(times[f"{name}/{prec}/decode"])
            R[f"{name}/{prec}/roundtrip_img_s"] = a.batch / (e + d)
            print(f"{name} {prec}: encode {a.batch / e:.2f} img/s, decode {a.batch / d:.2f} img/s, "
                  f"encode+decode {a.batch / (e + d):.2f} img/s", flush=True)
    R["peak_rss_mb"] = hwm_mb()
    R["machine_end"] = machine_info(a.threads)
    write_json(a.json, R)
    return R


if __name__ == "__main__":
    main()
