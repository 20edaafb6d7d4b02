"""The reliability tests' shared harness: helpers, fixtures and the subprocess ``campaign``.

The tests live in ``test_reliability_resume.py`` (kill/resume, signals, atomic checkpoints, resumable
sampling/encoding, determinism) and ``test_reliability_inputs.py`` (bad input with clear errors,
untrusted files). ``conftest.py`` registers the fixtures here once per session, so both modules share one
campaign. Subprocess work is gathered in the fixture ``campaign`` and run concurrently (each job is a few
processes of ~10 s, mostly interpreter start-up); the tests then assert on its results. Fault injection
(slowed steps, a hang inside a checkpoint write) comes from ``tests/_kill_helpers.py``. Kill points
are random: set RELIABILITY_SEED to replay one (it is printed in failure messages).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
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
from groupgen.checkpoint import latest_checkpoint, load_state, resolve_checkpoint, save_checkpoint
from groupgen.config import load_config, to_dict
from groupgen.data import DataConfig
from groupgen.layout import TokenLayout
from groupgen.tokens import TokenStoreWriter

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


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="session")
def store(work) -> Path:
    return make_store(work / "store")


@pytest.fixture(scope="session")
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
    # At most STEPS - 3: three slowed rows (>= 0.45 s) then remain after row k2, more than the kill's
    # longest wait (0.3 s); k2 = latest + 2 = 6 left two rows, and a loaded host let the run finish first.
    r["k2"] = k2 = min(r["signal"]["latest"] + rng.randint(1, 2), STEPS - 3)
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


@pytest.fixture(scope="session")
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


def _arrays(f) -> dict[str, np.ndarray]:
    with np.load(f) as z:
        return {k: z[k] for k in z.files}
