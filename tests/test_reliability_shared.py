"""Reliability under shared use: one owner per run folder (real concurrent processes), full disks (a small
tmpfs where this test may mount one, else simulated), bad data that ``data.skip_corrupt`` drops, broken
weights, and one-line errors for user mistakes."""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _campaign import HELPER, TOK_ARGS, TOK_CFG, finish, start
from _env import REPO, child_env
from groupgen import runlock
from groupgen.checkpoint import latest_checkpoint, load_tensors
from groupgen.data import DataConfig, DataError, build_dataset
from groupgen.runlock import RunLockedError, acquire
from groupgen.tokens import TokenStore

HOST = socket.gethostname()
HOLD = ("import sys, time\nfrom groupgen.runlock import acquire\nlock = acquire(sys.argv[1], 'test holder')\n"
        "print('held', flush=True)\ntime.sleep(600)\n")


def holder(folder: Path) -> subprocess.Popen:
    """A live process that owns ``folder`` until killed."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=REPO, env=child_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.strip() == "held", p.stderr.read()
    return p


def stop(p: subprocess.Popen) -> None:
    p.kill()
    p.wait()


def batch(cases: dict[str, list[str]], tmp: Path) -> dict[str, dict]:
    """Run ``python -m`` commands in one interpreter (tests/_kill_helpers.py --batch): exit code + stderr."""
    spec = [{"name": n, "module": a[1], "argv": a[2:]} for n, a in cases.items()]
    (tmp / "cases.json").write_text(json.dumps(spec))
    r = subprocess.run([sys.executable, HELPER, "--batch", str(tmp / "cases.json"), str(tmp / "res.json")],
                       cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert (tmp / "res.json").is_file(), r.stderr[-3000:]
    return {x["name"]: x for x in json.loads((tmp / "res.json").read_text())}


def one_line(res: dict, code: int, pattern: str) -> str:
    import re

    err = res["stderr"]
    assert res["code"] == code and "Traceback" not in err and re.search(pattern, err), (res["code"], err[-2000:])
    return err


# ================================================================================ 1. run folder owner
def test_two_tokenizer_trainers_on_one_folder_one_is_refused_the_other_finishes(tmp_path):
    run = tmp_path / "tok"
    argv = ["-m", "tokenizer.train", "--config", TOK_CFG, "--out", str(run), *TOK_ARGS]
    slow = ["--delay", "groupgen.runs.MetricsLog.write=1.5"]   # the first run stays busy for >= 12 s
    a = start(argv, tmp_path / "a", slow)
    t0 = time.monotonic()
    while not (run / "checkpoints" / "latest").is_file():      # a's first checkpoint is written
        assert a.poll() is None and time.monotonic() - t0 < 300, finish(a)[2][-2000:]
        time.sleep(0.05)
    b = start(argv, tmp_path / "b", slow)
    rc_b, _, err_b = finish(b)
    rc_a, out_a, err_a = finish(a)
    assert rc_a == 0, err_a[-3000:]
    assert rc_b == 1 and "Traceback" not in err_b, err_b[-3000:]
    assert f"is in use by pid {a.pid} on host {HOST} (tokenizer.train" in err_b, err_b
    # a's results are whole: every step logged once, the last checkpoint loads
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9)), steps
    assert latest_checkpoint(run / "checkpoints").name == "step_00000008"
    assert load_tensors(run / "checkpoints", "model") and not list((run / "checkpoints").glob(".tmp-*"))


def test_every_entry_point_refuses_a_folder_held_by_a_live_process(tmp_path, models, store):
    held = tmp_path / "held"
    held.mkdir()
    h = holder(held)
    try:
        cases = {
            "tok": ["-m", "tokenizer.train", "--config", TOK_CFG, "--out", str(held), *TOK_ARGS],
            "enc": ["-m", "tokenizer.encode", "--ckpt", str(models["tok"]), "--out", str(held), "split=test",
                    "views=1", "device=cpu", "data={limit: 8}"],
            "samp": ["-m", "sampling.sample", "--ckpt", str(models["ar"]), "--out", str(held), "num_samples=2",
                     "device=cpu"],
            "main": ["-m", "groupgen.main", "--config", str(REPO / "configs/main/fmnist.yaml"), f"out={held}"],
            "ar": ["-m", "ar_model.train", "--tokens", str(store), "--out", str(held), "model.preset=micro",
                   "train.steps=2", "train.threads=1"],
        }
        res = batch(cases, tmp_path)
    finally:
        stop(h)
    for name in cases:
        one_line(res[name], 1, rf"run folder {held} is in use by pid {h.pid} on host {HOST} \(test holder")
    assert sorted(p.name for p in held.iterdir()) == [runlock.LOCK_NAME]   # nothing written beside the lock


def test_lock_of_a_killed_holder_is_taken_over(tmp_path):
    h = holder(tmp_path)
    rec = json.loads((tmp_path / runlock.LOCK_NAME).read_text())
    assert rec["pid"] == h.pid and rec["host"] == HOST and rec["what"] == "test holder"
    with pytest.raises(RunLockedError, match=f"pid {h.pid} on host {HOST}"):
        acquire(tmp_path, "second")
    h.send_signal(signal.SIGKILL)   # no clean release: the record stays, the kernel drops the flock
    h.wait()
    lock = acquire(tmp_path, "second")
    assert json.loads((tmp_path / runlock.LOCK_NAME).read_text())["pid"] == os.getpid()
    again = acquire(tmp_path, "nested")       # the holder itself may take it again (a stage inside a job)
    again.release()
    assert json.loads((tmp_path / runlock.LOCK_NAME).read_text())["what"] == "second"
    lock.release()
    assert (tmp_path / runlock.LOCK_NAME).read_text() == ""   # released cleanly


def test_without_flock_the_record_is_the_lock(tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runlock.fcntl, "flock", no_locks)
    f = tmp_path / runlock.LOCK_NAME
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    f.write_text(json.dumps({"pid": int(dead.stdout), "host": HOST, "what": "dead run"}))
    lock = acquire(tmp_path, "taker")                             # a dead process on this host: taken over
    assert json.loads(f.read_text())["pid"] == os.getpid()
    lock.release()
    assert not f.exists()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        f.write_text(json.dumps({"pid": live.pid, "host": HOST, "what": "live run"}))
        with pytest.raises(RunLockedError, match=f"pid {live.pid} on host {HOST}"):
            acquire(tmp_path, "taker")
    finally:
        stop(live)
    f.write_text(json.dumps({"pid": 1, "host": "another-node", "what": "remote run"}))
    with pytest.raises(RunLockedError, match="remove .* by hand"):   # cannot tell whether it lives
        acquire(tmp_path, "taker")


DIST = """
import os, sys, torch.distributed as dist
from groupgen.runlock import RunLockedError, hold_run_folder
dist.init_process_group("gloo", init_method=sys.argv[2], rank=int(sys.argv[3]), world_size=2)
try:
    hold_run_folder(sys.argv[1], "dist test", rank=int(sys.argv[3]))
    print("held")
except RunLockedError as e:
    print("refused:", e)
dist.barrier()
"""


def test_distributed_ranks_all_learn_that_rank0_was_refused(tmp_path):
    h = holder(tmp_path / "run")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    try:
        ps = [subprocess.Popen([sys.executable, "-c", DIST, str(tmp_path / "run"), url, str(r)], cwd=REPO,
                               env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for r in (0, 1)]
        outs = [p.communicate(timeout=120) for p in ps]
    finally:
        stop(h)
    for (out, err), p in zip(outs, ps):
        assert p.returncode == 0 and out.startswith(f"refused: run folder {tmp_path / 'run'} is in use by pid "
                                                    f"{h.pid}"), (out, err[-2000:])


# ========================================================================== 2./3. bad and odd data
def _png(path: Path, value=0, mode="L", size=(12, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def _folder_with_bad_files(root: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """cat: 3 good + 1 truncated, dog: 2 good + 1 junk. Returns (expected (file, label) kept, bad)."""
    good = [("cat", f"{i}.png", i * 40) for i in range(3)] + [("dog", f"{i}.png", 200 + i * 20) for i in range(2)]
    for c, n, v in good:
        _png(root / c / n, v)
    cut = _png(root / "cat" / "3_cut.png", 99, size=(64, 64))
    cut.write_bytes(cut.read_bytes()[:60])
    junk = root / "dog" / "2_junk.png"
    junk.write_bytes(b"not a png")
    keep = [(str(root / c / n), 0 if c == "cat" else 1) for c, n, _ in good]
    return sorted(keep), sorted([str(cut), str(junk)])


def test_skip_corrupt_drops_samples_keeps_labels_and_lists_them(tmp_path, models, capfd):
    from tokenizer.encode import encode

    root = tmp_path / "imgs"
    keep, bad = _folder_with_bad_files(root)
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=8, channels=1)
    with pytest.raises(DataError, match=r"3_cut.png.*data.skip_corrupt=true"):   # the default names the way out
        [build_dataset(cfg, "train")[i] for i in range(7)]
    ds = build_dataset(DataConfig(**{**cfg.__dict__, "skip_corrupt": True}), "train")
    assert sorted((str(f), y) for f, y in ds.files) == keep and sorted(ds.skipped) == bad
    assert [ds[i][1] for i in range(len(ds))] == [y for _, y in sorted(keep)]       # no file stands in
    err = capfd.readouterr().err
    assert "dropped 2 unreadable files" in err and "3_cut.png" in err and "2_junk.png" in err
    # end to end: the token store holds the 5 readable images with their own labels; the run folder lists the rest
    out = encode(models["tok"], tmp_path / "store", DataConfig(**{**cfg.__dict__, "skip_corrupt": True}),
                 "train", views=1, batch_size=4)
    st = TokenStore(out)
    assert len(st) == 5 and st.labels.tolist() == [0, 0, 0, 1, 1]
    listed = json.loads((out / "skipped_files.json").read_text())
    assert listed["count"] == 2 and sorted(listed["files"]) == bad


def test_imagefolder_16bit_png_is_scaled_and_empty_class_is_named(tmp_path):
    a = np.full((16, 16), 32896, np.uint16)                  # mid grey in 16 bits (128 * 257)
    (tmp_path / "grey16").mkdir()
    Image.fromarray(a).save(tmp_path / "grey16" / "x.png")
    ds = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path), image_size=8, channels=3), "train")
    x, _ = ds[0]
    assert abs(float(x.mean())) < 0.01, float(x.mean())      # Pillow's own convert gives 1.0 (white)
    (tmp_path / "empty_cls").mkdir()
    (tmp_path / "empty_cls" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folders \['empty_cls'\] have no images"):
        build_dataset(DataConfig(name="imagefolder", root=str(tmp_path), image_size=8), "train")
