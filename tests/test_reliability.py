"""Reliability and security through the real CLIs: kill/resume, signals, atomic checkpoints, resumable
sampling/encoding, bad input with clear errors, untrusted files, determinism.

Subprocess work is gathered in the module fixture ``campaign`` and run concurrently (each job is a few
processes of ~10 s, mostly interpreter start-up); the tests then assert on its results. Fault injection
(slowed steps, a hang inside a checkpoint write) comes from ``tests/_kill_helpers.py``. Kill points
are random: set RELIABILITY_SEED to replay one (it is printed in failure messages).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from groupgen.checkpoint import (CheckpointError, latest_checkpoint, load_state, load_tensors, resolve_checkpoint,
                                 save_checkpoint)
from groupgen.config import load_config, to_dict
from groupgen.data import DataConfig, DataError, build_dataset
from groupgen.layout import TokenLayout
from groupgen.runs import MetricsLog, read_jsonl
from groupgen.tokens import TokenStore, TokenStoreError, TokenStoreWriter

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
HELPER = str(Path(__file__).with_name("_kill_helpers.py"))
SEED = int(os.environ.get("RELIABILITY_SEED") or random.SystemRandom().randrange(1 << 30))
WHY = f"(replay with RELIABILITY_SEED={SEED})"
STEPS = 8
TIMING = {"step_time", "elapsed_s", "tok_per_s", "img_per_s"}   # wall-clock fields: not part of a trajectory
SLOW_STEP = ["--delay", "groupgen.runs.MetricsLog.write=0.15"]   # >= 0.45 s between row k and the end

TOK_CFG = str(REPO / "configs/tokenizer/fmnist_mgvq_g4.yaml")
TOK_ARGS = ["data.image_size=16", "data.resize=resize", "data.limit=64", "model.image_size=16", "model.ch=8",
            "model.ch_mult=[1,2]", "model.z_channels=8", "model.embed_dim=8", "quantizer.codebook_size=16",
            "quantizer.revive_every=0", "loss.disc_weight=0.1", "loss.disc_start=3", "loss.disc_ndf=8",
            "loss.disc_layers=2", f"train.steps={STEPS}", "train.batch_size=8", "train.ckpt_every=1",
            "train.log_every=1", "train.sample_every=0", "train.eval_every=0", "train.threads=1", "train.device=cpu"]
AR_ARGS = ["model.preset=micro", "train.batch_size=8", "train.lr=3e-3", "train.log_every=1", "train.ckpt_every=1",
           f"train.steps={STEPS}", "train.seed=3", "train.threads=1", "train.warmup_steps=2", "train.schedule=cosine",
           "train.ema=0.9"]


def tok_argv(run, *extra):
    return ["-m", "tokenizer.train", "--config", TOK_CFG, "--out", str(run), *TOK_ARGS, *extra]


def ar_argv(store, run, *extra):
    return ["-m", "ar_model.train", "--tokens", str(store), "--out", str(run), *AR_ARGS, *extra]


# ------------------------------------------------------------------------------------- processes
def child_env(**extra) -> dict:
    # A launcher's (or an in-process DeepSpeed test's) rank/port variables must not leak into children.
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", GROUPGEN_QUIET="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), **extra)
    return env


def start(argv, logs: Path, helper=None) -> subprocess.Popen:
    cmd = [sys.executable, *([HELPER, *helper] if helper is not None else []), *argv]
    with open(f"{logs}.out", "w") as o, open(f"{logs}.err", "w") as e:
        p = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=o, stderr=e)
    p.logs = logs
    return p


def finish(p, timeout=400) -> tuple[int, str, str]:
    try:
        rc = p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise AssertionError(f"{p.args} timed out")
    return rc, Path(f"{p.logs}.out").read_text(), Path(f"{p.logs}.err").read_text()


def run_ok(argv, logs, helper=None) -> tuple[str, str]:
    rc, out, err = finish(start(argv, logs, helper))
    assert rc == 0, f"{argv} exited {rc}:\n{err[-3000:]}"
    return out, err


def interrupt_when(p, ready, sig, wait_max, rng) -> None:
    """Send ``sig`` once ``ready()`` holds, after a random extra wait (the kill point moves around)."""
    t0 = time.monotonic()
    while not ready():
        if p.poll() is not None:
            rc, _, err = finish(p)
            raise AssertionError(f"process ended (rc {rc}) before the interruption point {WHY}:\n{err[-2000:]}")
        if time.monotonic() - t0 > 300:
            p.kill()
            raise AssertionError("interruption point never reached")
        time.sleep(0.005)
    time.sleep(rng.uniform(0, wait_max))
    p.send_signal(sig)


def rows(run: Path) -> list[dict]:
    """Training rows of metrics.jsonl (a torn last line, as a kill may leave, is skipped here)."""
    f = Path(run) / "metrics.jsonl"
    out = []
    for ln in (f.read_text().splitlines() if f.is_file() else []):
        try:
            r = json.loads(ln)
        except ValueError:
            continue
        if "loss" in r:
            out.append(r)
    return out


def trajectory(run) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows(run)]


def last_row(run) -> int:
    r = rows(run)
    return r[-1]["step"] if r else 0


def latest_step(run) -> int | None:
    ck = latest_checkpoint(Path(run) / "checkpoints") if (Path(run) / "checkpoints").is_dir() else None
    return int(ck.name.split("_")[1]) if ck else None


def weights(run, step=STEPS) -> dict[str, str]:
    d = Path(run) / "checkpoints" / f"step_{step:08d}"
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.glob("*.safetensors"))}


def snapshot(d: Path) -> dict[str, str]:
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.rglob("*"))
            if f.is_file()}


class Payload:
    """Unpickling this creates ``path``: proof that loading a file executed code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ------------------------------------------------------------------------------------- fixtures
def make_store(root: Path, K=(8, 8), hw=(4, 4), n=64, views=2, classes=4, seed=0) -> Path:
    """Class-dependent codes with noise, written through the real TokenStoreWriter."""
    lay = TokenLayout("grid", hw[0] * hw[1], K, h=hw[0], w=hw[1], image_size=8, channels=1)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    pos = np.arange(lay.L)[None, None, :]
    codes = np.stack([(labels[:, None, None] + pos * (g + 1) + rng.integers(0, 2, (n, views, lay.L))) % k
                      for g, k in enumerate(K)], -1)
    w = TokenStoreWriter(root, lay, n, views, classes, chunk_size=32, class_names=[f"c{i}" for i in range(classes)])
    for c in range(w.num_chunks):
        a, b = w.chunk_range(c)
        w.write_chunk(c, codes[a:b], labels[a:b])
    w.finalize()
    return root


def make_models(root: Path) -> dict[str, Path]:
    """A random tokenizer (8x8 grey, 2x2 grid, G=2 x K=16) and a micro GPT naming it; real checkpoints."""
    from ar_model.model import GPT, ar_meta, gpt_config
    from tokenizer.model import ModelConfig, Tokenizer
    from tokenizer.quantize import QuantizerConfig
    from tokenizer.train import TokenizerTrainConfig

    torch.manual_seed(0)
    cfg = TokenizerTrainConfig(data=DataConfig(name="fmnist", image_size=8, channels=1, resize="resize", limit=40),
                               model=ModelConfig(image_size=8, channels=1, ch=8, ch_mult=[1, 2, 2], attn=False,
                                                 z_channels=8, embed_dim=8),
                               quantizer=QuantizerConfig(kind="multigroup", codebook_size=16, groups=2))
    tok = Tokenizer(cfg.model, cfg.quantizer).eval()
    tk = save_checkpoint(root / "tok", 0, {"model": tok.state_dict()},
                         {"kind": "tokenizer", "config": to_dict(cfg), "layout": tok.layout.to_dict()})
    gcfg = gpt_config("micro", dropout=0.0)
    gpt = GPT(gcfg, tok.layout, 3)
    with torch.no_grad():
        for p in gpt.parameters():   # zero-init heads would make every sample the same
            p.normal_(0, 0.3)
    ar = save_checkpoint(root / "ar", 0, {"model": gpt.state_dict()},
                         ar_meta(gcfg, tok.layout, 3, ["cat", "dog", "bird"], tokenizer=str(tk)))
    return {"tok": tk, "ar": ar}


SAMPLE_ARGS = ["num_samples=12", "batch_size=2", "seed=5", "cfg_scale=2.0", "top_k=8", "device=cpu",
               "grid_per_class=2"]
ENCODE_ARGS = ["split=test", "views=2", "batch_size=4", "chunk_size=4", "threads=1", "device=cpu", "data={limit: 40}"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def store(work) -> Path:
    return make_store(work / "store")


@pytest.fixture(scope="module")
def models(work) -> dict[str, Path]:
    return make_models(work / "models")


# --------------------------------------------------------------------------------- campaign jobs
def job_kill_resume(kind, run, store, k, wait, sig=signal.SIGKILL, helper=None) -> dict:
    """Interrupt a CLI training run once row ``k`` is logged (+``wait``), then rerun it to the end."""
    argv = tok_argv(run) if kind == "tokenizer" else ar_argv(store, run)
    p = start(argv, run.parent / f"{run.name}.kill", helper or SLOW_STEP)
    interrupt_when(p, lambda: last_row(run) >= k, sig, wait, random.Random(SEED + k))
    rc, out, err = finish(p)
    at = {"rc": rc, "row": last_row(run), "latest": latest_step(run), "out": out, "err": err}
    out, err = run_ok(argv, run.parent / f"{run.name}.resume")
    m = re.search(r"resumed from \S+ at step (\d+)" if kind == "tokenizer" else r"start step (\d+)", out + err)
    return {"k": k, "at_kill": at, "resumed_from": int(m.group(1)) if m else None, "run": run}


def job_signal(kind, run, store, k, sig) -> dict:
    argv = tok_argv(run) if kind == "tokenizer" else ar_argv(store, run)
    p = start(argv, run.parent / f"{run.name}.sig", SLOW_STEP)
    interrupt_when(p, lambda: last_row(run) >= k, sig, 0.1, random.Random(SEED))
    rc, out, err = finish(p)
    return {"rc": rc, "out": out, "err": err, "run": run}


def job_hang_save(kind, run, store, n) -> dict:
    """SIGKILL while the n-th checkpoint is half written (state.pt in its temp dir, not yet renamed)."""
    argv = tok_argv(run) if kind == "tokenizer" else ar_argv(store, run)
    marker = run.parent / f"{run.name}.in_save"
    p = start(argv, run.parent / f"{run.name}.hang", ["--hang-save", str(n), str(marker)])
    interrupt_when(p, marker.is_file, signal.SIGKILL, 0.0, random.Random(SEED))
    rc, _, err = finish(p)
    return {"rc": rc, "err": err, "run": run, "tmp_dirs": sorted(x.name for x in (run / "checkpoints").glob(".*-step_*"))}


def job_sampling(work, models) -> dict:
    out = work / "samp_kill"
    argv = ["-m", "sampling.sample", "--ckpt", str(models["ar"]), "--out", str(out), *SAMPLE_ARGS]
    p = start(argv, work / "samp_kill.kill", ["--delay", "numpy.savez=0.25"])
    shards = out / "shards"
    interrupt_when(p, lambda: len(list(shards.glob("chunk_*.npz"))) >= 2, signal.SIGKILL, 0.25, random.Random(SEED))
    rc, _, _ = finish(p)
    before = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in shards.glob("chunk_*.npz")}
    run_ok(argv, work / "samp_kill.resume")
    return {"rc": rc, "before": before, "out": out,
            "after": {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in shards.glob("chunk_*.npz")}}


def job_encode(work, models) -> dict:
    out = work / "enc_kill"
    argv = ["-m", "tokenizer.encode", "--ckpt", str(models["tok"]), "--out", str(out), *ENCODE_ARGS]
    p = start(argv, work / "enc_kill.kill", ["--delay", "groupgen.tokens.TokenStoreWriter.write_chunk=0.2"])
    interrupt_when(p, lambda: len(list((out / "done").glob("*"))) >= 3 if (out / "done").is_dir() else False,
                   signal.SIGKILL, 0.2, random.Random(SEED))
    rc, _, _ = finish(p)
    before = {f.name: f.stat().st_mtime_ns for f in (out / "done").iterdir()}
    text, _ = run_ok(argv, work / "enc_kill.resume")
    return {"rc": rc, "before": before, "after": {f.name: f.stat().st_mtime_ns for f in (out / "done").iterdir()},
            "report": json.loads(text.strip().splitlines()[-1]), "out": out}
