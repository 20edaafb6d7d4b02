"""Images a second that the tokenizer trainer's loader delivers to one process, at 256^2 from JPEG
files (ImageNet-sized: 500x375, quality 90), with N decoding workers (``groupgen.loader``, the
trainer's own path: random-resized crop + flip, per-batch seeded), against what one GPU step of
VQ-16 training consumes (LlamaGen: global batch 128 over 8 GPUs = 16 images per GPU per step).

    python bench/data_pipeline.py [--workers 0,1,2] [--batches 12] [--step-ms 0,60] [--json out.json]

``--step-ms`` stands in for the GPU's step (the main process waits that long per batch, as it waits on
the GPU): with no workers decoding adds to it, with workers it overlaps it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_jpegs(root: Path, n: int, w: int = 500, h: int = 375) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / "train" / f"n{i % 4:08d}"
        d.mkdir(parents=True, exist_ok=True)
        low = rng.random((12, 16, 3))   # smooth content compresses like a photo, not like noise
        img = Image.fromarray((low * 255).astype("uint8")).resize((w, h), Image.BICUBIC)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 12, (h, w, 3))
        Image.fromarray(arr.clip(0, 255).astype("uint8")).save(d / f"{i:05d}.JPEG", quality=90)
    return root


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--step-ms", default="0,60", help="simulated GPU step per batch (ms), comma-separated")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    import torch
    from groupgen.data import DataConfig, build_dataset
    from groupgen.loader import image_batches

    torch.set_num_threads(1)
    n = a.batches * a.batch_size
    root = make_jpegs(Path(tempfile.mkdtemp(prefix="jpegs-")), n)
    ds = build_dataset(DataConfig(name="imagefolder", root=str(root), image_size=256, channels=3), "train", train=True)
    order = [list(range(i * a.batch_size, (i + 1) * a.batch_size)) for i in range(a.batches)]
    R = {"cores": os.cpu_count(), "images": n, "size": 256, "source": "500x375 JPEG q90",
         "per_gpu_step_images": 16, "rows": {}}
    for step_ms in [float(x) for x in a.step_ms.split(",")]:
        for w in [int(x) for x in a.workers.split(",")]:
            list(image_batches(ds, order[:2], workers=w))   # warm the page cache
            t0 = time.perf_counter()
            got = 0
            for x, _ in image_batches(ds, order, workers=w):
                got += len(x)
                time.sleep(step_ms / 1000)
            dt = time.perf_counter() - t0
            key = f"step={step_ms:g}ms workers={w}"
            R["rows"][key] = {"images_per_s": round(got / dt, 1), "ms_per_batch": round(1000 * dt / a.batches, 1),
                              "decode_ms_per_batch_over_step": round(1000 * dt / a.batches - step_ms, 1)}
            print(json.dumps({key: R["rows"][key]}), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(R, indent=1))
    return R


if __name__ == "__main__":
    main()
