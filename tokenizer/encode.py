"""Encode an image dataset into a token store (groupgen.tokens) with a trained tokenizer.

    python -m tokenizer.encode --ckpt RUN_OR_CKPT --out DIR [split=train views=2 view_kind=flip ...]
    torchrun --nproc_per_node 2 -m tokenizer.encode ...     # chunks sharded over ranks

Views per image (``V``): ``view_kind=flip``: 1 = the image, 2 = image + horizontal flip;
``view_kind=crops``: up to 10 = centre + 4 corner crops of side ``crop_frac`` (resized back), then
the same five flipped (LlamaGen's ten-crop). Resumable: finished chunks are skipped, so re-running
after an interruption completes the store; the result equals a one-shot encode.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from groupgen.checkpoint import checkpoint_hash, load_meta, resolve_checkpoint
from groupgen.config import ConfigError, from_dict, load_config, to_dict
from groupgen import distributed
from groupgen.cli import user_errors
from groupgen.data import DataConfig, build_dataset, write_skipped
from groupgen.loader import image_batches
from groupgen.runlock import hold_run_folder
from groupgen.runs import autocast, progress, set_threads
from groupgen.tokens import TokenStoreWriter

from .model import load_tokenizer
from .train import parse_cli

_CROPS = ("center", "top_left", "top_right", "bottom_left", "bottom_right")


@dataclass
class EncodeConfig:
    split: str = "train"
    views: int = 2
    view_kind: str = "flip"        # flip | crops
    crop_frac: float = 0.9         # crops: side of each crop relative to the image
    batch_size: int = 128          # images per read, and the most images (views) one encoder call takes
    views_per_call: int = 0        # views per encoder call (0 = as many as keep a call <= batch_size images)
    precision: str = "auto"        # auto (the tokenizer's training precision) | fp32 | bf16
    workers: int = 4               # image-decoding processes per rank (files only)
    chunk_size: int = 1024         # images per resumable chunk
    max_chunks: int = 0            # encode at most this many chunks in this call (0 = all); for time slices
    device: str = "auto"
    threads: int = 0
    data: dict = field(default_factory=dict)   # overrides of the tokenizer's training data config

    def validate(self):
        if self.view_kind not in ("flip", "crops"):
            raise ConfigError(f"view_kind must be 'flip' or 'crops', got {self.view_kind!r}")
        vmax = 2 if self.view_kind == "flip" else 10
        if not 1 <= self.views <= vmax:
            hint = " (ten-crop: view_kind=crops views=10)" if self.view_kind == "flip" and self.views > 2 else ""
            raise ConfigError(f"views must be in [1, {vmax}] for view_kind={self.view_kind!r}, got {self.views}{hint}")
        if not 0.0 < self.crop_frac <= 1.0:
            raise ConfigError(f"crop_frac must be in (0, 1], got {self.crop_frac}")
        if self.views_per_call < 0 or self.workers < 0 or self.batch_size < 1:
            raise ConfigError(f"views_per_call and workers must be >= 0 and batch_size >= 1, got "
                              f"{self.views_per_call}, {self.workers}, {self.batch_size}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")


def view_names(cfg: EncodeConfig) -> list[str]:
    if cfg.view_kind == "flip":
        return ["identity", "hflip"][: cfg.views]
    names = list(_CROPS) + [f"{c}+hflip" for c in _CROPS]
    return names[: cfg.views]


def make_views(x: torch.Tensor, cfg: EncodeConfig) -> torch.Tensor:
    """[B, C, H, W] -> [B, V, C, H, W] deterministic views."""
    if cfg.view_kind == "flip":
        vs = [x, x.flip(-1)][: cfg.views]
        return torch.stack(vs, 1)
    H, W = x.shape[-2:]
    ch, cw = max(1, round(H * cfg.crop_frac)), max(1, round(W * cfg.crop_frac))
    boxes = [((H - ch) // 2, (W - cw) // 2), (0, 0), (0, W - cw), (H - ch, 0), (H - ch, W - cw)]
    vs = []
    for v in range(cfg.views):
        t, l = boxes[v % 5]
        c = x[..., t:t + ch, l:l + cw]
        if (ch, cw) != (H, W):
            c = F.interpolate(c, size=(H, W), mode="bilinear", align_corners=False)
        vs.append(c.flip(-1) if v >= 5 else c)
    return torch.stack(vs, 1)


@torch.no_grad()
def encode(ckpt: str | Path, out_dir: str | Path, data_cfg: DataConfig | None = None, split: str = "train",
           views: int = 2, batch_size: int = 128, cfg: EncodeConfig | None = None) -> Path:
    """Encode ``split`` of ``data_cfg`` (default: the tokenizer's training data config) to ``out_dir``."""
    if cfg is None:
        cfg = EncodeConfig(split=split, views=views, batch_size=batch_size)
    cfg.validate()
    rank, world, device = distributed.init(cfg.device)
    set_threads(cfg.threads or None)
    ck = resolve_checkpoint(ckpt)
    tok = load_tokenizer(ck, device)
    precision = cfg.precision
    if precision == "auto":   # as it trained: a bf16 tokenizer's codes are those of its bf16 forward
        precision = load_meta(ck)["config"].get("train", {}).get("precision", "fp32")
    if data_cfg is None:
        data_cfg = from_dict(DataConfig, {**load_meta(ck)["config"]["data"], **cfg.data})
    ds = build_dataset(data_cfg, cfg.split, train=False)
    if (tok.layout.channels, tok.layout.image_size) != (data_cfg.channels, data_cfg.image_size):
        raise ConfigError(f"data gives {data_cfg.channels}x{data_cfg.image_size}^2 images, tokenizer {ck} expects "
                          f"{tok.layout.channels}x{tok.layout.image_size}^2")
    meta = {"tokenizer": str(ck.resolve()), "tokenizer_hash": checkpoint_hash(ck),
            "views": {"count": cfg.views, "kind": cfg.view_kind, "names": view_names(cfg),
                      **({"crop_frac": cfg.crop_frac} if cfg.view_kind == "crops" else {})},
            "data": to_dict(data_cfg), "split": cfg.split}
    out = Path(out_dir)
    run_lock = hold_run_folder(out, "tokenizer.encode", rank)  # noqa: F841 (held until encode returns)
    if rank == 0:
        write_skipped(ds, out)
    args = dict(layout=tok.layout, n=len(ds), views=cfg.views, num_classes=ds.num_classes,
                chunk_size=cfg.chunk_size, meta=meta, class_names=list(ds.class_names))
    if rank == 0:
        writer = TokenStoreWriter(out, **args)
    distributed.barrier()  # rank 0 created the files; the others reopen them
    if rank != 0:
        writer = TokenStoreWriter(out, **args)
    pending = writer.pending_chunks(rank, world)
    if cfg.max_chunks:
        pending = pending[: cfg.max_chunks]
    t0 = time.perf_counter()
    reads = [(ci, s_, min(writer.chunk_range(ci)[1], s_ + cfg.batch_size)) for ci in pending
             for s_ in range(*writer.chunk_range(ci), cfg.batch_size)]
    batches = image_batches(ds, [range(s_, e) for _, s_, e in reads], workers=cfg.workers,
                            pin_memory=device.type == "cuda")
    by_chunk = {}
    for (ci, s_, e), (x, y) in zip(reads, progress(batches, total=len(reads), desc=f"encode {cfg.split}")):
        a, b = writer.chunk_range(ci)
        if ci not in by_chunk:
            by_chunk[ci] = (np.empty((b - a, cfg.views, tok.layout.L, tok.layout.G), dtype=np.int64),
                            np.empty((b - a,), dtype=np.int64))
        codes, labels = by_chunk[ci]
        xv = make_views(x.to(device, non_blocking=True), cfg)          # [B, V, C, H, W]
        # ten crops of a 128-image batch at 256^2 in one fp32 call would hold tens of GB of activations
        per_call = cfg.views_per_call or max(1, cfg.batch_size // xv.shape[0])
        for v0 in range(0, cfg.views, per_call):                          # bounded encoder calls
            with autocast(device, precision):
                c = tok.encode(xv[:, v0:v0 + per_call].flatten(0, 1))   # [B*v, L, G]
            codes[s_ - a:e - a, v0:v0 + per_call] = c.view(e - s_, -1, *c.shape[1:]).cpu().numpy()
        labels[s_ - a:e - a] = np.asarray(y, dtype=np.int64)
        if e == b:
            writer.write_chunk(ci, codes, labels)
            del by_chunk[ci]
    distributed.barrier()
    if rank == 0 and not writer.pending_chunks(0, 1):
        writer.finalize()
    if rank == 0:
        print(json.dumps({"out": str(out), "chunks_done_now": len(pending), "seconds": round(time.perf_counter() - t0, 2),
                          "complete": not writer.pending_chunks(0, 1), "layout": tok.layout.describe()}), flush=True)
    return out


def main():
    def extra(ap):
        ap.add_argument("--ckpt", required=True, help="tokenizer checkpoint, checkpoint root or run dir")
        ap.add_argument("--out", required=True, help="token store directory")
    args = parse_cli("Encode a dataset into a token store", extra)
    with user_errors("python -m tokenizer.encode"):
        cfg = load_config(EncodeConfig, args.config, args.overrides)
        encode(args.ckpt, args.out, cfg=cfg)
    distributed.destroy()


if __name__ == "__main__":
    main()
