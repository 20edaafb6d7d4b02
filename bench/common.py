"""Shared benchmark plumbing: interleaved timing, machine facts, memory, matmul peak.

Timings on a shared 2-core box swing a lot, so every benchmark runs its cases interleaved
(A, B, A, B, ...) after a warmup and reports medians; ratios of medians taken in the same run are
what the reports quote, because a busy neighbour slows A and B alike.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


_CLOCK = {"fn": time.perf_counter}


def bench_parser(doc: str, reps: int) -> argparse.ArgumentParser:
    """The options every microbenchmark takes: --quick (tiny shapes, a smoke test), --threads,
    --reps, --json. Scripts add their own, then call ``parse_bench_args``."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few reps: a smoke test")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=reps)
    ap.add_argument("--json", default="", help="write all numbers here")
    return ap


def parse_bench_args(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    return a


def set_clock(kind: str) -> None:
    """``wall`` (default) or ``cpu`` (this process's CPU seconds). On a heavily shared machine run
    with one thread and ``cpu``: it counts the work done, not the time spent waiting for a core."""
    if kind not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {kind!r}")
    _CLOCK["fn"] = time.perf_counter if kind == "wall" else time.process_time


def now() -> float:
    return _CLOCK["fn"]()


def timed(fn: Callable[[], object]) -> float:
    t0 = now()
    fn()
    return now() - t0


def interleave(cases: dict[str, Callable[[], object]], reps: int, warmup: int = 1,
               log: Callable[[str], None] | None = print) -> dict[str, list[float]]:
    """Run each case ``warmup`` times, then ``reps`` rounds of every case in turn (A, B, A, B...).

    Returns the measured seconds per case (warmup excluded). Order within a round alternates so that
    neither case always runs right after the other (heat, caches, a neighbour's burst).
    """
    names = list(cases)
    for _ in range(warmup):
        for n in names:
            t = timed(cases[n])
            if log:
                log(f"  warmup {n}: {t:.3f}s")
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            t = timed(cases[n])
            times[n].append(t)
            if log:
                log(f"  rep {r} {n}: {t:.3f}s")
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> str:
    """min/median/max, for the report."""
    return f"{min(xs):.3f}/{statistics.median(xs):.3f}/{max(xs):.3f}"


# ----------------------------------------------------------------------------------- memory


def rss_mb() -> float:
    """Current resident set size (MiB) from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def hwm_mb() -> float:
    """Peak resident set size (MiB) since start or since the last ``reset_peak_rss``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs). False if not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------- machine


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def busy_processes(min_cpu: float = 20.0) -> list[str]:
    """Other processes using CPU right now (``ps``), to record how shared the machine was."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,rss,comm,args", "--sort=-pcpu"], capture_output=True,
                             text=True, timeout=5).stdout.splitlines()[1:]
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out:
        parts = line.split(None, 4)
        if len(parts) < 5 or int(parts[0]) == os.getpid():
            continue
        if float(parts[1]) >= min_cpu:
            rows.append(f"pid {parts[0]} {parts[1]}% cpu {int(parts[2]) // 1024} MiB: {parts[4][:80]}")
    return rows


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int) -> dict:
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg": [round(x, 2) for x in load_average()],
        "busy_processes": busy_processes(),
    }


# ----------------------------------------------------------------------------------- compute


def matmul_peak_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 9) -> float:
    """Median-of-``reps`` GFLOP/s of an ``n x n`` torch.matmul (the roofline the steps are judged by).

    Median, not best: on this VM single timings of the bf16 product ranged 650-1670 GFLOP/s within
    a minute (2026-11-24), and the best-of-5 once reported the 1670 outlier, against 760 best and
    655 median in a run of 7 right after; the steps themselves are reported as medians too.
    """
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.matmul(a, b)  # warm oneDNN
    return 2 * n**3 / median([timed(lambda: torch.matmul(a, b)) for _ in range(reps)]) / 1e9


def linear_params(module: torch.nn.Module) -> int:
    """Parameters that take part in matmuls (nn.Linear weights); embeddings are lookups."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def train_flops(module: torch.nn.Module, batch: int, seq: int, n_layer: int, dim: int) -> float:
    """FLOPs of one forward+backward: 6 * matmul params * tokens + 12 * n_layer * seq * dim * tokens
    (attention scores and weighted sum, PaLM appendix B convention, no causal discount)."""
    tokens = batch * seq
    return 6 * linear_params(module) * tokens + 12 * n_layer * seq * dim * tokens


def profile_table(fn: Callable[[], object], rows: int = 12, sort_by: str = "self_cpu_time_total") -> str:
    """Run ``fn`` once under torch.profiler and return the top ops (by self CPU time) as text."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=40)


def write_json(path: str | Path | None, obj: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=1, default=str))


@functools.lru_cache(maxsize=1)
def _tokenizer_defaults_json() -> str:
    """The tokenizer train config's defaults as JSON, built once (collect matches every kept record)."""
    from groupgen.config import load_config, to_dict
    from tokenizer.train import TokenizerTrainConfig

    return json.dumps(to_dict(load_config(TokenizerTrainConfig)), default=str)


def key_matches(old, key: dict) -> bool:
    """A kept seed record's key (``{"config": <tokenizer train config>, ...}``) equals ``key`` once the
    config fields it predates take their defaults (a field added later defaults to the old behaviour), so
    records written before it are still reused; everything outside ``config`` must match as is."""
    from groupgen.config import with_defaults

    if not isinstance(old, dict):
        return False
    if isinstance(old.get("config"), dict):
        old = {**old, "config": with_defaults(old["config"], json.loads(_tokenizer_defaults_json()))}
    return old == key
