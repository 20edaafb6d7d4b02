"""Reliability through the real CLIs: SIGKILL/SIGTERM/SIGINT then resume equals an uninterrupted run,
atomic checkpoints (kill inside a write, full disk, pointers), resumable sampling and encoding, and
bit-identical reruns. The subprocess work runs once per session in ``_campaign.campaign``."""
from __future__ import annotations

import json
import random
import re
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from _campaign import (ENCODE_ARGS, SAMPLE_ARGS, SEED, STEPS, TOK_ARGS, TOK_CFG, WHY, _arrays, ar_argv, case,
                       finish, got, interrupt_when, job_chain, latest_step, ref_run, run_ok, start, tok_argv,
                       trajectory, weights)
from groupgen.checkpoint import latest_checkpoint, load_state, load_tensors, resolve_checkpoint, save_checkpoint
from groupgen.config import load_config
from groupgen.runs import MetricsLog, read_jsonl

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
    for f in ("codes.npy", "labels.npy"):
        assert (one / f).read_bytes() == (r["out"] / f).read_bytes(), f
    # the header alike but for codes.npy's own size-and-mtime stamp
    h1, h2 = (json.loads((d / "header.json").read_text()) for d in (one, r["out"]))
    assert h1.pop("codes_stamp")["size"] == h2.pop("codes_stamp")["size"] and h1 == h2


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
