"""What each lever of the main job gives: sampling variants of a finished run, and the tokenizer's bound.

    python bench/demo_levers.py --run runs/fmnist [--sampling "cfg_scale=2.0 top_k=0" ...] [--recon-bound]
        [--json levers.jsonl]

``--run`` is a finished main-job folder (``python -m groupgen.main ... out=RUN``); its config, AR
checkpoint, tokenizer and eval settings are read from there. Every number is scored exactly like the
job's samples: the domain extractor, the test-split reference, the job's N, next to the equal-N floor of
the run's eval stage. Per variant:

- ``--sampling "k=v ..."``: the job's sampling config with these overrides, sampled from the run's newest
  finished prior into ``RUN/levers/<prior>/<hash>/`` (reused when it exists), then scored: FID, FID / floor, class accuracy / the
  classifier's.
- ``--recon-bound``: the tokenizer's reconstructions of N real *train* images (the floor's draws, same
  seeds) scored the same way. A prior can at best sample its tokenizer's reconstructions, so this is the
  FID the prior cannot go under.

One JSON object per variant goes to stdout and to ``--json`` (appended).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from groupgen.config import config_hash, load_config  # noqa: E402
from groupgen.runs import set_threads  # noqa: E402


def _stage_dir(run: Path, idx: int, name: str) -> Path:
    found = sorted(p for p in run.glob(f"{idx}_{name}-*") if (p / "DONE.json").is_file())
    if not found:
        raise SystemExit(f"error: {run} has no finished {name} stage ({idx}_{name}-*/DONE.json)")
    return max(found, key=lambda p: p.stat().st_mtime)


def _score(images, labels, cfg, floor: dict, e_cfg) -> dict:
    from eval.generation import evaluate_samples

    g = evaluate_samples(images, labels, cfg.eval.ref, dataclasses.replace(e_cfg, pr=False))
    out = {"fid": g["fid"], "fid_ratio": g["fid"] / floor["fid_mean"], "is": g["is"], "n": g["num_samples"]}
    if "class_acc" in g:
        out.update(class_acc=g["class_acc"], class_acc_ratio=g["class_acc"] / g["classifier_test_acc"])
    return out


def recon_bound(tok_dir: Path, cfg, e_cfg, floor: dict) -> dict:
    """The tokenizer's reconstructions of the floor's real-train draws, scored like samples."""
    from eval.fidelity import dataset_images, to_uint8_nhwc
    from tokenizer.model import load_tokenizer

    tok = load_tokenizer(tok_dir)
    rows = []
    for s in floor["seeds"]:
        real, labels = dataset_images(cfg.eval.ref.partition(":")[0], "train", (32, 32), floor["n"],
                                      e_cfg.ref_resize, seed=s)
        x = torch.from_numpy(real).permute(0, 3, 1, 2).float()[:, :1] / 127.5 - 1
        with torch.no_grad():
            xr = torch.cat([tok.decode_codes(tok.encode(b)).float().clamp(-1, 1) for b in x.split(250)])
        rows.append(_score(to_uint8_nhwc(xr), labels, cfg, floor, e_cfg))
    f = np.array([r["fid_ratio"] for r in rows])
    return {"variant": "recon_bound", "tokenizer": str(tok_dir), "fid": float(np.mean([r["fid"] for r in rows])),
            "fid_ratio": float(f.mean()), "fid_ratio_std": float(f.std(ddof=1)) if len(f) > 1 else 0.0,
            "class_acc_ratio": float(np.mean([r["class_acc_ratio"] for r in rows])), "draws": len(rows)}


def sampling_variant(run: Path, cfg, e_cfg, floor: dict, overrides: list[str], prior: str = "") -> dict:
    from sampling.sample import SamplingConfig, sample

    s_cfg = load_config(SamplingConfig, cfg.sampling.config or None,
                        cfg.sampling.overrides + [f"seed={cfg.seed}"] + overrides)   # as pipeline.main resolves it
    ar_dir = run / prior if prior else _stage_dir(run, 3, "ar")   # default: the newest finished prior
    d = run / "levers" / ar_dir.name / config_hash(dataclasses.asdict(s_cfg))
    t0 = time.perf_counter()
    if not (d / "samples.npz").is_file():
        sample(s_cfg, ar_dir, d)
    secs = time.perf_counter() - t0
    with np.load(d / "samples.npz") as z:
        images, labels = z["arr_0"], z["labels"]
    return {"variant": " ".join(overrides) or "(job default)", "prior": ar_dir.name, "dir": str(d), "sample_seconds": round(secs, 1),
            **_score(images, labels, cfg, floor, e_cfg)}


def main(argv=None):
    from eval.generation import GenEvalConfig
    from pipeline.main import MainConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="a finished main-job folder")
    ap.add_argument("--tokenizer", type=Path, help="--recon-bound of this tokenizer (a run dir or checkpoint) "
                    "instead of the run's; without --run, scored with configs/main/fmnist.yaml's eval settings")
    ap.add_argument("--sampling", action="append", default=[], help='"k=v k=v" sampling overrides')
    ap.add_argument("--prior", default="", help="the run's AR stage folder to sample (default: the newest finished)")
    ap.add_argument("--recon-bound", action="store_true")
    ap.add_argument("--n", type=int, default=500, help="images per side without --run (the demo's N)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    if args.run is None and (args.sampling or not args.tokenizer):
        ap.error("--sampling and a --recon-bound without --tokenizer need --run")
    cfg = load_config(MainConfig, args.run / "config.yaml" if args.run else "configs/main/fmnist.yaml", [])
    e_cfg = load_config(GenEvalConfig, None, [f"extractor={cfg.eval.extractor}"] + cfg.eval.overrides)
    if args.run:
        floor = json.loads((_stage_dir(args.run, 5, "eval") / "DONE.json").read_text())["fid_floor"]
    else:   # the main job's floor: its N, draws and seeds
        from eval.generation import fid_floor

        floor = fid_floor(cfg.eval.ref, args.n, (32, 32), e_cfg, cfg.eval.floor_draws, cfg.eval.floor_seed)
    tok_dir = args.tokenizer or (_stage_dir(args.run, 1, "tokenizer") if args.run else None)
    jobs = [lambda: recon_bound(tok_dir, cfg, e_cfg, floor)] if args.recon_bound else []
    jobs += [lambda o=o: sampling_variant(args.run, cfg, e_cfg, floor, o.split(), args.prior) for o in args.sampling]
    for job in jobs:
        row = {"run": str(args.run), "floor": floor["fid_mean"], **job()}
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
