"""bf16 training's arithmetic, at equal steps: DeepSpeed bf16 (bf16 module weights and residual
stream, fp32 masters) with ZeRO-1 summing gradients in fp32 (BF16_Optimizer, the trainer's default
since session 11) or in bf16 (``data_types: grad_accum_dtype bf16``); LlamaGen's way (fp32 weights
under bf16 autocast: DeepSpeed's bf16 off, autocast on); and fp32 training. Same data, seed, model and recipe; micro-batches
accumulated (grad_accum) so that the sum's precision matters.

    python bench/bf16_accum.py [--tokens STORE] [--steps 300] [--seeds 0,1,2] [--json out.json]

Without --tokens a synthetic class-dependent store (tests' recipe) is made.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def synthetic_store(root: Path, n: int = 2048, K=(64, 64), hw=(8, 8), classes: int = 10, seed: int = 0) -> Path:
    from groupgen.layout import TokenLayout
    from groupgen.tokens import TokenStoreWriter

    lay = TokenLayout("grid", hw[0] * hw[1], K, h=hw[0], w=hw[1], image_size=32, channels=1)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    codes = np.zeros((n, 1, lay.L, lay.G), np.int64)
    for g, k in enumerate(K):
        base = (labels[:, None, None] * 7 + np.arange(lay.L)[None, None, :] * (g + 3)) % k
        noise = rng.integers(0, k, (n, 1, lay.L)) * (rng.random((n, 1, lay.L)) < 0.3)
        codes[..., g] = (base + noise) % k
    w = TokenStoreWriter(root, lay, n, 1, classes, chunk_size=512, class_names=[str(i) for i in range(classes)],
                         meta={"tokenizer": "synthetic", "tokenizer_hash": "synthetic"})
    for c in range(w.num_chunks):
        a, b = w.chunk_range(c)
        w.write_chunk(c, codes[a:b], labels[a:b])
    w.finalize()
    return root


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    import ar_model.train as T
    from groupgen.config import load_config

    work = Path(tempfile.mkdtemp(prefix="bf16acc-"))
    store = Path(a.tokens) if a.tokens else synthetic_store(work / "store")
    arms = {"fp32": ["train.precision=fp32"], "bf16, fp32 sums": ["train.precision=bf16"],
            "bf16, bf16 sums": ["train.precision=bf16"], "autocast, fp32 weights": ["train.precision=bf16"]}
    real_cfg = T.ds_config
    out: dict = {"steps": a.steps, "store": str(store), "arms": {}}
    for arm, ov in arms.items():
        finals = []
        for seed in [int(s) for s in a.seeds.split(",")]:
            def ds_cfg(tc, world, bf16, _arm=arm):
                d = real_cfg(tc, world, bf16)
                if _arm == "bf16, bf16 sums":
                    d["data_types"] = {"grad_accum_dtype": "bf16"}
                if _arm == "autocast, fp32 weights":   # the trainer still autocasts to bf16
                    d["bf16"] = {"enabled": False}
                    d.pop("data_types", None)
                return d
            T.ds_config = ds_cfg
            cfg = load_config(T.ARTrainConfig, str(REPO / "configs/ar/fmnist_tiny.yaml"),
                              ["train.zero_stage=1", f"train.steps={a.steps}", "train.grad_accum=4", "train.batch_size=8",
                               f"train.seed={seed}", "train.eval_every=0", "train.ckpt_every=100000", "train.threads=1",
                               "train.val_split=0.1", "train.eval_batches=8", "train.log_every=50", *ov])
            res = T.train(cfg, store, work / f"{arm.replace(' ', '_').replace(',', '')}_{seed}")
            finals.append(res["val_loss"])
            print(json.dumps({"arm": arm, "seed": seed, "val_loss": res["val_loss"]}), flush=True)
        T.ds_config = real_cfg
        m = float(np.mean(finals))
        s = float(np.std(finals, ddof=1)) if len(finals) > 1 else 0.0
        out["arms"][arm] = {"val_loss": finals, "mean": m, "ci95": 4.303 * s / np.sqrt(len(finals)) if len(finals) == 3 else None}
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
