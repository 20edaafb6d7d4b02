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

from _env import REPO, child_env
from groupgen.checkpoint import (CheckpointError, latest_checkpoint, load_state, load_tensors, resolve_checkpoint,
                                 save_checkpoint)
from groupgen.config import load_config, to_dict
from groupgen.data import DataConfig, DataError, build_dataset
from groupgen.layout import TokenLayout
from groupgen.runs import MetricsLog, read_jsonl
from groupgen.tokens import TokenStore, TokenStoreError, TokenStoreWriter

torch.set_num_threads(1)
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


def ref_run(argv, run: Path) -> Path:
    """An uninterrupted run: the reference trajectory."""
    run_ok(argv, run.parent / run.name)
    return run


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
def job_chain(kind, run, store, seed, hang=False) -> dict:
    """One run, interrupted three ways in turn, each time resumed by rerunning the same command:
    SIGTERM (tokenizer) / SIGINT (AR) at a random step -> SIGKILL at a later random step -> (tokenizer,
    ``hang``) SIGKILL inside the next checkpoint write -> run to the end (tokenizer in-process, AR via the CLI)."""
    rng = random.Random(seed)
    argv = tok_argv(run) if kind == "tokenizer" else ar_argv(store, run)
    r = {"run": run}

    def stage(name, helper, ready, sig, wait):
        p = start(argv, run.parent / f"{run.name}.{name}", helper)
        interrupt_when(p, ready, sig, wait, rng)
        rc, out, err = finish(p)
        r[name] = {"rc": rc, "out": out, "err": err, "latest": latest_step(run), "row": last_row(run)}

    k1 = rng.randint(2, 3)
    stage("signal", SLOW_STEP, lambda: last_row(run) >= k1, signal.SIGTERM if kind == "tokenizer" else signal.SIGINT, .1)
    r["k2"] = k2 = r["signal"]["latest"] + rng.randint(1, 2)
    stage("kill", SLOW_STEP, lambda: last_row(run) >= k2, signal.SIGKILL, rng.uniform(0, 0.3))
    if kind == "ar":
        out, err = run_ok(argv, run.parent / f"{run.name}.resume")
        r["resume"] = {"out": out, "err": err}
        return r
    if hang:
        marker = run.parent / f"{run.name}.in_save"
        stage("hang", ["--hang-save", "1", str(marker)], marker.is_file, signal.SIGKILL, 0.0)
        r["hang"]["tmp_dirs"] = sorted(x.name for x in (run / "checkpoints").glob(".*-step_*"))
        r["hang"]["state"] = load_state(resolve_checkpoint(run))["step"]
    # To the end in a child process: in-process, the other campaign threads (building models to encode or
    # sample) would draw from the same global torch RNG between the restore and the next draw.
    out, _ = run_ok(tok_argv(run), run.parent / f"{run.name}.final")
    r["final"] = json.loads(out[out.index("{\n"):])
    return r


def job_sampling(work, models) -> dict:
    out = work / "samp_kill"
    argv = ["-m", "sampling.sample", "--ckpt", str(models["ar"]), "--out", str(out), *SAMPLE_ARGS]
    p = start(argv, work / "samp_kill.kill", ["--delay", "numpy.savez=0.25"])
    shards = out / "shards"
    interrupt_when(p, lambda: len(list(shards.glob("chunk_*.npz"))) >= 2, signal.SIGKILL, 0.25, random.Random(SEED))
    rc, _, _ = finish(p)
    before = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in shards.glob("chunk_*.npz")}
    from sampling.sample import SamplingConfig, sample
    info = sample(load_config(SamplingConfig, None, SAMPLE_ARGS), models["ar"], out)   # resume in-process
    return {"rc": rc, "before": before, "out": out, "info": info,
            "after": {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in shards.glob("chunk_*.npz")}}


def job_encode(work, models) -> dict:
    out = work / "enc_kill"
    argv = ["-m", "tokenizer.encode", "--ckpt", str(models["tok"]), "--out", str(out), *ENCODE_ARGS]
    p = start(argv, work / "enc_kill.kill", ["--delay", "groupgen.tokens.TokenStoreWriter.write_chunk=0.2"])
    interrupt_when(p, lambda: len(list((out / "done").glob("*"))) >= 3 if (out / "done").is_dir() else False,
                   signal.SIGKILL, 0.2, random.Random(SEED))
    rc, _, _ = finish(p)
    before = {f.name: f.stat().st_mtime_ns for f in (out / "done").iterdir()}
    from tokenizer.encode import EncodeConfig, encode
    encode(models["tok"], out, cfg=load_config(EncodeConfig, None, ENCODE_ARGS))          # resume in-process
    return {"rc": rc, "before": before, "after": {f.name: f.stat().st_mtime_ns for f in (out / "done").iterdir()},
            "out": out}


def job_batch(work, store, models, tok_ref, ar_ref) -> dict:
    """Bad-input cases through the CLIs in one interpreter (see _kill_helpers --batch); guarded run dirs
    are snapshotted before and after."""
    tok_ref, ar_ref = tok_ref.result(), ar_ref.result()
    b = work / "batch"
    (b / "torch_home").mkdir(parents=True)
    (b / "empty_folder" / "a").mkdir(parents=True)

    def copy(src, name):
        shutil.copytree(src, b / name)
        return b / name

    other = make_store(b / "other_store", K=(16, 8))
    bad_hdr = Path(shutil.copytree(store, b / "bad_header_store"))
    h = json.loads((bad_hdr / "header.json").read_text())
    (bad_hdr / "header.json").write_text(json.dumps(dict(h, N=70)))
    ar_state, ar_engine = copy(ar_ref, "a_state"), copy(ar_ref, "a_engine")
    torch.save({"step": Payload(b / "pwned_state")}, latest_checkpoint(ar_state / "checkpoints") / "state.pt")
    torch.save({"module": Payload(b / "pwned_engine")},
               latest_checkpoint(ar_engine / "checkpoints") / "engine" / "mp_rank_00_model_states.pt")
    np.savez(b / "good.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(b / "obj.npz", arr_0=np.array([Payload(b / "pwned_npz"), None], dtype=object))
    no_weights = {"TORCH_HOME": str(b / "torch_home"), "GROUPGEN_INCEPTION_WEIGHTS": ""}
    samp = ["-m", "sampling.sample", "--ckpt", str(models["ar"])]
    evl = ["-m", "eval.generation", "--ref", "fmnist", "--samples"]
    cases = {
        "ar_again": ar_argv(store, b / "ar_again"),                       # determinism: a second plain run
        "tok_unknown_key": tok_argv(copy(tok_ref, "t_unknown"), "train.stepz=9"),
        "tok_wrong_type": tok_argv(copy(tok_ref, "t_type"), "train.batch_size=eight"),
        "tok_latent_vs_groups": tok_argv(copy(tok_ref, "t_groups"), "model.embed_dim=6"),
        "tok_changed_config": tok_argv(copy(tok_ref, "t_changed"), "train.lr=0.5"),
        "tok_empty_folder": tok_argv(b / "t_empty", "data.name=imagefolder", f"data.root={b / 'empty_folder'}"),
        "tok_lpips_missing": tok_argv(b / "t_lpips", "loss.perceptual_weight=1.0"),
        "tok_nan": tok_argv(b / "t_nan", "train.lr=1e30"),
        "ar_unknown_key": ar_argv(store, copy(ar_ref, "a_unknown"), "train.stepz=9"),
        "ar_wrong_type": ar_argv(store, copy(ar_ref, "a_type"), "train.steps=many"),
        "ar_dim_vs_heads": ar_argv(store, copy(ar_ref, "a_heads"), "model.dim=66"),
        "ar_layout_vs_ckpt": ar_argv(other, copy(ar_ref, "a_layout")),
        "ar_header_vs_array": ar_argv(bad_hdr, b / "a_header"),
        "ar_nan": ar_argv(store, b / "a_nan", "train.lr=1e30", "train.clip=0", "train.warmup_steps=0"),
        "ar_state_payload": ar_argv(store, ar_state, "train.steps=10"),
        "ar_engine_payload": ar_argv(store, ar_engine, "train.steps=10"),
        "samp_class_range": samp + ["--out", str(b / "s_range"), "classes=[7]", "device=cpu"],
        "samp_unknown_key": samp + ["--out", str(b / "s_key"), "cfg_scal=2"],
        "eval_no_inception": evl + [str(b / "good.npz")],
        "eval_object_npz": evl + [str(b / "obj.npz")],
    }
    outs = {n: Path(a[a.index("--out") + 1]) for n, a in cases.items() if "--out" in a}
    guarded = {n: d for n, d in outs.items() if d.is_dir()}
    before = {n: snapshot(d) for n, d in guarded.items()}
    spec = [{"name": n, "module": a[1], "argv": a[2:], "env": no_weights if n in ("tok_lpips_missing",
             "eval_no_inception") else {}} for n, a in cases.items()]
    (b / "cases.json").write_text(json.dumps(spec))
    run_ok([HELPER, "--batch", str(b / "cases.json"), str(b / "results.json")], b / "batch")
    res = {r["name"]: r for r in json.loads((b / "results.json").read_text())}
    # One genuine ``python -m`` start, to show the batch runner reports what the interpreter would.
    rc, _, err = finish(start(tok_argv(copy(tok_ref, "t_real"), "train.stepz=9"), b / "real"))
    res["real_unknown_key"] = {"code": rc, "stderr": err}
    return {"res": res, "before": before, "after": {n: snapshot(d) for n, d in guarded.items()}, "dir": b}


@pytest.fixture(scope="module")
def campaign(work, store, models) -> dict:
    with ThreadPoolExecutor(max_workers=4) as pool:
        f = {"tok_ref": pool.submit(ref_run, tok_argv(work / "tok_ref"), work / "tok_ref"),
             "ar_ref": pool.submit(ref_run, ar_argv(store, work / "ar_ref"), work / "ar_ref")}
        f["tok_chain"] = pool.submit(job_chain, "tokenizer", work / "tok_chain", store, SEED)
        f["ar_chain"] = pool.submit(job_chain, "ar", work / "ar_chain", store, SEED + 1)
        f["sampling"] = pool.submit(job_sampling, work, models)
        f["encode"] = pool.submit(job_encode, work, models)
        f["batch"] = pool.submit(job_batch, work, store, models, f["tok_ref"], f["ar_ref"])
        out = {}
        for name, fut in f.items():
            try:
                out[name] = fut.result()
            except BaseException as e:   # reported by the tests that use this job
                out[name] = e
    return out


def got(campaign, name):
    r = campaign[name]
    if isinstance(r, BaseException):
        raise r
    return r


def case(campaign, name) -> tuple[int, str]:
    r = got(campaign, "batch")["res"][name]
    return r["code"], r["stderr"]


def unchanged(campaign, name) -> bool:
    b = got(campaign, "batch")
    return b["before"][name] == b["after"][name]


# ================================================================================ kill and resume
def check_final(run: Path, ref: Path) -> None:
    got_t, want = trajectory(run), trajectory(ref)
    assert [x["step"] for x in got_t] == list(range(1, STEPS + 1)), f"rows duplicated or lost {WHY}"
    assert got_t == want, f"trajectory differs from the uninterrupted run {WHY}"
    assert weights(run) == weights(ref), WHY


@pytest.mark.parametrize("kind", ["tokenizer", "ar"])
def test_sigkill_at_random_step_then_resume_equals_uninterrupted(campaign, kind):
    r = got(campaign, "tok_chain" if kind == "tokenizer" else "ar_chain")
    kill, s1 = r["kill"], r["signal"]["latest"]
    assert kill["rc"] == -signal.SIGKILL, f"run was not killed: {kill['rc']} {kill['err'][-1500:]} {WHY}"
    assert s1 <= kill["latest"] < STEPS and kill["row"] >= r["k2"], (kill["latest"], kill["row"], WHY)
    if kind == "ar":
        m = re.search(r"start step (\d+)", r["resume"]["err"])
        assert m and int(m.group(1)) == kill["latest"], (r["resume"]["err"][-1500:], WHY)   # newest checkpoint
    check_final(r["run"], got(campaign, "tok_ref" if kind == "tokenizer" else "ar_ref"))


def test_sigterm_tokenizer_cli_checkpoints_the_step_reached(campaign):
    r = got(campaign, "tok_chain")["signal"]
    m = re.search(r"stopped by signal at step (\d+); checkpoint saved", r["out"])
    assert m, r["out"][-2000:] + r["err"][-2000:]
    s = int(m.group(1))
    summary = json.loads(r["out"][r["out"].index("{"):])
    assert summary["interrupted"] and summary["step"] == s == r["latest"] == r["row"] and 2 <= s < STEPS


def test_sigterm_tokenizer_cli_exit_status_says_interrupted(campaign):
    assert got(campaign, "tok_chain")["signal"]["rc"] != 0


def test_sigint_ar_cli_checkpoints_the_step_reached(campaign):
    r = got(campaign, "ar_chain")["signal"]
    assert r["rc"] == 130, r["err"][-2000:]
    s = int(re.search(r"interrupted at step (\d+)", r["err"]).group(1))
    assert 2 <= s < STEPS and r["latest"] == s == r["row"]


@pytest.mark.slow
def test_sigkill_inside_checkpoint_write_keeps_previous_then_resumes_exactly(tmp_path, store):
    """signal -> SIGKILL -> SIGKILL inside the next checkpoint write (tokenizer), then resume to the end."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        ref = pool.submit(ref_run, tok_argv(tmp_path / "ref"), tmp_path / "ref")
        r = job_chain("tokenizer", tmp_path / "chain", store, SEED + 3, hang=True)
    h, prev = r["hang"], r["kill"]["latest"]
    assert h["rc"] == -signal.SIGKILL, h["err"][-2000:]
    assert re.search(rf"resumed from \S+ at step {prev}\b", h["out"]), (h["out"][-1500:], WHY)
    assert any(n.startswith(f".tmp-step_{prev + 1:08d}") for n in h["tmp_dirs"])   # killed inside that write
    assert h["latest"] == prev == h["state"]                        # the previous checkpoint is what resumes
    assert r["final"]["step"] == STEPS
    check_final(r["run"], ref.result())


# ============================================================================ atomic checkpoints
def _t(v):
    return {"model": {"w": torch.full((3,), float(v))}}


def test_full_disk_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    import groupgen.checkpoint as C

    root = tmp_path / "ck"
    save_checkpoint(root, 1, _t(1), {"kind": "x"}, {"step": 1}, keep_last=1)

    def enospc(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(C.torch, "save", enospc)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(root, 2, _t(2), {"kind": "x"}, {"step": 2}, keep_last=1)
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]   # no temp dir left
    assert load_state(root)["step"] == 1 and load_tensors(root)["w"][0] == 1
    # the new directory is complete but publishing ``latest`` fails: old pointer, nothing pruned
    monkeypatch.setattr(C, "atomic_write_text", enospc)
    with pytest.raises(OSError):
        save_checkpoint(root, 2, _t(2), {"kind": "x"}, {"step": 2}, keep_last=1)
    monkeypatch.undo()
    assert (root / "latest").read_text().strip() == "step_00000001" and (root / "step_00000001").is_dir()
    assert load_state(root)["step"] == 1


def test_keep_last_never_deletes_the_latest(tmp_path):
    root = tmp_path / "ck"
    for s in (1, 2, 3, 4):
        save_checkpoint(root, s, _t(s), {"kind": "x"}, {"step": s}, keep_last=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000003", "step_00000004"]
    save_checkpoint(root, 2, _t(2), {"kind": "x"}, {"step": 2}, keep_last=1)   # resumed from an older step
    assert latest_checkpoint(root).name == "step_00000002" and load_state(root)["step"] == 2


def test_stale_or_garbage_latest_pointer_falls_back_to_newest_complete(tmp_path):
    root = tmp_path / "ck"
    for s in (1, 2):
        save_checkpoint(root, s, _t(s), {"kind": "x"}, {"step": s})
    for text in ("step_00000099\n", "", "../../etc\n"):
        (root / "latest").write_text(text)
        assert resolve_checkpoint(root).name == "step_00000002"


def test_resume_tolerates_a_torn_last_metrics_line(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')
    MetricsLog(f).truncate_after(2)
    assert [r["step"] for r in read_jsonl(f)] == [1, 2]


# =================================================================== sampling and encoding resume
def _arrays(f) -> dict[str, np.ndarray]:
    with np.load(f) as z:
        return {k: z[k] for k in z.files}


def test_killed_sampling_redoes_only_missing_chunks_and_merges_identically(campaign, models, work):
    from sampling.sample import SamplingConfig, sample

    r = got(campaign, "sampling")
    assert r["rc"] == -signal.SIGKILL and 2 <= len(r["before"]) < 6, r
    assert all(r["after"][n] == st for n, st in r["before"].items())       # finished chunks untouched
    info = r["info"]["rank0"]
    assert sorted(info["chunks_skipped"]) == sorted(int(n[6:11]) for n in r["before"])
    assert sorted(info["chunks_skipped"] + info["chunks_done"]) == list(range(6))   # each chunk once
    assert len(list((r["out"] / "shards").glob("chunk_*.npz"))) == 6
    sample(load_config(SamplingConfig, None, SAMPLE_ARGS), models["ar"], work / "samp_ref")
    assert (r["out"] / "samples.npz").read_bytes() == (work / "samp_ref" / "samples.npz").read_bytes()
    assert len(_arrays(r["out"] / "samples.npz")["labels"]) == 12


def test_killed_encode_resumes_pending_chunks_only_and_equals_one_shot(campaign, models, work):
    from tokenizer.encode import EncodeConfig, encode

    r = got(campaign, "encode")
    assert r["rc"] == -signal.SIGKILL and 3 <= len(r["before"]) < 10, r
    assert all(r["after"][n] == t for n, t in r["before"].items())           # done markers not re-touched
    assert sorted(r["after"]) == [f"{c:06d}" for c in range(10)]
    one = encode(models["tok"], work / "enc_ref", cfg=load_config(EncodeConfig, None, ENCODE_ARGS))
    for f in ("codes.npy", "labels.npy", "header.json"):
        assert (one / f).read_bytes() == (r["out"] / f).read_bytes(), f


# ====================================================================== bad input, clear errors
def test_cli_unknown_key_and_wrong_type_are_named_and_run_dir_untouched(campaign):
    for name, pat in [("tok_unknown_key", r"unknown config key 'train.stepz'.*'steps'"),
                      ("real_unknown_key", r"unknown config key 'train.stepz'.*'steps'"),
                      ("ar_unknown_key", r"unknown config key 'train.stepz'.*'steps'"),
                      ("tok_wrong_type", r"train.batch_size: expected an int, got 'eight'"),
                      ("ar_wrong_type", r"train.steps: expected an int, got 'many'"),
                      ("samp_unknown_key", r"unknown config key 'cfg_scal'.*'cfg_scale'")]:
        code, err = case(campaign, name)
        assert code != 0 and re.search(pat, err), (name, code, err[-1500:])
    for name in ("tok_unknown_key", "tok_wrong_type", "ar_unknown_key", "ar_wrong_type"):
        assert unchanged(campaign, name), name


def test_cli_inconsistent_sizes_are_named(campaign):
    code, err = case(campaign, "tok_latent_vs_groups")
    assert code != 0 and "model.embed_dim=6" in err and "G=4" in err, err[-1500:]
    code, err = case(campaign, "ar_dim_vs_heads")
    assert code != 0 and "dim 66 is not divisible by n_head 4" in err, err[-1500:]
    assert unchanged(campaign, "ar_dim_vs_heads")
    code, err = case(campaign, "tok_changed_config")
    assert code != 0 and "config differs" in err and "train.lr" in err, err[-1500:]


def test_rejected_tokenizer_config_leaves_existing_run_dir_untouched(campaign):
    assert unchanged(campaign, "tok_latent_vs_groups") and unchanged(campaign, "tok_changed_config")


def test_token_store_that_does_not_match_its_array_or_the_checkpoint(campaign):
    code, err = case(campaign, "ar_header_vs_array")
    assert code != 0 and re.search(r"codes.npy: shape \[64, 2, 16, 2\] does not match header \[70, 2, 16, 2\]", err)
    code, err = case(campaign, "ar_layout_vs_ckpt")
    assert code != 0 and re.search(r"K: checkpoint .* \(8, 8\) vs token store .* \(16, 8\)", err), err[-1500:]
    assert unchanged(campaign, "ar_layout_vs_ckpt")


def test_token_store_header_checks(tmp_path, store):
    def variant(name, edit_header=None, edit=None):
        d = Path(shutil.copytree(store, tmp_path / name))
        if edit_header:
            h = json.loads((d / "header.json").read_text())
            edit_header(h)
            (d / "header.json").write_text(json.dumps(h))
        if edit:
            edit(d)
        return d

    cases = [
        (variant("dtype", lambda h: h.update(dtype="uint16")), r"dtype uint8 vs header uint16"),
        (variant("nokey", lambda h: h.pop("num_classes")), r"missing key 'num_classes'"),
        (variant("incomplete", lambda h: h.update(complete=False)), r"incomplete"),
        (variant("layout", lambda h: h["layout"].update(L=9)), r"bad layout: grid layout 4x4 does not have L=9"),
        (variant("labels32", edit=lambda d: np.save(d / "labels.npy", np.zeros(64, np.int32))), r"expected int64 \[64\]"),
        (variant("range", edit=lambda d: np.save(d / "codes.npy", np.full((64, 2, 16, 2), 8, np.uint8))),
         r"group 0 holds index 8 >= K=8"),
        (variant("classes", lambda h: h.update(num_classes=2)), r"labels outside \[0, 2\)"),
    ]
    for d, pat in cases:
        with pytest.raises(TokenStoreError, match=pat):
            TokenStore(d)


def test_unreadable_token_arrays_name_the_file(tmp_path, store):
    d = Path(shutil.copytree(store, tmp_path / "trunc"))
    raw = (d / "codes.npy").read_bytes()
    (d / "codes.npy").write_bytes(raw[: len(raw) // 2])   # an interrupted copy
    with pytest.raises(TokenStoreError, match="codes.npy"):
        TokenStore(d)


def _nan_case(campaign, name, pat, run_name):
    code, err = case(campaign, name)
    m = re.search(pat, err)
    assert code != 0 and m, (name, err[-1500:])
    bad, run = int(m.group(1)), got(campaign, "batch")["dir"] / run_name
    assert bad >= 2 and latest_step(run) == bad - 1, (name, bad, latest_step(run))
    assert f"step_{bad - 1:08d}" in err                                  # the message names the kept one
    # the loss of step `bad` may be finite and logged; its update is what made the weights non-finite
    assert all(np.isfinite(r["loss"]) for r in rows(run)) and last_row(run) <= bad
    return run


def test_nan_loss_stops_keeps_last_good_checkpoint_and_says_where(campaign):
    _nan_case(campaign, "ar_nan", r"non-finite (?:loss|weights).* at step (\d+)", "a_nan")
    run = _nan_case(campaign, "tok_nan", r"non-finite tokenizer loss at step (\d+)", "t_nan")
    assert all(torch.isfinite(v).all() for v in load_tensors(run, "model").values())


def test_ar_last_good_checkpoint_after_nan_has_finite_weights(campaign):
    run = _nan_case(campaign, "ar_nan", r"non-finite (?:loss|weights).* at step (\d+)", "a_nan")
    for name in ("model", "ema"):
        bad = [k for k, v in load_tensors(run, name).items() if not torch.isfinite(v).all()]
        assert not bad, f"{resolve_checkpoint(run)}/{name}.safetensors: non-finite {bad[:4]}"


def test_missing_pretrained_weights_offline_say_what_to_provide(campaign):
    code, err = case(campaign, "tok_lpips_missing")
    assert code != 0 and "vgg16-397923af.pth" in err and "lpips_vgg_path" in err, err[-1500:]
    code, err = case(campaign, "eval_no_inception")
    assert code == 2 and "weights-inception-2015-12-05-6726825d.pth" in err and "GROUPGEN_INCEPTION_WEIGHTS" in err


def test_sampling_class_id_out_of_range_fails_before_any_work(campaign):
    code, err = case(campaign, "samp_class_range")
    assert code != 0 and "class id 7 out of range: the model has 3 classes" in err, err[-1500:]
    assert not (got(campaign, "batch")["dir"] / "s_range" / "shards").exists()


def _png(path, seed=0, size=32):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def test_imagefolder_truncated_and_corrupt_images_are_named(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "a" / "good.png")
    trunc = _png(root / "b" / "cut.png", 1)
    trunc.write_bytes(trunc.read_bytes()[:1500])
    junk = root / "b" / "junk.jpg"
    junk.write_bytes(b"\xff\xd8 not really a jpeg")
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=8, channels=3)
    ds = build_dataset(cfg, "train")
    assert ds[0][0].shape == (3, 8, 8)
    for i, f in ((1, trunc), (2, junk)):
        with pytest.raises(DataError, match=re.escape(str(f))):
            ds[i]
    ds = build_dataset(DataConfig(**{**cfg.__dict__, "skip_corrupt": True}), "train")
    x, y = ds[1]                                         # falls through to the next readable one (wraps to 0)
    assert x.shape == (3, 8, 8) and ds.skipped[:2] == [str(trunc), str(junk)]


def test_imagefolder_skip_corrupt_with_no_readable_image_is_a_clear_error(tmp_path):
    for i in range(2):
        (tmp_path / "a").mkdir(exist_ok=True)
        (tmp_path / "a" / f"{i}.png").write_bytes(b"garbage")
    ds = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path), skip_corrupt=True), "train")
    with pytest.raises(DataError, match="readable"):
        ds[0]


def test_empty_missing_and_single_class_folders(tmp_path, campaign):
    def ds(root):
        return build_dataset(DataConfig(name="imagefolder", root=str(root), image_size=8), "train")

    with pytest.raises(DataError, match="is not a directory"):
        ds(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="no class sub-folders"):
        ds(tmp_path / "flat")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images with extensions"):
        ds(tmp_path / "empty")
    code, err = case(campaign, "tok_empty_folder")                    # and through the trainer CLI
    assert code != 0 and "no images with extensions" in err
    # one class is allowed (a class-conditional model with one real class + the null class)
    _png(tmp_path / "one" / "only" / "a.png")
    _png(tmp_path / "one" / "only" / "b.png", 2)
    one = ds(tmp_path / "one")
    assert one.num_classes == 1 and one.class_names == ["only"] and [one[i][1] for i in range(2)] == [0, 0]


# ============================================================================== untrusted files
def test_crafted_state_pt_never_runs_tokenizer_or_ar(campaign, tmp_path):
    from tokenizer.model import load_tokenizer
    from tokenizer.train import TokenizerTrainConfig, train

    run = Path(shutil.copytree(got(campaign, "tok_ref"), tmp_path / "tok"))
    marker = tmp_path / "pwned"
    torch.save({"opt": Payload(marker), "step": 8}, resolve_checkpoint(run) / "state.pt")
    load_tokenizer(run)                                                # inference never reads state.pt
    with pytest.raises(CheckpointError, match=r"state.pt: refused to load trainer state"):
        train(load_config(TokenizerTrainConfig, TOK_CFG, TOK_ARGS + ["train.steps=10"]), run)
    assert not marker.exists()
    code, err = case(campaign, "ar_state_payload")                     # AR resume through the CLI
    assert code != 0 and "refused to load trainer state" in err, err[-1500:]
    assert not (got(campaign, "batch")["dir"] / "pwned_state").exists()


def test_crafted_deepspeed_engine_file_never_runs(campaign):
    code, err = case(campaign, "ar_engine_payload")
    assert not (got(campaign, "batch")["dir"] / "pwned_engine").exists()
    assert code != 0 and "refused" in err


def test_inference_and_sampling_loads_read_no_pickles(campaign, tmp_path):
    from ar_model.model import load_ar
    from groupgen.checkpoint import checkpoint_hash

    run = Path(shutil.copytree(got(campaign, "ar_ref"), tmp_path / "ar"))
    ck, marker = resolve_checkpoint(run), tmp_path / "pwned"
    torch.save({"x": Payload(marker)}, ck / "state.pt")
    torch.save({"x": Payload(marker)}, ck / "engine" / "mp_rank_00_model_states.pt")
    model, meta = load_ar(run)
    checkpoint_hash(run)
    assert meta["kind"] == "ar" and not marker.exists()


def test_object_arrays_in_npz_are_refused(campaign, models, tmp_path):
    from sampling.sample import SamplingConfig, sample

    code, err = case(campaign, "eval_object_npz")                      # eval CLI
    assert code == 2 and "obj.npz" in err and "allow_pickle" in err, err[-1500:]
    assert not (got(campaign, "batch")["dir"] / "pwned_npz").exists()
    # a planted sampling shard: treated as not done, regenerated, never unpickled
    out = Path(shutil.copytree(got(campaign, "sampling")["out"], tmp_path / "samp"))
    want = _arrays(out / "samples.npz")
    marker = tmp_path / "pwned"
    with open(out / "shards" / "chunk_00003.npz", "wb") as f:
        np.savez(f, arr_0=np.array([Payload(marker), None], dtype=object), labels=np.array([Payload(marker)]))
    info = sample(load_config(SamplingConfig, None, SAMPLE_ARGS), models["ar"], out)
    assert not marker.exists() and info["rank0"]["chunks_done"] == [3]
    got_ = _arrays(out / "samples.npz")
    assert all(np.array_equal(want[k], got_[k]) for k in want)


def test_object_dtype_token_store_is_refused_without_unpickling(tmp_path, store):
    d = Path(shutil.copytree(store, tmp_path / "obj"))
    marker = tmp_path / "pwned"
    a = np.empty((64, 2, 16, 2), dtype=object)
    a[0, 0, 0, 0] = Payload(marker)
    np.save(d / "codes.npy", a, allow_pickle=True)
    with pytest.raises(ValueError):
        TokenStore(d)
    assert not marker.exists()


# ================================================================================= determinism
def test_tokenizer_training_bit_identical_across_runs(campaign, tmp_path):
    from tokenizer.train import TokenizerTrainConfig, train

    ref = got(campaign, "tok_ref")
    train(load_config(TokenizerTrainConfig, TOK_CFG, TOK_ARGS), tmp_path / "again")   # in-process vs the CLI run
    assert trajectory(tmp_path / "again") == trajectory(ref)
    for s in range(STEPS - 2, STEPS + 1):                              # every kept checkpoint
        assert weights(tmp_path / "again", s) == weights(ref, s) and weights(ref, s)


def test_ar_training_bit_identical_across_runs(campaign):
    assert case(campaign, "ar_again")[0] == 0
    a, b = got(campaign, "ar_ref"), got(campaign, "batch")["dir"] / "ar_again"
    assert trajectory(a) == trajectory(b)
    for s in range(STEPS - 2, STEPS + 1):
        w = weights(a, s)
        assert set(w) == {"model.safetensors", "ema.safetensors"} and w == weights(b, s)


def test_sampling_bit_identical_across_runs(campaign, models, tmp_path):
    from sampling.sample import SamplingConfig, sample

    cli = got(campaign, "sampling")["out"] / "samples.npz"            # the killed-and-resumed CLI run
    sample(load_config(SamplingConfig, None, SAMPLE_ARGS), models["ar"], tmp_path / "a")
    a, b = _arrays(tmp_path / "a" / "samples.npz"), _arrays(cli)
    assert all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert (tmp_path / "a" / "samples.npz").read_bytes() == cli.read_bytes()   # the file, byte for byte
    assert len(np.unique(a["codes"].reshape(12, -1), axis=0)) > 1    # not trivially constant


# ========================================================================== slow: more trials
@pytest.mark.slow
def test_interruption_chains_random_trials_slow(tmp_path, store):
    """Three more random signal/kill chains per trainer, and a SIGKILL inside an AR checkpoint write."""
    rng = random.Random(SEED + 7)

    def ar_hang(run, n):
        marker = run.parent / f"{run.name}.in_save"
        p = start(ar_argv(store, run), run.parent / f"{run.name}.hang", ["--hang-save", str(n), str(marker)])
        interrupt_when(p, marker.is_file, signal.SIGKILL, 0.0, rng)
        rc, _, err = finish(p)
        assert rc == -signal.SIGKILL and latest_step(run) == n - 1, (rc, latest_step(run), err[-1500:], WHY)
        run_ok(ar_argv(store, run), run.parent / f"{run.name}.resume")
        return run

    with ThreadPoolExecutor(max_workers=3) as pool:
        refs = {"tokenizer": pool.submit(ref_run, tok_argv(tmp_path / "tref"), tmp_path / "tref"),
                "ar": pool.submit(ref_run, ar_argv(store, tmp_path / "aref"), tmp_path / "aref")}
        trials = [(kind, pool.submit(job_chain, kind, tmp_path / f"{kind}{i}", store, rng.randrange(1 << 30)))
                  for kind in ("tokenizer", "ar") for i in range(3)]
        hang = pool.submit(ar_hang, tmp_path / "ahang", rng.randint(2, STEPS - 1))
        for kind, fut in trials:
            r = fut.result()
            assert r["kill"]["rc"] == -signal.SIGKILL and r["signal"]["latest"] == r["signal"]["row"], WHY
            check_final(r["run"], refs[kind].result())
        check_final(hang.result(), refs["ar"].result())
