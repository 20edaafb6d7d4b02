"""Stage-2 trainer: a class-conditional GPT on a token store, with DeepSpeed (ZeRO 0-3).

    python -m ar_model.train --config configs/ar/fmnist_tiny.yaml --tokens DIR [--out RUN] [k=v ...]
    torchrun --nproc_per_node 2 -m ar_model.train --config ... --tokens DIR
    deepspeed --num_gpus 2 --module ar_model.train --config ... --tokens DIR

From Python (one process, no launcher; callable repeatedly): ``train(cfg, tokens_dir, out_dir)``.

Checkpoint directory (``RUN/checkpoints/step_XXXXXXXX``, written through ``groupgen.checkpoint``):
  model.safetensors / ema.safetensors  full fp32 weights for inference (``load_ar``; under bf16 the
                                       optimizer's fp32 masters, not the module's bf16 copies)
  meta.json                            ``ar_meta``: layout, classes, tokenizer + hash, train config
  state.pt                             step, data position, loss-log window, per-rank RNG
                                       (``weights_only`` load)
  engine/                              DeepSpeed ``save_checkpoint`` (module, optimizer, scheduler;
                                       ZeRO partitions per rank) - what exact resume reloads
The ``engine/`` part needs the same ZeRO stage and data-parallel size to resume, and a filesystem
that every rank sees.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

if __package__ in (None, ""):  # run as a file (e.g. the deepspeed launcher without --module)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from ar_model.checkpointing import (check_resume_meta, clean_partial_saves, find_resume, load_ema,
                                    load_resume_state, save_training_checkpoint, vet_engine_files)
from ar_model.cpu import dispatch
from ar_model.data import Prefetch, TokenBatches, split_indices, val_batches
from ar_model.ema import EMA
from ar_model.engine import LossModule, ds_config, ema_source, init_distributed, release_engine
from ar_model.model import GPT, GPTConfig, ar_meta, gpt_config, make_adamw
from groupgen import checkpoint as ckpt
from groupgen.cli import user_errors
from groupgen.config import ConfigError, load_config, save_config, to_dict
from groupgen.diskspace import disk_full_guard
from groupgen.runlock import hold_run_folder
from groupgen.runs import (MetricsLog, StopSignals, Timer, lr_multiplier, progress, read_jsonl, seed_everything,
                           set_threads)
from groupgen.tokens import TokenStore

class TrainingDiverged(FloatingPointError):
    """The loss became NaN/Inf; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------------- config
def _model_section() -> type:
    """``model:`` = ``preset`` + every GPTConfig field as an optional override (None: preset's value)."""
    hints = typing.get_type_hints(GPTConfig)
    fields = [("preset", str, field(default="B"))]
    fields += [(f.name, typing.Optional[hints[f.name]], field(default=None)) for f in dataclasses.fields(GPTConfig)]
    cls = dataclasses.make_dataclass("ModelSection", fields)
    cls.__module__ = __name__
    return cls


ModelSection = _model_section()


@dataclass
class TrainSection:
    steps: int = 1000
    batch_size: int = 8                    # per rank and micro-batch
    grad_accum: int = 1
    lr: float = 1e-4                       # LlamaGen: 1e-4 per 256 images of global batch (set it yourself)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0              # cosine ends at lr * min_lr_ratio
    clip: float = 1.0                      # 0: no clipping
    precision: Literal["auto", "fp32", "bf16", "fast"] = "auto"   # auto: bf16 on GPU, fp32 on CPU; fast: see use_bf16
    zero_stage: int | str = 0              # 0..3 -> configs/deepspeed/zero{N}.json, or a JSON path
    ema: float = 0.0                       # EMA decay; 0 = off
    log_every: int = 10
    eval_every: int = 0                    # 0 = only at the end (when a validation set exists)
    val_tokens: str = ""                   # held-out token store (wins over val_split), or ...
    val_split: float = 0.0                 # ... this fraction of the training store held out
    eval_batches: int = 0                  # cap on validation batches per rank; 0 = all
    ckpt_every: int = 1000
    keep_last: int = 3
    seed: int = 0
    threads: int = 0                       # intra-op threads per rank; 0 = OMP_NUM_THREADS or all cores
    resume: str = "auto"                   # auto: RUN/checkpoints/latest if any; never; or a checkpoint path
    stop_at: int = 0                       # stop (with a checkpoint) after this step, as if preempted; 0 = off

    def validate(self) -> None:
        def bad(key, msg):
            raise ConfigError(f"train.{key}: {msg}")
        for key in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, key) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("warmup_steps", "eval_every", "ckpt_every", "keep_last", "eval_batches", "stop_at", "threads"):
            if getattr(self, key) < 0:
                bad(key, f"must be >= 0, got {getattr(self, key)}")
        if not self.lr > 0:
            bad("lr", f"must be > 0, got {self.lr}")
        if not 0.0 <= self.ema < 1.0:
            bad("ema", f"decay must be in [0, 1), got {self.ema}")
        if not 0.0 <= self.val_split < 1.0:
            bad("val_split", f"must be in [0, 1), got {self.val_split}")
        if isinstance(self.zero_stage, int) and self.zero_stage not in (0, 1, 2, 3):
            bad("zero_stage", f"must be 0..3 or a DeepSpeed JSON path, got {self.zero_stage}")


@dataclass
class ARTrainConfig:
    model: ModelSection = field(default_factory=ModelSection)  # type: ignore[valid-type]
    train: TrainSection = field(default_factory=TrainSection)
    tokens: str = ""                       # token store (the --tokens argument wins)
    out: str = ""                          # run directory (the --out argument wins)


def use_bf16(precision: str) -> bool:
    """Whether a run of ``train.precision`` trains in bf16: ``auto`` on a GPU only (fp32 on every CPU, so a
    CPU run's numbers do not depend on the CPU's kind); ``fast`` wherever bf16 trains faster than fp32
    (a GPU; a CPU with AMX, or AMD's AVX512-BF16: ``dispatch.bf16_trains_faster``)."""
    if precision in ("fp32", "bf16"):
        return precision == "bf16"
    gpu = torch.cuda.is_available()
    if precision == "auto":
        return gpu
    return dispatch.bf16_trains_faster(torch.device("cuda" if gpu else "cpu"))


def resolve_gpt_config(sec) -> GPTConfig:
    kw = {k: v for k, v in dataclasses.asdict(sec).items() if k != "preset" and v is not None}
    try:
        return gpt_config(sec.preset, **kw)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def lr_lambda(tc: TrainSection) -> Callable[[int], float]:
    """Multiplier of ``lr`` for optimizer step ``s`` (0-based): linear warmup, then constant/cosine."""
    return lambda s: lr_multiplier(s, tc.steps, tc.warmup_steps, tc.schedule, tc.min_lr_ratio)


# ---------------------------------------------------------------------------------- training
@torch.no_grad()
def evaluate(engine, store: TokenStore, indices: np.ndarray, tc: TrainSection, rank: int, world: int,
             device, bf16: bool) -> tuple[float, list[float]]:
    """Mean validation CE (and per group) over held-out samples, averaged over all ranks' samples."""
    gpt = engine.module.gpt
    was = gpt.training
    gpt.eval()
    tot = torch.zeros(1 + store.layout.G, dtype=torch.float64, device=device)
    n = torch.zeros(1, dtype=torch.float64, device=device)
    for codes, labels, w in val_batches(store, indices, tc.batch_size, rank, world, tc.eval_batches):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, per = engine(codes.to(device), labels.to(device))
        tot += torch.cat([loss.detach().reshape(1), per.detach()]).double() * w
        n += w
    gpt.train(was)
    torch.distributed.all_reduce(tot)
    torch.distributed.all_reduce(n)
    v = (tot / n.clamp_min(1)).tolist()
    return v[0], v[1:]


def train(cfg: ARTrainConfig, tokens_dir: str | Path | None = None, out_dir: str | Path | None = None,
          on_step: Callable[[int, float], None] | None = None) -> dict:
    """Train (or resume) a GPT; returns final metrics. ``on_step(step, loss)`` runs after every step."""
    cfg = dataclasses.replace(cfg)
    cfg.tokens = str(tokens_dir or cfg.tokens)
    cfg.out = str(out_dir or cfg.out or Path("runs") / "ar" / cfg.model.preset)
    if not cfg.tokens:
        raise ConfigError("no token store given (--tokens DIR or tokens: in the config)")
    tc = cfg.train
    gpt_cfg = resolve_gpt_config(cfg.model)
    cfg.model = ModelSection(preset=cfg.model.preset, **dataclasses.asdict(gpt_cfg))   # resolved, for config.yaml

    store = TokenStore(cfg.tokens)
    layout = store.layout
    if tc.val_tokens:
        val_store = TokenStore(tc.val_tokens)
        layout.check_same(val_store.layout, f"token store {store.root}", f"validation store {val_store.root}")
        train_idx, val_idx = np.arange(len(store)), np.arange(len(val_store))
    else:
        val_store = store
        train_idx, val_idx = split_indices(len(store), tc.val_split)

    rank, world, _ = init_distributed()
    import deepspeed

    threads = set_threads(tc.threads or None)
    run = Path(cfg.out)
    root = run / "checkpoints"
    resume_from = find_resume(tc, root)
    bf16 = use_bf16(tc.precision)
    ds_cfg = ds_config(tc, world, bf16)
    stage = int(ds_cfg["zero_optimization"].get("stage", 0))
    if tc.ema and stage == 3:
        raise ConfigError("train.ema is not supported with ZeRO-3 (parameters are partitioned)")
    st: dict = {}
    if resume_from is not None:   # fail fast, before any engine is built
        check_resume_meta(ckpt.load_meta(resume_from), resume_from, store, gpt_cfg, world, stage)
        st = load_resume_state(resume_from)
    run_lock = hold_run_folder(run, "ar_model.train", rank)  # noqa: F841 (held until train returns)
    if rank == 0:
        clean_partial_saves(root)

    seed_everything(tc.seed)                     # identical init on every rank
    if stage == 3:
        # each rank holds its partition from the start (not the whole fp32 model: 12 GB for GPT-3B per
        # rank), initialised module by module exactly as a whole model would be
        with deepspeed.zero.Init(config_dict_or_path=ds_cfg, mem_efficient_linear=False):
            gpt = GPT(gpt_cfg, layout, store.num_classes, init=False)
        gpt.init_parameters(gather=lambda ps: deepspeed.zero.GatheredParameters(ps, modifier_rank=0))
    else:
        gpt = GPT(gpt_cfg, layout, store.num_classes)
    gpt.check_inputs = False                     # the store validated every code on open; skip the syncs
    torch.manual_seed(tc.seed * 1_000_003 + 7919 * (rank + 1))   # per-rank dropout / class-drop stream
    n_params = gpt.num_params()
    lam = lr_lambda(tc)
    opt = make_adamw(gpt, tc.lr, tc.betas, tc.weight_decay)
    engine, _, _, _ = deepspeed.initialize(
        model=LossModule(gpt), optimizer=opt, config=ds_cfg,
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lam))
    device = engine.device if isinstance(engine.device, torch.device) else torch.device(engine.device)
    gpt = engine.module.gpt

    step, pos = 0, 0
    if resume_from is not None:
        elastic = ds_cfg["zero_optimization"].get("elastic_checkpoint", False)   # then a rank reads every partition
        vet_engine_files(Path(resume_from) / "engine", None if elastic else rank)   # the files this rank opens
        path, _ = engine.load_checkpoint(str(resume_from), tag="engine", load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise ckpt.CheckpointError(f"{resume_from}/engine: DeepSpeed could not load the engine state")
        step, pos = int(st["step"]), int(st["data_pos"])
        if len(st.get("rng", [])) == world:
            ckpt.set_rng_state(st["rng"][rank])
        elif rank == 0:   # ZeRO-0 reloads at another world size; its per-rank RNG streams do not
            warnings.warn(f"{resume_from}/state.pt: RNG state of {len(st.get('rng', []))} ranks, now {world}; "
                          f"not restored, so this resume will not reproduce an uninterrupted run exactly")
    ema = None
    if tc.ema and rank == 0:
        ema = EMA(ema_source(engine), tc.ema)
        if resume_from is not None:
            load_ema(ema, resume_from)

    batches = TokenBatches(store, train_idx, tc.batch_size, tc.seed, rank, world)
    metrics = MetricsLog(run / "metrics.jsonl", enabled=rank == 0)
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / "config.yaml")
        metrics.truncate_after(step)
    h = store.header
    meta = ar_meta(gpt_cfg, layout, store.num_classes, class_names=h.get("class_names") or None,
                   tokenizer=h.get("tokenizer"), tokenizer_hash=h.get("tokenizer_hash"),
                   train_config=to_dict(cfg), tokens=str(store.root), engine="deepspeed", zero_stage=stage,
                   world_size=world, precision="bf16" if bf16 else "fp32")
    uniform = float(np.mean([math.log(k) for k in layout.K]))
    G = layout.G

    def save(at: int) -> Path:
        # the loss window too: a resume then logs the same means as an uninterrupted run
        state = {"step": at, "data_pos": pos, "world_size": world, "log_window": win.clone(), "log_window_n": win_n}
        # DeepSpeed's torch.save on a full disk says "iostream error"; ~16 bytes/parameter (weights, Adam)
        with disk_full_guard(root, 16 * n_params, f"checkpoint step {at}"):
            return save_training_checkpoint(engine, root, at, meta, state, stage, rank, tc.keep_last, ema)

    def run_eval(at: int) -> dict:
        if len(val_idx) == 0:
            return {}
        vl, vg = evaluate(engine, val_store, val_idx, tc, rank, world, device, bf16)
        row = dict(step=at, val_loss=vl, **{f"val_loss_g{g}": x for g, x in enumerate(vg)}, uniform=uniform)
        metrics.write(**row)
        return row

    stop = StopSignals()
    stop.install()
    last, last_val, last_ckpt = {}, {}, (resume_from if resume_from else None)
    win, win_n = _log_window(st, G, resume_from)
    timer, tok_time, tok_count = Timer(), 0.0, 0
    bar = progress(total=tc.steps, initial=step, desc=f"ar {cfg.model.preset}")
    if rank == 0:
        print(f"[ar-train] {n_params / 1e6:.2f}M params, layout {layout.describe()}, {len(train_idx)} train / "
              f"{len(val_idx)} val samples, world {world}, ZeRO-{stage}, {'bf16' if bf16 else 'fp32'}, "
              f"{threads} threads, start step {step}", file=sys.stderr)
    start = step
    feed = Prefetch(batches, device)
    pending = None   # (step, reduced tensor, async handle, start time, data position, grad norm) of the last step
    lr_of: dict[int, float] = {}

    def settle(until: float | None = None) -> bool:
        """Read the last step's reduced losses and stop flag (waits for them), check, log. Returns
        whether a stop was requested. The step's time runs to ``until`` (the next step's start)."""
        nonlocal pending, last, tok_time, tok_count, win, win_n
        if pending is None:
            return False
        at, red, work, t_at, pos_at, gn = pending
        pending = None
        if work is not None:
            work.wait()
        red = red.cpu()
        dt = (timer() if until is None else until) - t_at
        losses, stop_now = red[:-1] / world, red[-1].item() > 0
        if not torch.isfinite(losses).all():
            raise TrainingDiverged(f"non-finite loss {losses[0].item()} at step {at}; training stopped, "
                                   f"last good checkpoint: {last_ckpt or 'none'}")
        if at > 1 or resume_from is not None:   # the first step pays one-off setup costs
            tok_time += dt
            tok_count += tc.batch_size * tc.grad_accum * world * layout.L
        win += losses
        win_n += 1
        if on_step is not None:
            on_step(at, losses[0].item())
        lr_at = lr_of.pop(at)
        if at % tc.log_every == 0 or at == tc.steps:
            m = (win / win_n).tolist()
            last = dict(step=at, loss=m[0], **{f"loss_g{g}": x for g, x in enumerate(m[1:])},
                        uniform=uniform, lr=lr_at, **({} if gn is None else {"grad_norm": float(gn)}),
                        tok_per_s=tok_count / tok_time if tok_time else None,
                        img_per_s=tok_count / layout.L / tok_time if tok_time else None,
                        epoch=batches.epoch_of(pos_at), elapsed_s=timer())
            metrics.write(**last)
            bar.set_postfix(loss=f"{m[0]:.4f}")
            win.zero_()
            win_n = 0
        return stop_now

    stop_seen = False
    try:
        gpt.train()
        while step < tc.steps:
            t0 = timer()
            lr_of[step + 1] = engine.get_lr()[0]   # the rate this step uses (get_lr after = the next)
            acc = torch.zeros(1 + G, dtype=torch.float64, device=device)
            for _ in range(tc.grad_accum):
                codes, labels = feed.take(pos)      # already on the device; pos + 1 is on its way
                pos += 1
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss, per = engine(codes, labels)
                engine.backward(loss)
                engine.step()
                acc += torch.cat([loss.detach().reshape(1), per.detach()]).double()
            if ema is not None:
                ema.update(ema_source(engine), step)
            step += 1
            # The previous step's numbers are read now, while this step runs on the GPU: no sync per
            # step. So a stop request (or a non-finite loss) is seen one step later than it happened.
            stop_seen = settle(until=t0) or stop_seen
            # One small all-reduce per step: the rank-mean loss (logging, NaN check) and the stop flag.
            red = torch.cat([acc / tc.grad_accum, torch.tensor([float(stop.signum > 0)], dtype=torch.float64,
                                                               device=device)])
            work = torch.distributed.all_reduce(red, async_op=True)
            pending = (step, red, work, t0, pos, engine.get_global_grad_norm())   # the norm as is: no sync
            bar.update(1)
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
                stop_seen = settle() or stop_seen
                last_val = run_eval(step)
            stopping = stop_seen or (tc.stop_at and step >= tc.stop_at)
            if step == tc.steps or stopping or (tc.ckpt_every and step % tc.ckpt_every == 0):
                stop_seen = settle() or stop_seen   # a checkpoint holds every logged step and never a NaN one
                stopping = stopping or stop_seen
                # the loss of this step was finite, but its update may not be: never save (and call
                # "last good") weights that are not
                bad = torch.tensor([float(not all_finite(gpt))], dtype=torch.float64, device=device)
                torch.distributed.all_reduce(bad)
                if bad.item() > 0:
                    raise TrainingDiverged(f"non-finite weights after the update at step {step}; training stopped, "
                                           f"last good checkpoint: {last_ckpt or 'none'}")
                last_ckpt = save(step)
            if stopping:
                break
        settle()
        if step >= tc.steps and step > start:   # a finished run that is called again does not re-log
            last_val = run_eval(step) or last_val
    finally:
        bar.close()
        stop.restore()
        release_engine(engine)
    if not last and rank == 0 and (run / "metrics.jsonl").is_file():   # nothing left to train: report the log's end
        rows = read_jsonl(run / "metrics.jsonl")
        last = next((r for r in reversed(rows) if "loss" in r), {})
        last_val = next((r for r in reversed(rows) if "val_loss" in r), {})
    out = dict(step=step, loss=last.get("loss"), val_loss=last_val.get("val_loss"), uniform=uniform,
               tok_per_s=tok_count / tok_time if tok_time else None, checkpoint=str(last_ckpt) if last_ckpt else None,
               run_dir=str(run), params=n_params, world_size=world, zero_stage=stage,
               precision="bf16" if bf16 else "fp32", stopped_early=step < tc.steps)
    if stop.signum == signal.SIGINT:
        raise KeyboardInterrupt(f"interrupted at step {step}; checkpoint {last_ckpt}")
    if stop.signum == signal.SIGTERM:
        raise SystemExit(128 + signal.SIGTERM)
    return out


def all_finite(gpt: GPT) -> bool:
    """Whether every weight this rank holds is finite: under ZeRO-3 a parameter is an empty
    placeholder and the rank holds its partition (``ds_tensor``), which is what must be checked."""
    return all(torch.isfinite(getattr(p, "ds_tensor", p).detach()).all() for p in gpt.parameters())


def _log_window(st: dict, G: int, where) -> tuple[torch.Tensor, int]:
    """The losses summed since the last log line, from a resumed trainer state (empty when the
    checkpoint predates saving it)."""
    if "log_window" not in st:
        return torch.zeros(1 + G, dtype=torch.float64), 0
    win = st["log_window"]
    if not isinstance(win, torch.Tensor) or tuple(win.shape) != (1 + G,):
        got = tuple(win.shape) if isinstance(win, torch.Tensor) else type(win).__name__
        raise ckpt.CheckpointError(f"{where}/state.pt: 'log_window' is {got}, expected a tensor of shape ({1 + G},)")
    return win.to(torch.float64).clone(), int(st.get("log_window_n", 0))


# ---------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML with model:/train: sections (configs/ar/*.yaml)")
    p.add_argument("--tokens", help="token store directory")
    p.add_argument("--out", help="run directory (config.yaml, metrics.jsonl, checkpoints/)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.steps=100")
    a = p.parse_intermixed_args(argv)
    if a.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(a.local_rank))
    try:
        cfg = load_config(ARTrainConfig, a.config, a.overrides)
        resolve_gpt_config(cfg.model)
    except ConfigError as e:
        p.error(str(e))
    with user_errors(p.prog, (ckpt.CheckpointError,)):
        res = train(cfg, a.tokens, a.out)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as e:
        print(f"[ar-train] {e}", file=sys.stderr)
        sys.exit(130)
