"""Train a comparison's rows in several worker processes (``pipeline.compare`` with ``jobs: N``).

On a small host one process per core at one thread each gets more from the cores than one process
at N threads (the study protocol's "two rows as two 1-thread processes"). Rows that share a tokenizer
(MGVQ with both head kinds) go to the same worker, and the groups are dealt round-robin; each worker
gets its rows as ``select=[...]`` appended to the caller's overrides and stops after them
(``--rows-only``: no yardsticks, no tables). Workers therefore write disjoint stage folders. Then the
caller runs the whole comparison in its own process, where every row's stages are finished and reused,
so the floor, the baseline and the tables are computed once, by one process. A SIGTERM or Ctrl-C to
the caller stops every worker (each trainer checkpoints and resumes next time).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

# a single-process trainer sets these for itself (a free port each): a worker must pick its own, not
# inherit its caller's (two workers on one MASTER_PORT fail with EADDRINUSE)
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def deal_rows(rows: list[tuple[str, object]], jobs: int) -> list[list[str]]:
    """``rows``: (name, tokenizer key) in run order. Rows with equal keys stay together; the groups are
    dealt round-robin (equal-cost rows split evenly). Returns each worker's row names, none empty."""
    groups: dict[object, list[str]] = {}
    for name, key in rows:
        groups.setdefault(key, []).append(name)
    workers: list[list[str]] = [[] for _ in range(min(jobs, len(groups)))]
    for k, names in enumerate(groups.values()):
        workers[k % len(workers)] += names
    return workers


def worker_commands(config: str, overrides: list[str], groups: list[list[str]]) -> list[list[str]]:
    """One command line per worker, training the rows ``groups[k]``."""
    return [[sys.executable, "-m", "pipeline.compare", "--config", config, *overrides,
             f"select=[{','.join(g)}]", "--rows-only"] for g in groups]


def _rows_of(cmd: list[str]) -> str:
    return cmd[cmd.index("--rows-only") - 1]   # the worker's select=[...]


def run_workers(cmds: list[list[str]], log=print) -> None:
    """Start every worker, wait for all; raise SystemExit with the first failure's code."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("pipeline.compare jobs > 1: runs single-process workers; not under a multi-rank launcher "
                         f"(WORLD_SIZE={os.environ['WORLD_SIZE']})")
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    procs, stopped = [], []

    def stop(signum, _frame):
        # forward only: the handler runs inside the main loop's Popen.wait, which holds that Popen's
        # (non-reentrant) wait lock, so waiting here would deadlock; the loop reaps the workers
        stopped.append(signum)
        for p in procs:
            if p.returncode is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for c in cmds:
            log(f"worker {len(procs)}: {_rows_of(c)}")
            procs.append(subprocess.Popen(c, env=env))
        codes = [p.wait() for p in procs]
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if stopped:
        raise SystemExit(128 + stopped[0])
    bad = [(k, rc) for k, rc in enumerate(codes) if rc != 0]
    if bad:
        k, rc = bad[0]
        raise SystemExit(f"pipeline.compare: worker {k} ({_rows_of(cmds[k])}) "
                         f"failed with exit code {rc}; finished stages are kept, rerun to continue")
