"""Reliability at the limits: a full disk (a small tmpfs where this test may mount one, else a simulated
ENOSPC), broken weights, a tokenizer that is not the prior's, and one-line errors for user mistakes."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _campaign import SAMPLE_ARGS, TOK_ARGS, TOK_CFG, finish, start
from _env import REPO
from groupgen import diskspace
from groupgen.checkpoint import CheckpointError, latest_checkpoint, load_tensors, save_checkpoint
from groupgen.diskspace import DiskFullError
from groupgen.layout import TokenLayout
from groupgen.tokens import TokenStoreWriter
from test_reliability_shared import batch, one_line


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of ``size`` at ``path`` (True), or a plain folder where mounting is not allowed (False)."""
    path.mkdir(parents=True, exist_ok=True)
    ok = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                              capture_output=True).returncode == 0
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(disk: Path, leave: int) -> None:
    """Fill the tmpfs until ``leave`` bytes are free."""
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def pretend_free(monkeypatch, free: int) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(diskspace.shutil, "disk_usage", lambda p: real(p)._replace(free=free))


LAYOUT = TokenLayout("grid", 16, (256, 256), h=4, w=4, image_size=16, channels=1)


# ================================================================================== 4. full disk
def test_token_store_checks_space_before_writing(tmp_path, monkeypatch):
    with small_disk(tmp_path / "disk", "256k") as real:
        disk = tmp_path / "disk"
        if real:
            fill(disk, 40_000)
        else:
            pretend_free(monkeypatch, 40_000)
        need = 5000 * 2 * 16 * 2 + 5000 * 8       # uint8 codes [5000, 2, 16, 2] + int64 labels
        with pytest.raises(DiskFullError) as e:
            TokenStoreWriter(disk / "store", LAYOUT, 5000, 2, 10)
        msg = str(e.value)
        assert f"token store at {disk / 'store'} needs" in msg and "free" in msg and "re-run" in msg, msg
        assert int(msg.split(" needs ")[1].split()[0]) >= need
        assert int(msg.split(" free")[0].split(", ")[-1].split()[0]) <= 40_000
        assert not (disk / "store" / "codes.npy").exists()
        w = TokenStoreWriter(disk / "small", LAYOUT, 100, 2, 10)   # what fits is written as before
        w.write_chunk(0, np.zeros((100, 2, 16, 2), np.uint8), np.zeros(100, np.int64))


def test_token_store_blocks_are_reserved_so_a_full_disk_is_no_sigbus(tmp_path, monkeypatch):
    """The free-space check can race with other writers: the memmaps' blocks are allocated up front,
    so a disk that fills later cannot kill the encoder with SIGBUS in the middle of a chunk."""
    w = TokenStoreWriter(tmp_path / "s", LAYOUT, 3000, 2, 10)
    codes = tmp_path / "s" / "codes.npy"
    assert codes.stat().st_blocks * 512 >= codes.stat().st_size   # not a sparse file
    del w

    def enospc(fd, off, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(diskspace.os, "posix_fallocate", enospc)
    with pytest.raises(DiskFullError, match=f"token store at {tmp_path / 'r' / 'codes.npy'} needs"):
        TokenStoreWriter(tmp_path / "r", LAYOUT, 3000, 2, 10)
    assert not (tmp_path / "r" / "codes.npy").exists()


def test_encode_on_a_full_disk_says_so_in_one_line(tmp_path, models):
    disk = tmp_path / "disk"
    with small_disk(disk, "512k") as real:
        if not real:
            pytest.skip("cannot mount a tmpfs here; the simulated ENOSPC cases above cover the check")
        fill(disk, 64 * 1024)
        argv = ["-m", "tokenizer.encode", "--ckpt", str(models["tok"]), "--out", str(disk / "store"), "split=train",
                "views=2", "device=cpu", "threads=1", "chunk_size=512", "data={limit: 20000}"]
        rc, _, err = finish(start(argv, tmp_path / "enc"))
        assert rc == 1 and "Traceback" not in err, (rc, err[-2000:])   # not -7 (SIGBUS)
        assert f"disk full: token store at {disk / 'store'} needs" in err and "free" in err, err[-2000:]


def test_checkpoint_on_a_full_disk_names_path_and_sizes_and_keeps_the_last_one(tmp_path, monkeypatch):
    disk = tmp_path / "disk"
    with small_disk(disk, "1m") as real:
        root = disk / "ck"
        save_checkpoint(root, 1, {"model": {"w": torch.ones(1000)}}, {"kind": "x"}, {"step": 1})
        big = {"model": {"w": torch.ones(300_000)}}            # 1.2 MB
        if real:
            fill(disk, 100_000)
        else:
            pretend_free(monkeypatch, 100_000)
            import groupgen.checkpoint as ck

            def full_save(*a, **k):
                raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
            monkeypatch.setattr(ck, "save_file", full_save)
        with pytest.raises(DiskFullError) as e:
            save_checkpoint(root, 2, big, {"kind": "x"}, {"step": 2})
        msg = str(e.value)
        assert f"checkpoint step_00000002 at {root} needs" in msg and "free" in msg, msg
        assert latest_checkpoint(root).name == "step_00000001" and load_tensors(root)["w"].shape == (1000,)
        assert not list(root.glob(".tmp-*"))


def test_ar_full_disk_then_resume_cleans_the_partial_engine_folder(tmp_path, store):
    from ar_model.train import ARTrainConfig, train
    from groupgen.config import load_config

    cfg = load_config(ARTrainConfig, None, ["model.preset=micro", "train.steps=2", "train.batch_size=8",
                                            "train.threads=1", "train.ckpt_every=1", "train.log_every=1"])
    disk = tmp_path / "disk"
    with small_disk(disk, "200k") as real:
        run = disk / "ar"
        if real:   # config.yaml and the log fit, a checkpoint (~1 MB with Adam) does not
            with pytest.raises(DiskFullError, match=f"checkpoint step 1 at {run / 'checkpoints'} needs"):
                train(cfg, store, run)
            subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
            assert latest_checkpoint(run / "checkpoints") is None
        else:      # what a save cut short by a full disk leaves
            (run / "checkpoints" / ".ds-step_00000001" / "engine").mkdir(parents=True)
            (run / "checkpoints" / ".ds-step_00000001" / "engine" / "mp_rank_00_model_states.pt").write_bytes(b"x")
        partial = sorted(p.name for p in (run / "checkpoints").glob(".*"))
        assert partial, "a save cut short leaves its staging folder"
        res = train(cfg, store, run)
        assert res["step"] == 2 and not list((run / "checkpoints").glob(".*-step_*"))
        assert latest_checkpoint(run / "checkpoints").name == "step_00000002"


def test_any_enospc_reaching_a_cli_is_one_line(tmp_path, capfd):
    from groupgen.cli import user_errors

    with pytest.raises(SystemExit) as e, user_errors("prog"):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl"))
    err = capfd.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1
    assert err.startswith(f"prog: error: disk full writing {tmp_path / 'metrics.jsonl'}, ") and "bytes free" in err
    with pytest.raises(ZeroDivisionError), user_errors("prog"):   # a bug keeps its traceback
        1 / 0


# ============================================================================ 5. weights and tokenizer
def test_nan_weights_and_truncated_weights_are_refused_naming_the_file(tmp_path, models):
    from safetensors.torch import load_file, save_file

    from ar_model.model import load_ar
    from sampling.sample import SamplingConfig, load_models

    ar = Path(shutil.copytree(models["ar"], tmp_path / "ar"))
    f = ar / "model.safetensors"
    sd = load_file(str(f))
    save_file({k: torch.full_like(v, float("nan")) for k, v in sd.items()}, str(f))
    with pytest.raises(CheckpointError, match=f"{f}: {len(sd)} of {len(sd)} tensors hold NaN or Inf"):
        load_ar(ar)
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        load_models(ar, None, "cpu", SamplingConfig(num_samples=2))
    save_file(sd, str(f))
    f.write_bytes(f.read_bytes()[:-100])                     # truncated (a full disk, a cut copy)
    with pytest.raises(CheckpointError, match=f"{f}: cannot read the weights .*truncated"):
        load_ar(ar)


def test_sampling_with_another_tokenizer_is_refused_unless_allowed(tmp_path, models, capfd):
    from sampling.sample import SamplingConfig, SamplingError, load_models, sample

    ar = Path(shutil.copytree(models["ar"], tmp_path / "ar"))
    meta = json.loads((ar / "meta.json").read_text())
    (ar / "meta.json").write_text(json.dumps(dict(meta, tokenizer_hash="0123456789abcdef")))
    with pytest.raises(SamplingError, match="hash 0123456789abcdef.*allow_tokenizer_mismatch=true"):
        load_models(ar, None, "cpu", SamplingConfig(num_samples=2))
    cfg = SamplingConfig(num_samples=2, batch_size=2, device="cpu", allow_tokenizer_mismatch=True)
    info = sample(cfg, ar, tmp_path / "out")
    assert info["num_samples"] == 2 and "allow_tokenizer_mismatch=true" in capfd.readouterr().err


# =========================================================================================== 6. messages
def test_user_mistakes_are_one_line_errors_and_write_nothing(tmp_path, models):
    main_cfg = str(REPO / "configs/main/fmnist.yaml")
    cases = {
        "tok_steps0": ["-m", "tokenizer.train", "--config", TOK_CFG, "--out", str(tmp_path / "t0"), *TOK_ARGS,
                       "train.steps=0"],
        "tok_log0": ["-m", "tokenizer.train", "--config", TOK_CFG, "--out", str(tmp_path / "t1"), *TOK_ARGS,
                     "train.log_every=0"],
        "tok_bad_key": ["-m", "tokenizer.train", "--config", TOK_CFG, "--out", str(tmp_path / "t2"), "train.stepz=3"],
        "samp_neg_cfg": ["-m", "sampling.sample", "--ckpt", str(models["ar"]), "--out", str(tmp_path / "s0"),
                         *SAMPLE_ARGS, "cfg_scale=-1.5"],
        "samp_bad_key": ["-m", "sampling.sample", "--ckpt", str(models["ar"]), "--out", str(tmp_path / "s1"),
                         "cfg_scal=2"],
        "main_bad_redo": ["-m", "groupgen.main", "--config", main_cfg, f"out={tmp_path / 'm0'}", "redo=[arr]"],
        "main_bad_key": ["-m", "groupgen.main", "--config", main_cfg, f"out={tmp_path / 'm1'}",
                         "ar.overrides=[train.stepz=3]"],
    }
    res = batch(cases, tmp_path)
    one_line(res["tok_steps0"], 2, r"train.steps must be >= 1, got 0")
    one_line(res["tok_log0"], 2, r"train.log_every must be >= 1, got 0")
    one_line(res["tok_bad_key"], 2, r"unknown config key 'train.stepz'")
    one_line(res["samp_neg_cfg"], 2, r"cfg_scale must be >= 0 .*got -1.5")
    one_line(res["samp_bad_key"], 2, r"unknown config key 'cfg_scal'")
    one_line(res["main_bad_redo"], 2, r"redo: unknown stages \['arr'\]")
    one_line(res["main_bad_key"], 2, r"unknown config key 'train.stepz'")
    assert not (tmp_path / "t0" / "checkpoints").exists() and not (tmp_path / "s0" / "samples.npz").exists()


def test_main_job_stopped_by_sigterm_says_rerunning_resumes(tmp_path):
    out = tmp_path / "run"
    tiny = ["threads=1", "tokenizer.overrides=[train.steps=2,train.batch_size=8,train.threads=1,train.sample_every=0,"
            "train.eval_every=0,data.limit=64,model.ch=8]", "encode.train_limit=64", "encode.val_limit=16"]
    argv = ["-m", "groupgen.main", "--config", str(REPO / "configs/main/fmnist.yaml"), f"out={out}", *tiny]
    p = start(argv, tmp_path / "main", ["--delay", "tokenizer.encode.encode=120"])   # parked in the encode stage
    t0 = time.monotonic()
    while not list(out.glob("2_encode-*")):
        assert p.poll() is None and time.monotonic() - t0 < 300, finish(p)[2][-2000:]
        time.sleep(0.1)
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    rc, _, err = finish(p, timeout=60)
    assert rc == 143 and "Traceback" not in err, (rc, err[-2000:])
    assert "stopped by SIGTERM" in err and "re-run the same command to resume" in err, err[-2000:]
    assert (next(out.glob("1_tokenizer-*")) / "DONE.json").is_file()   # the finished stage is kept


def test_main_job_says_how_to_resume_when_a_trainer_stops_on_a_signal(tmp_path, capfd):
    from pipeline.main import _run_until_signal

    class Pipe:   # what ar_model.train does on SIGTERM: checkpoint, then SystemExit(143)
        out = tmp_path

        def run(self):
            raise SystemExit(143)

    with pytest.raises(SystemExit) as e:
        _run_until_signal(Pipe())
    assert e.value.code == 143 and "re-run the same command to resume" in capfd.readouterr().err
