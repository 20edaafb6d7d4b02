"""The DeepSpeed side of stage 2: the process group of a plain or launched run, the engine's config (the
ZeRO JSON under ``configs/deepspeed`` plus the train section's batch, clipping and precision), the module
the engine wraps, what the EMA averages, and releasing an engine. ``ar_model.train`` builds on these."""
from __future__ import annotations

import gc
import json
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ar_model.checkpointing import fp32_masters
from ar_model.model import GPT
from groupgen.config import ConfigError

if TYPE_CHECKING:
    from ar_model.train import TrainSection

REPO = Path(__file__).resolve().parents[1]
DS_CONFIG_DIR = REPO / "configs" / "deepspeed"


def free_port() -> int:
    """A TCP port free on this host now (a plain run's MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, int]:
    """Env defaults for a plain single process, then ``deepspeed.init_distributed`` (idempotent)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        # Without these DeepSpeed tries MPI discovery (mpi4py) and fails.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")   # read when deepspeed is first imported
    import deepspeed

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local % torch.cuda.device_count())
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(verbose=False)
    return rank, world, local


def ds_config(tc: TrainSection, world: int, bf16: bool) -> dict:
    """The engine's DeepSpeed config: the JSON of ``train.zero_stage`` (ZeRO, communication) with the train
    section's batch, clipping and precision."""
    path = DS_CONFIG_DIR / f"zero{tc.zero_stage}.json" if isinstance(tc.zero_stage, int) else Path(tc.zero_stage)
    if not path.is_file():
        raise ConfigError(f"train.zero_stage: DeepSpeed config {str(path)!r} does not exist")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
    for key in ("optimizer", "scheduler"):
        if key in d:   # a config optimizer JIT-builds fused_adam and bypasses our weight-decay groups
            raise ConfigError(f"{path}: remove {key!r}; the trainer passes its own AdamW and LR schedule")
    # The train config owns batch, clipping and precision; the JSON owns ZeRO and comm settings.
    d.update(train_micro_batch_size_per_gpu=tc.batch_size, gradient_accumulation_steps=tc.grad_accum,
             train_batch_size=tc.batch_size * tc.grad_accum * world, gradient_clipping=float(tc.clip),
             bf16={"enabled": bf16}, fp16={"enabled": False})
    d.setdefault("zero_optimization", {"stage": 0})
    stage = d["zero_optimization"].get("stage", 0)
    if stage == 3:
        # DeepSpeed's default swaps torch.nn.functional.linear for its own for the rest of the process
        # (the bias added in a second rounding): every later F.linear, sampling included, changed
        d["zero_optimization"]["memory_efficient_linear"] = False
    if bf16 and stage == 1:
        # bf16 gradients summed over micro-batches and ranks lose low bits; DeepSpeed's BF16_Optimizer
        # accumulates and reduces them in fp32 (ZeRO-1 only: ZeRO-0 has no such mode, ZeRO-2/3 reduce
        # in the model's dtype). The module weights stay bf16 with fp32 masters (BENCHMARKS.md).
        d.setdefault("data_types", {"grad_accum_dtype": "fp32"})
    if not torch.cuda.is_available():
        # no streams to overlap on the CPU accelerator; the JSON's setting is for GPUs
        d["zero_optimization"]["overlap_comm"] = False
    return d


class LossModule(torch.nn.Module):
    """What the engine wraps: forward = the GPT's training loss (so ZeRO hooks see the whole pass)."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, codes, labels):
        return self.gpt.loss(codes, labels)


def ema_source(engine) -> dict[str, torch.Tensor]:
    """What the EMA averages: each parameter's fp32 master under bf16 ZeRO-0 (the module holds
    bf16-rounded copies), else the parameter. ZeRO-1/2 partition the masters, and fetching them
    every step would be a collective: there the EMA averages the module's bf16 weights."""
    params = dict(engine.module.gpt.named_parameters())
    masters = fp32_masters(engine, local_only=True) or {}
    return {k: masters.get(id(p), p) for k, p in params.items()}


def release_engine(engine) -> None:
    """Free an engine's buffers and communication state before the next run in this process."""
    destroy = getattr(engine, "destroy", None)
    if callable(destroy):
        destroy()
    gc.collect()
