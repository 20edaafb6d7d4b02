"""Run-directory plumbing shared by every stage: seeds, threads, metrics JSONL, progress, ranks."""
from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write_text


def cores_per_rank() -> int:
    """This node's cores shared among the launcher's ranks on it (LOCAL_WORLD_SIZE; 1 rank without one)."""
    return max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def set_threads(n: int | None = None) -> int:
    """Pin intra-op threads (a 2-core box with a busy neighbour swings 100x otherwise). Unset, it is
    OMP_NUM_THREADS, else this node's cores shared among the launcher's ranks on it (the deepspeed
    launcher leaves OMP_NUM_THREADS unset: eight ranks each taking every core would thrash)."""
    n = n or int(os.environ.get("OMP_NUM_THREADS", "0")) or cores_per_rank()
    torch.set_num_threads(n)
    return n


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment (torchrun/deepspeed), else (0,1,0)."""
    from .distributed import rank_info
    return rank_info()


def default_device() -> torch.device:
    """This rank's GPU (cuda:LOCAL_RANK) where CUDA is present, else the CPU."""
    from .distributed import pick_device
    return pick_device("auto")


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA, or on the CPU when asked (oneDNN/AMX makes it ~6x faster there)."""
    enabled = precision == "bf16"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


class MetricsLog:
    """Append-only JSON lines (one object per logged step); rank 0 only."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **row) -> None:
        if not self.enabled:
            return
        row = {k: (float(v) if isinstance(v, (torch.Tensor, np.floating)) else v) for k, v in row.items()}
        for k, v in row.items():
            if isinstance(v, float) and not math.isfinite(v):
                row[k] = str(v)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint so the log equals an uninterrupted run's."""
        if not (self.enabled and self.path.is_file()):
            return
        keep = []
        for ln in self.path.read_text().splitlines():
            try:
                row = json.loads(ln)
            except json.JSONDecodeError:  # a line torn by a crash or a full disk mid-append
                continue
            if isinstance(row, dict) and row.get("step", -1) <= step:
                keep.append(ln)
        # atomic: a crash here must not lose the rows before the checkpoint
        atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def progress(iterable=None, total=None, desc: str = "", disable: bool | None = None, **kw):
    """tqdm on rank 0 to stderr; silent on other ranks or when GROUPGEN_QUIET=1."""
    from tqdm.auto import tqdm

    if disable is None:
        disable = dist_info()[0] != 0 or os.environ.get("GROUPGEN_QUIET") == "1"
    return tqdm(iterable, total=total, desc=desc, disable=disable, file=sys.stderr, dynamic_ncols=True,
                mininterval=1.0, **kw)


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


class StopSignals:
    """SIGTERM/SIGINT only record the signal; a trainer's loop reads it (all ranks agree through a
    reduction), saves a checkpoint and stops. ``install``/``restore`` or a ``with`` block; the
    previous handlers come back afterwards. Off the main thread nothing is installed."""

    def __init__(self):
        self.signum = 0
        self._prev: dict = {}

    @property
    def flag(self) -> bool:
        return self.signum > 0

    def _handle(self, signum, frame):
        self.signum = signum

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._prev[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, h in self._prev.items():
            signal.signal(s, h)
        self._prev = {}

    def __enter__(self) -> "StopSignals":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()


def lr_multiplier(step: int, steps: int, warmup_steps: int = 0, schedule: str = "constant",
                  min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based) of ``steps``: linear
    warmup, then constant or a cosine from 1 down to ``min_lr_ratio`` at the last step. A pure function
    of the step, so a resumed run follows the same schedule."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    t = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
