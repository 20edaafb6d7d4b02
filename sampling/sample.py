"""Sample images from a trained AR prior: KV-cached, classifier-free guided, sharded and resumable.

    python -m sampling.sample --ckpt AR_CKPT --out DIR [--tokenizer TOK] [--config YAML] [key=value ...]
    torchrun --nproc_per_node N -m sampling.sample --ckpt ... --out DIR ...     # sharded

The global sample list (labels) is cut into fixed chunks of ``batch_size``; chunk ``c`` draws with
its own generator seeded from ``(seed, c)``. Rank ``r`` of ``W`` makes chunks ``r, r+W, ...`` and
writes each atomically to ``DIR/shards/chunk_XXXXX.npz``; rank 0 then merges them in order into
``DIR/samples.npz`` (``arr_0`` uint8 [N,H,W,3], ``labels`` int64 [N], ``codes`` [N,L,G]),
``DIR/grid.png`` and ``DIR/sampling.json``. So any number of processes gives the same file, and an
interrupted run redoes only the chunks that are missing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from groupgen.checkpoint import CheckpointError, atomic_write_text, checkpoint_hash, load_meta, resolve_checkpoint
from groupgen.cli import user_errors
from groupgen.config import ConfigError, load_config, to_dict
from groupgen.layout import LayoutError, TokenLayout
from groupgen.runlock import hold_run_folder
from groupgen.runs import autocast, default_device, dist_info, progress

from .classes import class_names_for, resolve_classes, sample_labels
from .logits import GroupPicker, GroupSettings, cfg_scale_at, per_group
from .shards import (SamplingError, canonical_settings, chunk_ok, chunk_path, claim_shards_dir, shards_key,
                     wait_for_chunks, write_npz)


@dataclass
class SamplingConfig:
    num_samples: int = 0                     # total samples (wins over per_class); 0: per_class * classes
    per_class: int = 8
    classes: str | list[str] = "balanced"    # "balanced" | "random" (LlamaGen FID) | ids/names
    class_names: str = ""                    # "" from the checkpoint; "imagenet" | "fmnist" | a .txt path
    cfg_scale: float | list[float] = 1.0     # per group if a list; 1 = no guidance
    cfg_schedule: Literal["constant", "linear"] = "constant"
    cfg_stop_after: int = -1                 # positions after this one are unguided; -1: never stop
    temperature: float | list[float] = 1.0   # 0 = greedy
    top_k: int | list[int] = 0               # 0 = off (e.g. MGVQ: 4096 per sub-codebook)
    top_p: float | list[float] = 1.0         # 1 = off
    batch_size: int = 64                     # samples per chunk (the guided batch is twice this)
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    kv_cache: Literal["auto", "fp32", "bf16"] = "auto"   # auto: the precision's dtype; bf16 under fp32
    #   halves the cache memory (and, on the CPU kernel, its read per step) at one bf16 rounding of k/v
    weights: Literal["model", "ema"] = "model"           # the checkpoint's model.safetensors or ema.safetensors
    device: str = ""                         # "" = cuda:LOCAL_RANK if available, else cpu
    save_png: bool = False                   # DIR/png/<index>_<label>.png
    grid_per_class: int = 8                  # grid columns
    grid_max_rows: int = 32                  # grid rows (classes) at most
    wait_timeout_s: float = 7200.0           # rank 0 waits this long for other ranks' chunks
    allow_tokenizer_mismatch: bool = False   # sample with a tokenizer whose weights hash differs from the
    #   one the prior was trained on (same layout): the prior's codes then mean other images

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_samples < 0 or self.per_class < 0:
            raise ValueError("num_samples and per_class must be >= 0")
        if self.grid_per_class < 0 or self.grid_max_rows < 0:
            raise ValueError("grid_per_class and grid_max_rows must be >= 0")
        scales = self.cfg_scale if isinstance(self.cfg_scale, (list, tuple)) else [self.cfg_scale]
        if any(not s >= 0 for s in scales):   # a negative scale guides away from the class
            raise ConfigError(f"cfg_scale must be >= 0 (1 = no guidance, 0 = unconditional), got {self.cfg_scale}")
        if self.precision == "bf16" and self.kv_cache == "fp32":
            # bf16 compute makes bf16-valued keys and values: an fp32 cache only doubles its memory
            raise ValueError("kv_cache=fp32 with precision=bf16 stores bf16 values at twice the memory; "
                             "use kv_cache=auto or kv_cache=bf16 (or precision=fp32)")


@dataclass
class Models:
    """What sampling needs: the AR model, its meta, the tokenizer, and where they came from."""
    model: Any
    meta: dict
    tokenizer: Any
    ckpt_path: str = ""
    tokenizer_path: str = ""
    ckpt_hash: str = ""
    tokenizer_hash: str = ""
    weights: str = "model"        # the checkpoint's weight file that ``model`` was loaded from


@dataclass
class Plan:
    """Everything resolved from the config before any work: labels, per-group settings, chunks."""
    layout: TokenLayout
    num_classes: int
    class_names: list[str]
    labels: np.ndarray
    settings: list[GroupSettings]
    scales: list[float]
    guided: bool
    chunks: list[tuple[int, int]] = field(default_factory=list)


# --- planning and loading -----------------------------------------------------------------------
def _layout_of(meta: dict, where: str) -> TokenLayout:
    lay = meta.get("layout")
    if lay is None:
        raise SamplingError(f"{where}: meta.json has no 'layout'")
    return lay if isinstance(lay, TokenLayout) else TokenLayout.from_dict(lay)


def make_plan(cfg: SamplingConfig, layout: TokenLayout, num_classes: int,
              ckpt_names: list[str] | None) -> Plan:
    """Resolve classes, labels and per-group settings; raises on any bad value before work."""
    cfg.validate()   # a config built in Python (not by load_config) is checked too
    G = layout.G
    names = class_names_for(num_classes, ckpt_names, cfg.class_names)
    selection = resolve_classes(cfg.classes, names, num_classes)
    labels = sample_labels(selection, num_classes, cfg.num_samples, cfg.per_class, cfg.seed)
    temps = per_group(cfg.temperature, G, "temperature")
    ks = per_group(cfg.top_k, G, "top_k")
    ps = per_group(cfg.top_p, G, "top_p")
    settings = [GroupSettings(float(t), int(k), float(p)) for t, k, p in zip(temps, ks, ps)]
    for g, s in enumerate(settings):
        s.validate(g, layout.K[g])
    scales = [float(s) for s in per_group(cfg.cfg_scale, G, "cfg_scale")]
    guided = any(cfg_scale_at(s, pos, layout.L, cfg.cfg_schedule, cfg.cfg_stop_after) != 1.0
                 for s in scales for pos in range(layout.L))
    bs, n = cfg.batch_size, len(labels)
    chunks = [(a, min(a + bs, n)) for a in range(0, n, bs)]
    return Plan(layout, num_classes, names, labels, settings, scales, guided, chunks)


def load_models(ckpt, tokenizer=None, device="cpu", cfg: SamplingConfig | None = None) -> tuple[Models, Plan | None]:
    """Check metadata (layouts, classes, settings) first, then load weights.

    ``ckpt`` is an AR checkpoint path or an already built ``Models``. The tokenizer is the one the
    AR checkpoint names unless ``tokenizer`` (a path) is given.
    """
    if isinstance(ckpt, Models):
        if cfg is not None and cfg.weights != ckpt.weights:
            raise SamplingError(f"weights={cfg.weights!r}, but the preloaded model holds {ckpt.ckpt_path}'s "
                                f"{ckpt.weights!r} weights; load it with this config")
        plan = make_plan(cfg, _layout_of(ckpt.meta, "AR model"), int(ckpt.meta["num_classes"]),
                         ckpt.meta.get("class_names")) if cfg is not None else None
        return ckpt, plan
    from ar_model.model import load_ar
    from tokenizer.model import load_tokenizer

    ck = resolve_checkpoint(ckpt)
    meta = load_meta(ck)
    if meta.get("kind") != "ar":
        raise SamplingError(f"{ck}: meta kind is {meta.get('kind')!r}, expected an AR model checkpoint ('ar')")
    layout = _layout_of(meta, str(ck))
    tok_path = tokenizer or meta.get("tokenizer")
    if not tok_path:
        raise SamplingError(f"{ck}: the AR checkpoint names no tokenizer; pass --tokenizer PATH")
    try:
        tk = resolve_checkpoint(tok_path)
    except Exception as e:
        raise SamplingError(f"tokenizer {tok_path!r} (named by {'--tokenizer' if tokenizer else ck}): {e}") from None
    tmeta = load_meta(tk)
    layout.check_same(_layout_of(tmeta, str(tk)), f"AR checkpoint {ck}", f"tokenizer {tk}")
    plan = make_plan(cfg, layout, int(meta["num_classes"]), meta.get("class_names")) if cfg is not None else None
    weights = cfg.weights if cfg is not None else "model"
    _check_weights_file(ck, weights)

    tok_hash = checkpoint_hash(tk)
    want = meta.get("tokenizer_hash")
    if want and want != tok_hash:
        msg = (f"tokenizer {tk} has weights hash {tok_hash}, but the AR model {ck} was trained on codes from "
               f"a tokenizer with hash {want}")
        if not (cfg is not None and cfg.allow_tokenizer_mismatch):
            raise SamplingError(f"{msg}; its samples would decode the prior's codes with other weights. Pass "
                                f"the original tokenizer, or allow_tokenizer_mismatch=true to sample anyway")
        print(f"warning: {msg} (allow_tokenizer_mismatch=true)", file=sys.stderr)
    model, meta = load_ar(ck, device=device, weights=weights)
    model = model_for_precision(model, cfg.precision if cfg is not None else "fp32")
    tok = load_tokenizer(tk, device=device)
    layout.check_same(tok.layout, f"AR checkpoint {ck}", f"tokenizer {tk}")
    return Models(model, meta, tok, str(ck), str(tk), checkpoint_hash(ck, weights), tok_hash, weights), plan


def _check_weights_file(ck: Path, weights: str) -> None:
    """``weights=ema`` needs the EMA export, which only runs trained with ``train.ema > 0`` have."""
    if not (ck / f"{weights}.safetensors").is_file():
        have = sorted(p.stem for p in ck.glob("*.safetensors"))
        hint = " (trained without train.ema?); use weights=model" if weights == "ema" else ""
        raise SamplingError(f"{ck}: weights={weights!r} needs {weights}.safetensors, which this checkpoint "
                            f"lacks{hint}; it has {have}")


# --- generation ---------------------------------------------------------------------------------
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def model_for_precision(model, precision: str):
    """Weights in the sampling precision, cast once: autocast under inference mode re-casts every
    weight at every decode step (no cast cache there), which costs a full pass over the weights per
    token; and fp32 sampling of a bf16 (or fp16) checkpoint must compute in fp32, not in the file's dtype."""
    want = _DTYPES[precision]
    if any(p.dtype != want for p in model.parameters()):
        model = model.to(want)
    return model


def kv_cache_dtype(cfg: SamplingConfig) -> torch.dtype:
    """The KV cache's dtype: ``cfg.kv_cache``, or the sampling precision's where it is "auto"."""
    return _DTYPES[cfg.precision if cfg.kv_cache == "auto" else cfg.kv_cache]


def chunk_seed(seed: int, chunk: int) -> int:
    """A generator seed that depends only on (seed, chunk index)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(chunk)]).generate_state(1, np.uint64)[0] >> 1)


@torch.inference_mode()
def generate_codes(model, labels: torch.Tensor, plan: Plan, cfg: SamplingConfig,
                   generator: torch.Generator | None, device: torch.device,
                   keep_packed: bool = False) -> torch.Tensor:
    """Codes ``[B, L, G]`` for ``labels [B]``: one prefill, then L cached decode steps.

    Guidance runs one forward on the doubled batch ``[cond; null]``; the picker draws once per
    sample and feeds the same sub-index to both halves. The KV cache is freed at the end; the CPU's
    packed decode weights too unless ``keep_packed`` (a caller making many chunks frees them once,
    with ``model.release_packed()``).
    """
    L, G = plan.layout.L, plan.layout.G
    B = labels.shape[0]
    labels = labels.to(device)
    lab = torch.cat([labels, torch.full_like(labels, plan.num_classes)]) if plan.guided else labels
    picker = GroupPicker(plan.settings, plan.scales, L, cfg.cfg_schedule, cfg.cfg_stop_after,
                         plan.guided, generator)
    cache_dtype = kv_cache_dtype(cfg)
    out = torch.empty(B, L, G, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()   # no dropout, no class dropout while sampling, whatever mode the caller left
    try:
        with autocast(device, cfg.precision):
            model.init_cache(lab.shape[0], device, cache_dtype)
            h = model.prefill(lab)
            for pos in range(L):
                picker.pos = pos
                codes_t = model.sample_position(h, picker)
                out[:, pos] = codes_t[:B]
                if pos + 1 < L:
                    h = model.decode(codes_t, pos)
    finally:
        if hasattr(model, "clear_cache"):
            model.clear_cache(release_packed=not keep_packed)
        model.train(was_training)
    return out


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """Images [B,C,H,W] in [-1,1] -> uint8 [B,H,W,3] (grey replicated to 3 channels)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        raise SamplingError(f"decoded images have {x.shape[1]} channels; expected 1 or 3")
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


@torch.inference_mode()
def decode_images(tokenizer, codes: torch.Tensor, cfg: SamplingConfig, device: torch.device) -> np.ndarray:
    with autocast(device, cfg.precision):
        x = tokenizer.decode_codes(codes.to(device))
    return to_uint8_nhwc(x)


def _fingerprint(cfg: SamplingConfig, models: Models, plan: Plan) -> dict:
    d = canonical_settings(to_dict(cfg))
    return {"config": d, "ckpt_hash": models.ckpt_hash, "tokenizer_hash": models.tokenizer_hash,
            "num_samples": int(len(plan.labels)), "num_chunks": len(plan.chunks),
            "key": shards_key(d, models.ckpt_hash, models.tokenizer_hash)}


def run_shard(cfg: SamplingConfig, ckpt, out_dir, rank: int = 0, world: int = 1, tokenizer=None) -> dict:
    """Make this rank's chunks (``rank, rank+world, ...``), skipping ones already on disk."""
    if not 0 <= rank < world:
        raise SamplingError(f"rank {rank} out of range for world size {world}")
    t0 = time.perf_counter()
    device = torch.device(cfg.device) if cfg.device else default_device()
    models, plan = load_models(ckpt, tokenizer, device, cfg)
    out = Path(out_dir)
    claim_shards_dir(out, _fingerprint(cfg, models, plan))
    load_s = time.perf_counter() - t0
    mine = list(range(rank, len(plan.chunks), world))
    done, skipped = [], []
    try:
        _make_chunks(cfg, models, plan, out, mine, device, rank, done, skipped)
    finally:
        if hasattr(models.model, "release_packed"):
            models.model.release_packed()   # kept across this rank's chunks (packing once per run)
    return {"rank": rank, "world_size": world, "chunks_done": done, "chunks_skipped": skipped,
            "load_s": load_s, "wall_s": time.perf_counter() - t0, "device": str(device)}


def _make_chunks(cfg: SamplingConfig, models: Models, plan: Plan, out: Path, mine: list[int],
                 device: torch.device, rank: int, done: list[int], skipped: list[int]) -> None:
    """Generate, decode and write each chunk of ``mine`` not already on disk (appends to done/skipped)."""
    for c in progress(mine, desc=f"sampling (rank {rank})", unit="chunk"):
        a, b = plan.chunks[c]
        labels = plan.labels[a:b]
        path = chunk_path(out, c)
        if chunk_ok(path, labels):
            skipped.append(c)
            continue
        gen = torch.Generator(device=device)
        gen.manual_seed(chunk_seed(cfg.seed, c))
        t1 = time.perf_counter()
        codes = generate_codes(models.model, torch.from_numpy(labels), plan, cfg, gen, device, keep_packed=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t2 = time.perf_counter()
        images = decode_images(models.tokenizer, codes, cfg, device)
        t3 = time.perf_counter()
        write_npz(path, arr_0=images, labels=labels.astype(np.int64),
                   codes=codes.cpu().numpy().astype(plan.layout.code_dtype()),
                   gen_s=np.float64(t2 - t1), decode_s=np.float64(t3 - t2))
        done.append(c)


# --- merging ------------------------------------------------------------------------------------
def save_grid(images: np.ndarray, labels: np.ndarray, path: Path, per_class: int, max_rows: int,
              pad: int = 2) -> None:
    """One row per class (in order of first appearance), up to ``per_class`` samples per row."""
    from PIL import Image

    if len(images) == 0 or per_class == 0 or max_rows == 0:
        return
    order = list(dict.fromkeys(labels.tolist()))[:max_rows]
    H, W = images.shape[1:3]
    grid = np.zeros((len(order) * (H + pad) + pad, per_class * (W + pad) + pad, 3), np.uint8)
    for r, c in enumerate(order):
        for j, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
            y, x = pad + r * (H + pad), pad + j * (W + pad)
            grid[y:y + H, x:x + W] = images[i]
    Image.fromarray(grid).save(path)


def merge_shards(cfg: SamplingConfig, ckpt, out_dir, tokenizer=None, wait: bool = False,
                 extra: dict | None = None) -> dict:
    """Join every chunk (in global order) into DIR/samples.npz, grid.png, sampling.json."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    if isinstance(ckpt, Models):
        models, plan = load_models(ckpt, None, "cpu", cfg)
    else:  # metadata only: no weights are needed to merge
        ck = resolve_checkpoint(ckpt)
        meta = load_meta(ck)
        if not (tokenizer or meta.get("tokenizer")):
            raise SamplingError(f"{ck}: the AR checkpoint names no tokenizer; pass --tokenizer PATH")
        tk = resolve_checkpoint(tokenizer or meta.get("tokenizer"))
        _check_weights_file(ck, cfg.weights)
        models = Models(None, meta, None, str(ck), str(tk), checkpoint_hash(ck, cfg.weights), checkpoint_hash(tk),
                        cfg.weights)
        plan = make_plan(cfg, _layout_of(meta, str(ck)), int(meta["num_classes"]), meta.get("class_names"))
    claim_shards_dir(out, _fingerprint(cfg, models, plan))
    if wait:
        wait_for_chunks(out, len(plan.chunks), cfg.wait_timeout_s)
    parts = {"arr_0": [], "labels": [], "codes": []}
    gen_s = dec_s = 0.0
    for c, (a, b) in enumerate(plan.chunks):
        path = chunk_path(out, c)
        if not chunk_ok(path, plan.labels[a:b]):
            raise SamplingError(f"{path}: missing or not matching the planned labels; rerun to resume")
        with np.load(path) as z:
            for k in parts:
                parts[k].append(z[k])
            gen_s += float(z["gen_s"])
            dec_s += float(z["decode_s"])
    # each key's chunks are dropped once joined: two copies of one key's data at most, not of all
    arrays = {k: np.concatenate(parts.pop(k)) for k in list(parts)}
    write_npz(out / "samples.npz", **arrays)
    save_grid(arrays["arr_0"], arrays["labels"], out / "grid.png", cfg.grid_per_class, cfg.grid_max_rows)
    if cfg.save_png:
        from PIL import Image

        (out / "png").mkdir(exist_ok=True)
        for i, (img, lab) in enumerate(zip(arrays["arr_0"], arrays["labels"])):
            p = out / "png" / f"{i:06d}_{int(lab)}.png"
            if not p.exists():
                Image.fromarray(img).save(p)
    n = len(arrays["labels"])
    info = {
        "config": to_dict(cfg), "ckpt": models.ckpt_path, "ckpt_hash": models.ckpt_hash,
        "tokenizer": models.tokenizer_path, "tokenizer_hash": models.tokenizer_hash,
        "tokenizer_hash_expected": models.meta.get("tokenizer_hash"),
        "layout": plan.layout.to_dict(), "num_classes": plan.num_classes,
        "classes_sampled": {int(c): plan.class_names[int(c)] for c in np.unique(arrays["labels"])[:1000]},
        "num_samples": n, "num_chunks": len(plan.chunks), "guided": plan.guided,
        "group_settings": [dataclasses.asdict(s) for s in plan.settings], "cfg_scales": plan.scales,
        "image_shape": list(arrays["arr_0"].shape[1:]), "torch": torch.__version__,
        "timings": {"generate_s": gen_s, "decode_s": dec_s, "merge_s": time.perf_counter() - t0,
                    "images_per_s": n / max(gen_s + dec_s, 1e-9),
                    "images_per_s_generate": n / max(gen_s, 1e-9)},
        **(extra or {}),
    }
    atomic_write_text(out / "sampling.json", json.dumps(info, indent=1, default=str))
    return info


def sample(cfg: SamplingConfig, ckpt, out_dir, tokenizer=None, rank: int | None = None,
           world: int | None = None) -> dict:
    """Sample in-process (or as one rank of a torchrun job); rank 0 merges and returns the summary."""
    r, w, _ = dist_info()
    rank = r if rank is None else rank
    world = w if world is None else world
    t0 = time.perf_counter()
    if not isinstance(ckpt, Models):  # load once; merge_shards reuses the loaded models
        device = torch.device(cfg.device) if cfg.device else default_device()
        ckpt, _ = load_models(ckpt, tokenizer, device, cfg)
    # rank 0 owns DIR; other ranks (no process group here) only add chunk files, which are the same
    # bytes for the same fingerprint, and a foreign fingerprint is refused by claim_shards_dir
    run_lock = hold_run_folder(out_dir, "sampling.sample", rank) if rank == 0 else None  # noqa: F841
    shard = run_shard(cfg, ckpt, out_dir, rank, world)
    if rank != 0:
        return shard
    wall = time.perf_counter() - t0
    info = merge_shards(cfg, ckpt, out_dir, wait=world > 1, extra={"rank0": shard, "world_size": world})
    info["timings"]["wall_s"] = time.perf_counter() - t0
    info["timings"]["wall_images_per_s"] = info["num_samples"] / max(wall, 1e-9)
    atomic_write_text(Path(out_dir) / "sampling.json", json.dumps(info, indent=1, default=str))
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sampling.sample", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="AR checkpoint (dir, root with 'latest', or run dir)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--tokenizer", default=None, help="tokenizer checkpoint (default: the one the AR ckpt names)")
    ap.add_argument("--config", default=None, help="YAML with SamplingConfig fields")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. cfg_scale=2.0 top_k=[4096,4096]")
    args = ap.parse_args(argv)
    with user_errors(ap.prog, (SamplingError, CheckpointError, LayoutError, ValueError)):
        cfg = load_config(SamplingConfig, args.config, args.overrides)
        info = sample(cfg, args.ckpt, args.out, tokenizer=args.tokenizer)
    if "num_samples" in info:
        t = info["timings"]
        print(f"wrote {info['num_samples']} samples to {args.out} "
              f"({t['images_per_s']:.2f} images/s, wall {t['wall_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
