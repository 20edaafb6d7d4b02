"""Tokenizer encode / decode speed on the CPU at a small batch (random weights; speed only).

    python bench/tokenizer_speed.py [--quick] [--batch 2] [--json out.json]
    python bench/tokenizer_speed.py --train-step [--ks 256,16384] [--threads 1] [--json out.json]

Default presets: ImageNet-256 LlamaGen VQ-16 (configs/tokenizer/llamagen_vq16.yaml) and MGVQ-G8 f16
(configs/tokenizer/mgvq_g8_f16.yaml); ``--quick`` uses the Fashion-MNIST VQ / MGVQ-G8 configs.
Encode and decode of every preset and precision are interleaved; images/s from medians.

``--train-step``: one ``fmnist_vq`` study-row training step (batch 32, forward + loss + backward +
quantizer hooks + clip + AdamW, as ``tokenizer.train`` runs it) at each codebook size in ``--ks``,
interleaved in one process; reports seconds per step and the ratio to the first K (issue 23: the
K 16384 step within 1.2x of the K 256 one).
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


def train_step_case(K: int, steps: int, batch: int):
    """A closure running ``steps`` training steps of ``fmnist_vq`` at codebook size K (real images)."""
    from groupgen.data import build_dataset
    from tokenizer.losses import recon_loss
    from tokenizer.model import Tokenizer
    from tokenizer.train import BatchOrder, get_batch

    torch.manual_seed(0)
    cfg = load_config(TokenizerTrainConfig, REPO / QUICK["VQ"], [f"quantizer.codebook_size={K}"])
    model = Tokenizer(cfg.model, cfg.quantizer).train()
    q, lc = model.quantizer, cfg.loss
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr,
                            betas=cfg.train.betas)
    ds = build_dataset(cfg.data, "train", train=True)
    order = BatchOrder(len(ds), batch, 0, 1, 0)
    state = {"step": 0}

    def run():
        for _ in range(steps):
            x = get_batch(ds, order(state["step"]))
            xrec, _, ql = model(x)
            parts = recon_loss(x, xrec, lc)
            total = lc.l2_weight * parts["l2"] + lc.recon_weight * parts[lc.recon] + lc.vq_weight * ql["vq"]
            opt.zero_grad(set_to_none=True)
            total.backward()
            q.after_backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip)
            opt.step()
            state["step"] += 1
            q.step_end(state["step"])  # revival every 50 steps included, as in a study row
    return run, cfg


def main_train_step(a) -> dict:
    ks = [int(k) for k in a.ks.split(",")]
    steps = 2 if a.quick else a.steps
    R: dict = {"machine": machine_info(a.threads), "preset": QUICK["VQ"], "batch": a.batch, "reps": a.reps,
               "steps_per_rep": steps, "ks": ks}
    cases = {}
    for K in ks:
        cases[f"K={K}"], cfg = train_step_case(K, steps, a.batch)
    times = interleave(cases, a.reps, warmup=a.warmup, log=lambda m: print(m, flush=True))
    base = median(times[f"K={ks[0]}"]) / steps
    for K in ks:
        t = [x / steps for x in times[f"K={K}"]]
        R[f"K={K}"] = {"s_per_step": median(t), "spread": spread(t), "ratio": median(t) / base}
        print(f"K={K}: {median(t):.4f} s/step (min/med/max {spread(t)}), {median(t) / base:.2f}x K={ks[0]}",
              flush=True)
    R["machine_end"] = machine_info(a.threads)
    write_json(a.json, R)
    return R


def main(argv=None) -> dict:
    ap = bench_parser(__doc__, reps=3)
    ap.add_argument("--batch", type=int, default=2, help="images per call (--train-step: default 32)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--train-step", action="store_true", help="time fmnist_vq training steps at several K")
    ap.add_argument("--ks", default="256,16384", help="--train-step: codebook sizes (first = baseline)")
    ap.add_argument("--steps", type=int, default=10, help="--train-step: steps per timed rep")
    a = parse_bench_args(ap, argv)
    if a.train_step:
        a.batch = 32 if a.batch == 2 else a.batch
        return main_train_step(a)
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
