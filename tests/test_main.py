"""The main job end to end on a tiny budget: every artefact exists and is valid; re-runs reuse stages."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
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


def _pipe(out: Path, *redo: str):
    from pipeline.main import MainConfig, Pipeline

    return Pipeline(MainConfig(out=str(out), redo=list(redo)))


def _finished(tag):
    """A stage body that leaves ``result.txt`` = tag and finishes."""
    def run(d):
        (d / "result.txt").write_text(tag)
        return {"tag": tag}
    return run


def _interrupted(d):
    (d / "checkpoints").mkdir()
    (d / "checkpoints" / "step_00000300").write_text("partial")
    return {"interrupted": True, "step": 300}


def test_interrupted_redo_resumes_and_keeps_the_old_result(tmp_path):
    d, _, _ = _pipe(tmp_path).stage(1, "tokenizer", {"cfg": 1}, _finished("v1"))
    with pytest.raises(SystemExit):
        _pipe(tmp_path, "tokenizer").stage(1, "tokenizer", {"cfg": 1}, _interrupted)
    old = tmp_path / f".old-{d.name}"
    assert (old / "result.txt").read_text() == "v1" and (old / "DONE.json").is_file()

    def resumed(d):
        assert (d / "checkpoints" / "step_00000300").read_text() == "partial"  # not started over
        return _finished("v2")(d)

    p = _pipe(tmp_path, "tokenizer")  # the same command again
    d2, res, _ = p.stage(1, "tokenizer", {"cfg": 1}, resumed)
    assert d2 == d and res["tag"] == "v2" and (d / "result.txt").read_text() == "v2"
    assert (old / "result.txt").read_text() == "v1"  # kept until the whole pipeline has finished
    p.drop_set_aside()
    assert not old.exists()


def test_failed_redo_keeps_the_old_result(tmp_path):
    d, _, _ = _pipe(tmp_path).stage(1, "tokenizer", {"cfg": 1}, _finished("v1"))

    def broken(d):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        _pipe(tmp_path, "tokenizer").stage(1, "tokenizer", {"cfg": 1}, broken)
    assert (tmp_path / f".old-{d.name}" / "result.txt").read_text() == "v1"


def test_redo_recomputes_every_later_stage_once(tmp_path):
    calls = []

    def body(tag):
        def run(d):
            calls.append(tag)
            return _finished(tag)(d)
        return run

    def pipeline(p, tok, enc):
        _, _, h1 = p.stage(1, "tokenizer", {"cfg": 1}, tok)
        return p.stage(2, "encode", {"up": h1}, enc)

    pipeline(_pipe(tmp_path), body("tok1"), body("enc1"))
    # the encode key holds only the tokenizer's config hash: a retrained tokenizer must still re-encode
    with pytest.raises(SystemExit):
        pipeline(_pipe(tmp_path, "tokenizer"), body("tok2"), _interrupted)
    # re-running the same command continues that redo: the new tokenizer is kept, the encode resumes
    d, res, _ = pipeline(_pipe(tmp_path, "tokenizer"), body("tok3"), body("enc2"))
    assert calls == ["tok1", "enc1", "tok2", "enc2"] and res["tag"] == "enc2"
    assert (d / "checkpoints" / "step_00000300").is_file()


def test_eval_stage_key_covers_recon_images(tmp_path, monkeypatch):
    from groupgen.config import config_hash, load_config
    from pipeline.main import MainConfig, Pipeline

    class Stop(Exception):
        pass

    def fake_stage(self, idx, name, key, run):
        if name == "eval":
            raise Stop(config_hash(key))
        return self.out / name, {"train": "t", "val": "v"}, f"h{idx}"

    monkeypatch.setattr(Pipeline, "stage", fake_stage)
    hashes = []
    for n in (2000, 100):
        cfg = load_config(MainConfig, REPO / "configs/main/fmnist.yaml", [f"out={tmp_path}", f"eval.recon_images={n}"])
        with pytest.raises(Stop) as e:
            Pipeline(cfg).run()
        hashes.append(str(e.value))
    assert hashes[0] != hashes[1]


def test_final_artefacts_are_copied_atomically(tmp_path, monkeypatch):
    import shutil

    smp, out = tmp_path / "smp", tmp_path / "out"
    smp.mkdir()
    (smp / "grid.png").write_bytes(b"new grid")
    (smp / "samples.npz").write_bytes(b"new samples" * 100)
    p = _pipe(out)
    (out / "samples.npz").write_bytes(b"old samples")
    real = shutil.copyfile

    def dying_copy(src, dst, **kw):  # the disk fills half-way through the samples
        if Path(src).name != "samples.npz":
            return real(src, dst, **kw)
        Path(dst).write_bytes(Path(src).read_bytes()[:50])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", dying_copy)
    with pytest.raises(OSError, match="No space"):
        p.collect(tmp_path, {}, None, {}, smp, {}, {})
    assert (out / "samples.npz").read_bytes() == b"old samples"
    assert (out / "grid.png").read_bytes() == b"new grid"
    assert sorted(x.name for x in out.iterdir()) == ["grid.png", "samples.npz"]  # no temp file left


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline.main", "--config", str(REPO / "configs/main/fmnist.yaml"),
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
    # the floor is real train images at the samples' N (20 here), FLOOR_DRAWS seeded draws, same reference
    from eval.generation import FLOOR_DRAWS

    fl = m["fid_floor"]
    assert fl["n"] == g["num_samples"] == 20 and fl["draws"] == FLOOR_DRAWS == len(fl["fid"]) == 5
    assert fl["seeds"] == [0, 1, 2, 3, 4] and fl["ref_n"] == g["ref_n"] and fl["split"] == "train"
    assert fl["fid_mean"] == pytest.approx(np.mean(fl["fid"])) and fl["fid_mean"] > m["real_train_vs_test"]["fid"]
    assert m["fid_ratio"] == pytest.approx(g["fid"] / fl["fid_mean"])
    assert m["class_acc_ratio"] == pytest.approx(g["class_acc"] / g["classifier_test_acc"])
    report = (out / "report.md").read_text()
    for name in ("grid.png", "recon.png", "real_vs_samples.png", "loss_curves.png"):
        assert f"({name})" in report, name
    for name in ("real_vs_samples.png", "loss_curves.png"):
        with Image.open(out / name) as im:
            im.load()
            assert min(im.size) > 100, (name, im.size)
    assert f"{fl['fid_mean']:.3f} ± {fl['fid_std']:.3f}" in report and f"**{m['fid_ratio']:.2f}×**" in report

    # a re-run reuses every finished stage (no stage runs again), redo= recomputes the named one
    r2 = _run(out)
    assert r2.returncode == 0, r2.stderr[-4000:]
    assert "running in" not in r2.stderr and r2.stderr.count("reusing") == 5
    r3 = _run(out, "redo=[sample]")
    assert r3.returncode == 0, r3.stderr[-4000:]
    assert "stage ar: reusing" in r3.stderr and "stage sample: running" in r3.stderr
    assert "stage eval: running" in r3.stderr  # a redone stage's later stages are redone too
    assert np.array_equal(np.load(out / "samples.npz")["arr_0"], d["arr_0"])  # same seed, same samples
    assert not list(out.glob(".old-*"))  # the replaced results go once the pipeline has finished

    # bench/demo_levers.py scores a variant exactly like the job: the job's own sampling settings give the
    # job's FID; the tokenizer's bound scores its reconstructions of the floor's draws (same N, same seeds)
    levers = subprocess.run([sys.executable, "bench/demo_levers.py", "--run", str(out), "--threads", "1",
                             "--recon-bound", "--sampling", ""], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env=child_env(GROUPGEN_CACHE=str(out.parent / "cache")))
    assert levers.returncode == 0, levers.stderr[-4000:]
    bound, same = [json.loads(x) for x in levers.stdout.splitlines() if x.startswith("{")]
    assert bound["variant"] == "recon_bound" and bound["draws"] == 5 and np.isfinite(bound["fid"])
    assert same["variant"] == "(job default)" and same["n"] == 20
    assert same["fid"] == pytest.approx(g["fid"], rel=1e-9) and same["fid_ratio"] == pytest.approx(m["fid_ratio"])


def test_main_job_bad_override_names_key(tmp_path):
    r = _run(tmp_path / "run", "ar.overrides=[train.stepz=3]")
    assert r.returncode != 0 and "train.stepz" in r.stderr and "'steps'" in r.stderr


def test_report_puts_each_number_next_to_its_floor(tmp_path):
    from pipeline.main import ratios
    from pipeline.report import write_report

    gen = {"fid": 9.0, "is": 6.5, "class_acc": 0.81, "classifier_test_acc": 0.9, "num_samples": 500}
    floor = {"n": 500, "draws": 5, "seeds": [0, 1, 2, 3, 4], "fid": [1.4, 1.5, 1.5, 1.6, 2.0], "fid_mean": 1.6,
             "fid_std": 0.2345, "fid_min": 1.4, "fid_max": 2.0, "is_mean": 7.1}
    m = {"layout_text": "grid 8x8", "generation": gen, "fid_floor": floor, "tokenizer": {"psnr": 22.0},
         "real_train_vs_test": {"fid": 0.06, "is": 7.4, "n": 10000}, "ar": {}, "stage_seconds": {"eval": 1.0},
         "wall_seconds": 2.0, **ratios(gen, floor)}
    assert m["fid_ratio"] == pytest.approx(9.0 / 1.6) and m["class_acc_ratio"] == pytest.approx(0.9)
    text = write_report(tmp_path, m, {"real_vs_samples": "rvs.png", "loss_curves": "lc.png"}).read_text()
    row = next(ln for ln in text.splitlines() if ln.startswith("| FID"))
    assert "| 9.000 | 1.600 ± 0.234 (range 1.400–2.000; 5 draws, seeds [0, 1, 2, 3, 4]) | **5.62×** | 0.060 |" in row
    acc = next(ln for ln in text.splitlines() if ln.startswith("| class-conditional accuracy"))
    assert "0.810" in acc and "0.900" in acc and "**0.900**" in acc
    assert "samples (N = 500)" in text and "(rvs.png)" in text and "(lc.png)" in text and "(recon.png)" in text
    assert ratios({"fid": 9.0}, None) == {}   # no floor (e.g. a folder reference): no ratio, not a wrong one


def test_the_job_seed_seeds_every_stage_and_seed_0_keeps_the_presets(tmp_path, monkeypatch):
    import dataclasses

    from groupgen.config import config_hash, load_config
    from pipeline.main import MainConfig, Pipeline

    monkeypatch.chdir(REPO)   # the presets name their stage configs relative to the repo
    cfg = load_config(MainConfig, "configs/main/fmnist.yaml", [f"out={tmp_path}", "seed=3"])
    tok, ar, smp = Pipeline(cfg).stage_configs()
    assert (tok.train.seed, ar.train.seed, smp.seed) == (3, 3, 3)
    # seed 0 resolves to the presets' own seed: the stage hashes (and so the reused stages) do not move
    tok0, ar0, smp0 = Pipeline(dataclasses.replace(cfg, seed=0)).stage_configs()
    assert (tok0.train.seed, ar0.train.seed, smp0.seed) == (0, 0, 0)
    from ar_model.train import ARTrainConfig
    from tokenizer.train import TokenizerTrainConfig
    plain = load_config(TokenizerTrainConfig, cfg.tokenizer.config, cfg.tokenizer.overrides)
    assert config_hash(dataclasses.asdict(plain)) == config_hash(dataclasses.asdict(tok0))
    plain_ar = load_config(ARTrainConfig, cfg.ar.config, cfg.ar.overrides)
    assert config_hash(dataclasses.asdict(plain_ar)) == config_hash(dataclasses.asdict(ar0))
    assert config_hash(dataclasses.asdict(plain)) != config_hash(dataclasses.asdict(tok))
