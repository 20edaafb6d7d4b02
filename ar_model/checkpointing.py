"""AR training checkpoints: DeepSpeed engine state beside our safetensors export, written atomically;
resume lookup and checks; vetting of DeepSpeed's own pickle files before DeepSpeed opens them."""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

from ar_model.ema import EMA
from ar_model.model import GPTConfig
from groupgen import checkpoint as ckpt
from groupgen.config import ConfigError
from groupgen.tokens import TokenStore


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def fp32_masters(engine, local_only: bool = False, keep: bool = True) -> dict[int, torch.Tensor] | None:
    """``id(param) -> fp32 master`` for a GPT whose module parameters are low precision (DeepSpeed
    bf16 casts the module; the optimizer updates fp32 masters and copies them down, so the module's
    weights are bf16-rounded ones). Empty in fp32 training, where each parameter is its own master.

    ZeRO-0 keeps a master per parameter on every rank (``FP16_UnfusedOptimizer.fp32_groups``);
    ZeRO-1..3 partition them, so fetching them there is collective (every rank calls), or, with
    ``local_only``, not done (None). Fetched masters go to the CPU one at a time, and only where
    ``keep`` (rank 0): a full fp32 copy per GPU would cost 4 bytes per parameter on every rank.
    """
    gpt = engine.module.gpt
    if all(p.dtype == torch.float32 for p in gpt.parameters()):
        return {}
    opt = engine.optimizer
    lp_groups, hp_groups = getattr(opt, "fp16_groups", None), getattr(opt, "fp32_groups", None)
    if isinstance(hp_groups, list) and all(isinstance(g, list) for g in hp_groups):   # ZeRO-0
        return {id(lp): hp for lps, hps in zip(lp_groups, hp_groups) for lp, hp in zip(lps, hps)}
    if local_only:
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in gpt.named_parameters():
        hp = safe_get_full_fp32_param(p)   # collective: every rank fetches every parameter
        if hp is None and p.requires_grad and keep:
            warnings.warn(f"no fp32 master of {name} in {type(opt).__name__}: its {p.dtype} value is exported")
        elif hp is not None and keep:
            out[id(p)] = hp.detach().float().cpu()
    return out


def full_state(engine, stage: int, rank: int) -> dict[str, torch.Tensor] | None:
    """Full fp32 GPT state dict on rank 0: the fp32 masters of bf16 training, not the module's
    bf16-rounded copies (collective: ZeRO-1..3 fetch partitioned masters, ZeRO-3 gathers
    parameters, so every rank must call this)."""
    gpt = engine.module.gpt
    masters = fp32_masters(engine, keep=rank == 0)
    ctx = None
    if stage == 3:
        import deepspeed
        ctx = deepspeed.zero.GatheredParameters(list(gpt.parameters()), modifier_rank=None)
        ctx.__enter__()
    try:
        if rank != 0:
            return None
        return {k: masters.get(id(v), v).detach().float().cpu().clone()
                for k, v in gpt.state_dict(keep_vars=True).items()}
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)


def prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    latest = ckpt.latest_checkpoint(root)
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last]:
        if latest is None or old.name != latest.name:
            shutil.rmtree(old, ignore_errors=True)


def clean_partial_saves(root: Path) -> None:
    """Remove what a save cut short (a full disk, a kill) left: ``.ds-step_*`` (DeepSpeed's engine
    files), ``.build-step_*`` and ``.tmp-*`` folders. Only the run folder's lock holder calls this, so none
    belongs to a live save."""
    for d in sorted(root.glob(".ds-step_*")) + sorted(root.glob(".build-step_*")) + sorted(root.glob(".tmp-*")):
        print(f"[ar-train] removing {d}, left by a save that did not finish", file=sys.stderr, flush=True)
        shutil.rmtree(d, ignore_errors=True)


def save_training_checkpoint(engine, root: Path, step: int, meta: dict, state: dict, stage: int,
                             rank: int, keep_last: int, ema: EMA | None) -> Path:
    """Collective: DeepSpeed engine state + our safetensors export, made visible atomically."""
    name = f"step_{step:08d}"
    staging = root / f".ds-{name}"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    barrier()
    engine.save_checkpoint(str(staging), tag="engine", save_latest=False)
    rngs: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(rngs, ckpt.rng_state())
    sd = full_state(engine, stage, rank)
    final = root / name
    if rank == 0:
        tensors = {"model": sd}
        if ema is not None:
            tensors["ema"] = {**sd, **ema.state_dict()}
        build = ckpt.write_checkpoint_dir(root / f".build-{name}", tensors, dict(meta, step=step),
                                          dict(state, rng=rngs))
        os.replace(staging / "engine", build / "engine")
        shutil.rmtree(staging, ignore_errors=True)
        if final.exists():   # the same step saved by an earlier, crashed attempt
            shutil.rmtree(final)
        os.replace(build, final)
        ckpt.atomic_write_text(root / "latest", name + "\n")   # only now does resume see it
        prune(root, keep_last)
    barrier()
    return final


def vet_engine_files(engine_dir: Path, rank: int | None = None) -> None:
    """DeepSpeed reads its engine files with ``torch.load(weights_only=False)``: open each one with the
    restricted unpickler first, so a crafted file is refused before DeepSpeed can execute it.

    With ``rank``, only the files that rank's DeepSpeed opens: those shared by all ranks and its own
    ZeRO partition (``*zero_pp_rank_<rank>_*``; without elastic checkpoints a rank reads no other
    partition). Every rank vetting every partition read GPT-3B's whole optimizer state on each of
    32 GPUs (~1.4 TB)."""
    import importlib
    import re

    # plain-data classes DeepSpeed pickles into ZeRO optimizer files (no code runs when they are rebuilt)
    allowed = []
    for mod, name in (("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                      ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                      ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                      ("deepspeed.utils.tensor_fragment", "fragment_address")):
        try:
            allowed.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            pass
    for f in sorted(engine_dir.rglob("*.pt")):
        part = re.search(r"zero_pp_rank_(\d+)_", f.name)
        if rank is not None and part is not None and int(part.group(1)) != rank:
            continue   # another rank's partition: that rank vets it
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ckpt.CheckpointError(f"{f}: refused to load DeepSpeed engine state with the restricted "
                                       f"unpickler ({type(e).__name__}: {str(e)[:300]})") from None


def load_resume_state(path: Path) -> dict:
    """The trainer state (``state.pt``) of a checkpoint to resume from, with the keys resuming needs."""
    f = Path(path) / "state.pt"
    if not f.is_file():
        raise ckpt.CheckpointError(f"{f}: missing; resuming needs the trainer state (step, data position, "
                                   f"RNG) that the trainer saves beside engine/")
    st = ckpt.load_state(path)
    for key in ("step", "data_pos"):
        if key not in st:
            raise ckpt.CheckpointError(f"{f}: no {key!r} (has {sorted(st)}); not a trainer state to resume from")
    return st


def load_ema(ema: EMA, path: Path) -> None:
    """Restore the EMA from a checkpoint's ``ema.safetensors``, naming the file and key on a mismatch."""
    sd = ckpt.load_tensors(path, "ema")
    f = Path(path) / "ema.safetensors"
    for k, v in ema.shadow.items():
        if k not in sd:
            raise ckpt.CheckpointError(f"{f}: no tensor {k!r}; the EMA of every parameter is needed to resume "
                                       f"(has {len(sd)} tensors, e.g. {sorted(sd)[:3]})")
        if sd[k].shape != v.shape:
            raise ckpt.CheckpointError(f"{f}: {k} has shape {list(sd[k].shape)}, the model's is {list(v.shape)}")
    ema.load_state_dict({k: sd[k] for k in ema.shadow})


def find_resume(tc, root: Path) -> Path | None:
    if tc.resume in ("never", "none", ""):
        return None
    if tc.resume == "auto":
        return ckpt.latest_checkpoint(root) if root.is_dir() else None
    return ckpt.resolve_checkpoint(tc.resume)


def check_resume_meta(meta: dict, path: Path, store: TokenStore, gpt_cfg: GPTConfig, world: int, stage: int):
    from groupgen.layout import TokenLayout

    if meta.get("kind") != "ar":
        raise ckpt.CheckpointError(f"{path}: meta kind {meta.get('kind')!r}, expected 'ar'")
    TokenLayout.from_dict(meta["layout"]).check_same(store.layout, f"checkpoint {path}", f"token store {store.root}")
    if int(meta["num_classes"]) != store.num_classes:
        raise ckpt.CheckpointError(f"{path}: trained with {meta['num_classes']} classes, token store "
                                   f"{store.root} has {store.num_classes}")
    if meta.get("model") != dataclasses.asdict(gpt_cfg):
        diff = {k: (v, meta.get("model", {}).get(k)) for k, v in dataclasses.asdict(gpt_cfg).items()
                if meta.get("model", {}).get(k) != v}
        raise ConfigError(f"model config differs from checkpoint {path} (config vs checkpoint): {diff}")
    if not (path / "engine").is_dir():
        raise ckpt.CheckpointError(f"{path}: no DeepSpeed engine state (engine/) to resume from; use it "
                                   f"for inference or fine-tuning instead")
    if (meta.get("world_size"), meta.get("zero_stage")) != (world, stage) and stage > 0:
        raise ckpt.CheckpointError(f"{path}: saved with world_size={meta.get('world_size')} ZeRO-"
                                   f"{meta.get('zero_stage')}, now world_size={world} ZeRO-{stage}; "
                                   f"ZeRO partitions only reload at the same data-parallel size and stage")
