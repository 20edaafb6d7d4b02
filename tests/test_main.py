"""The main job end to end on a tiny budget: every artefact exists and is valid; re-runs reuse stages."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from _env import REPO, child_env


TINY = [
    "threads=1",
    "tokenizer.overrides=[train.steps=6,train.batch_size=8,train.threads=1,train.sample_every=3,train.eval_every=3,"
    "train.eval_batches=1,train.ckpt_every=3,data.limit=256,model.ch=8]",
    "encode.train_limit=128", "encode.val_limit=32", "encode.batch_size=64",
    "ar.overrides=[model.preset=micro,train.steps=6,train.batch_size=8,train.threads=1,train.eval_every=3,"
    "train.ckpt_every=3,train.warmup_steps=1]",
    "sampling.overrides=[per_class=2,batch_size=20,grid_per_class=2]",
    "eval.real_n=200", "eval.overrides=[domain.train_limit=1000,domain.epochs=1,batch_size=50]",
]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "groupgen.main", "--config", str(REPO / "configs/main/fmnist.yaml"),
           f"out={out}", *TINY, *extra]
    env = child_env(GROUPGEN_CACHE=str(out.parent / "cache"))
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_main_job_tiny_budget(tmp_path):
    out = tmp_path / "run"
    r = _run(out)
    assert r.returncode == 0, r.stderr[-4000:]
    for name in ("grid.png", "recon.png", "samples.npz", "metrics.json", "report.md", "config.yaml"):
        assert (out / name).is_file(), name
    with Image.open(out / "grid.png") as im:
        im.load()
        assert im.size[0] > 0 and im.size[1] > 0
    with Image.open(out / "recon.png") as im:
        im.load()
    d = np.load(out / "samples.npz", allow_pickle=False)
    assert d["arr_0"].dtype == np.uint8 and d["arr_0"].shape == (20, 32, 32, 3)
    assert d["labels"].dtype == np.int64 and sorted(set(d["labels"].tolist())) == list(range(10))
    m = json.loads((out / "metrics.json").read_text())
    g = m["generation"]
    for k in ("fid", "is", "class_acc", "classifier_test_acc"):
        assert np.isfinite(g[k]), k
    assert np.isfinite(m["real_train_vs_test"]["fid"]) and m["layout"]["K"] == [256, 256, 256, 256]
    assert "grid.png" in (out / "report.md").read_text()

    # a re-run reuses every finished stage (no stage runs again), redo= recomputes the named one
    r2 = _run(out)
    assert r2.returncode == 0, r2.stderr[-4000:]
    assert "running in" not in r2.stderr and r2.stderr.count("reusing") == 5
    r3 = _run(out, "redo=[sample]")
    assert r3.returncode == 0, r3.stderr[-4000:]
    assert "stage sample: running" in r3.stderr and "stage eval: reusing" in r3.stderr
    assert np.array_equal(np.load(out / "samples.npz")["arr_0"], d["arr_0"])  # same seed, same samples


def test_main_job_bad_override_names_key(tmp_path):
    r = _run(tmp_path / "run", "ar.overrides=[train.stepz=3]")
    assert r.returncode != 0 and "train.stepz" in r.stderr and "'steps'" in r.stderr
