"""pipeline.compare: a tiny two-layout comparison end to end, its outputs, caching, and config errors;
the Makefile's bench target."""
import dataclasses
import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.compare import CompareConfig, main
from groupgen.config import ConfigError, load_config

CONFIG = "configs/main/compare_fmnist.yaml"
TINY_DOMAIN = ("domain.train_limit=2000,domain.test_limit=2000,domain.epochs=1,domain.width=8,domain.hidden=32,"
               "domain.batch_size=64,domain.lr=5e-3")


def tiny_overrides(out: Path, cache: Path) -> list[str]:
    return [
        f"out={out}", "threads=1", "select=[vq_g1,mgvq_g4_subtoken]",
        "tokenizer_overrides=[train.threads=1,train.steps=8,data.limit=512,train.eval_every=4,train.eval_batches=1,"
        "train.sample_every=0,train.ckpt_every=0]",
        "encode.train_limit=256", "encode.val_limit=128", "encode.batch_size=128",
        "ar.overrides=[train.threads=1,train.steps=20,train.warmup_steps=2,train.batch_size=16,train.log_every=5,"
        "train.eval_batches=2,model.preset=micro]",
        "quality.every=10", "quality.sampling.overrides=[per_class=3,cfg_scale=3.0,batch_size=30,precision=fp32]",
        f"quality.overrides=[cache={cache},ref_n=300,isc_splits=1,{TINY_DOMAIN}]",
        "stats.recon_images=128", "stats.layout_overrides=[spm_train_images=100,spm_eval_images=50,spm_extra_vocab=64]",
        "quality.floor_draws=2", f"results={out.parent / 'study' / 'results.json'}", "seeds=[0,1]",
        f"archive={out.parent / 'archive'}",
    ]


def test_tiny_comparison_end_to_end_and_cached_rerun(tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    res = main(["--config", CONFIG, *tiny_overrides(out, tmp_path / "cache")])
    for f in ("compare.md", "compare.json", "quality_vs_steps.png", "config.yaml"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert (out / "quality_vs_steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "compare.json").read_text())
    rows = {r["name"]: r for r in saved["rows"]}
    assert list(rows) == ["vq_g1", "mgvq_g4_subtoken"]
    # both rows pinned to the same bit budget by the config's codebook overrides
    assert (rows["vq_g1"]["L"], rows["vq_g1"]["G"], rows["vq_g1"]["K"]) == (64, 1, [256])
    assert (rows["mgvq_g4_subtoken"]["G"], rows["mgvq_g4_subtoken"]["K"]) == (4, [4, 4, 4, 4])
    for r in rows.values():
        assert r["bits_per_image"] == pytest.approx(512.0)
        assert math.isfinite(r["recon"]["psnr"]) and 0 < r["recon"]["usage_mean"] <= 1
        ls = r["layout_stats"]
        assert 0 < ls["sum_position_entropy_bits"] <= 512 + 1e-6      # entropy never exceeds the layout bits
        assert ls["tokens_per_image"] <= ls["raw_tokens_per_image"] == r["L"] * r["G"]
        assert [c["step"] for c in r["curve"]] == [10, 20]               # every 10 steps incl. the final one
        for c in r["curve"]:
            assert math.isfinite(c["fid"]) and c["fid"] > 0
            assert 0.0 <= c["class_acc"] <= 1.0
            # val NLL in bits per image = mean CE (nats) * L * G / ln 2; below ~uniform (= the layout bits)
            assert c["val_nll_bits"] == pytest.approx(c["val_loss"] * r["L"] * r["G"] / math.log(2))
            assert 0 < c["val_nll_bits"] < 1.1 * r["bits_per_image"]
        assert r["params"] > 0 and r["final"]["step"] == 20
    base = saved["real_train_vs_ref"]
    assert base["num_samples"] == 30 and base["fid"] < min(c["fid"] for r in rows.values() for c in r["curve"])
    fl = saved["fid_floor"]   # the equal-N floor: real train images at the samples' N, two seeded draws
    assert (fl["n"], fl["draws"], fl["seeds"]) == (30, 2, [0, 1]) and 0 < fl["fid_mean"] == pytest.approx(
        sum(fl["fid"]) / 2)
    study = json.loads((tmp_path / "study" / "results.json").read_text())
    assert [r["row"] for r in study["rows"]] == ["vq_g1", "mgvq_g4_subtoken"]
    for sr in study["rows"]:
        r = rows[sr["row"]]
        assert sr["seeds"] == [0, 1] and sr["steps"] == 20 and sr["tokenizer_steps"] == 8
        assert sr["bits_per_image"] == pytest.approx(512.0) and sr["fid_floor"] == fl["fid_mean"]
        assert sr["fid_mean"] == r["final"]["fid"] and sr["fid_ratio"] == pytest.approx(sr["fid_mean"] / fl["fid_mean"])
        fids = [p["fid"] for p in sr["per_seed"]]                        # 95% t interval over the 2 AR seeds
        assert len(set(fids)) == 2 and sr["fid_ci95"] == pytest.approx(12.7062047 * np.std(fids, ddof=1) / math.sqrt(2))
        assert sr["nll_bits_per_image"] == r["final"]["val_nll_bits"]
        assert sr["psnr_native_mean"] == r["recon"]["psnr_native_per_image"]
        curve = sr["tokenizer_curve"]                                    # what `converged` was judged on
        assert [st for st, _ in curve] == [4, 8] and sr["gain_last_fifth_db"] == pytest.approx(curve[1][1] - curve[0][1])
        assert sr["converged"] == (sr["gain_last_fifth_db"] < 0.2)
    md = (out / "compare.md").read_text()
    assert "Equal-N floor: 2 draws of N=30" in md
    g = study["rows"][0]["gain_last_fifth_db"]
    assert f"vq_g1 8 steps, {g:.2f} dB ({'converged' if g < 0.2 else 'not converged'})" in md
    assert md.count("| vq_g1 |") == 1 and md.count("| mgvq_g4_subtoken |") == 1
    # intermediate AR checkpoints keep weights for sampling but drop the DeepSpeed state
    ar_dirs = sorted((out / "stages").glob("3_ar-*"))
    assert len(ar_dirs) == 4                                             # 2 rows x 2 AR seeds
    assert not (ar_dirs[0] / "checkpoints" / "step_00000010" / "engine").exists()
    assert (ar_dirs[0] / "checkpoints" / "step_00000020" / "engine").is_dir()

    # a re-run reuses every finished stage: same numbers, no new stage folders
    before = sorted(p.name for p in (out / "stages").iterdir())
    res2 = main(["--config", CONFIG, *tiny_overrides(out, tmp_path / "cache")])
    assert sorted(p.name for p in (out / "stages").iterdir()) == before
    assert [c["fid"] for r in res2["rows"] for c in r["curve"]] == [c["fid"] for r in res["rows"] for c in r["curve"]]
    # a run stopped at step 15 and resumed keeps its resume checkpoint: off the quality schedule, never scored
    resume = ar_dirs[0] / "checkpoints" / "step_00000015"
    shutil.copytree(ar_dirs[0] / "checkpoints" / "step_00000010", resume)
    res_resumed = main(["--config", CONFIG, *tiny_overrides(out, tmp_path / "cache")])
    assert [[c["step"] for c in r["curve"]] for r in res_resumed["rows"]] == [[10, 20], [10, 20]]
    assert [c["n_seeds"] for r in res_resumed["rows"] for c in r["curve"]] == [2, 2, 2, 2]
    assert sorted(p.name for p in (out / "stages").iterdir()) == before           # nothing sampled at step 15
    shutil.rmtree(resume)
    # a redo of compare's own stats stage: recomputed once, re-archived, and what it replaced removed at the end
    stats = sorted((out / "stages").glob("2_stats-*"))
    first = [(d / "DONE.json").read_bytes() for d in stats]
    main(["--config", CONFIG, *tiny_overrides(out, tmp_path / "cache"), "redo=[stats]"])
    assert sorted(p.name for p in (out / "stages").iterdir()) == before                # no .old-* left behind
    assert [(d / "DONE.json").read_bytes() for d in stats] != first
    assert [(tmp_path / "archive" / d.name / "DONE.json").read_bytes() for d in stats] == \
        [(d / "DONE.json").read_bytes() for d in stats]
    main(["--config", CONFIG, *tiny_overrides(out, tmp_path / "cache")])                 # and a plain rerun reuses
    assert sorted(p.name for p in (out / "stages").iterdir()) == before

    # a machine that starts empty: the archive alone brings back every finished stage but the token stores
    archive = tmp_path / "archive"
    kept = {p.relative_to(archive).as_posix() for p in archive.rglob("*") if p.is_file()}
    assert not any("encode" in k or k.endswith(("state.pt", ".npz", ".bin")) for k in kept)
    assert {k.split("/")[0].split("_")[0] for k in kept} == {"1", "2", "3", "4", "5", "extractor"}
    assert not any("_ar-" in k and "safetensors" in k for k in kept)                # AR weights: done with
    tok = [k for k in kept if k.startswith("1_tokenizer-") and k.endswith("model.safetensors")]
    assert len(tok) == 2                                                            # one tokenizer a row
    clf = [k for k in kept if k.startswith("extractor/") and k.endswith("model.safetensors")]
    assert len(clf) == 1                                    # the domain classifier every FID came from
    trained = (tmp_path / "cache" / "domain" / Path(clf[0]).parent.name / "model.safetensors").read_bytes()
    shutil.rmtree(out)
    shutil.rmtree(tmp_path / "cache" / "domain")

    def no_training(*a, **k):
        raise AssertionError("the archived domain classifier must be restored, not retrained")

    monkeypatch.setattr("eval.domain.train_domain_classifier", no_training)
    res3 = main(["--config", CONFIG, *tiny_overrides(out, tmp_path / "cache")])
    assert (tmp_path / "cache" / "domain" / Path(clf[0]).parent.name / "model.safetensors").read_bytes() == trained
    assert sorted(p.name for p in (out / "stages").iterdir()) == before              # encode redone, rest restored
    assert not list((out / "stages").glob("3_ar-*/checkpoints/*/model.safetensors"))  # no AR run retrained
    assert [c["fid"] for r in res3["rows"] for c in r["curve"]] == [c["fid"] for r in res["rows"] for c in r["curve"]]
    assert res3["fid_floor"] == res["fid_floor"]
    other = [o.replace("cfg_scale=3.0", "cfg_scale=2.0") for o in tiny_overrides(out, tmp_path / "cache")]
    with pytest.raises(ConfigError, match="restored from the archive as records only.*redo=\\[ar\\]"):
        main(["--config", CONFIG, *other])                  # another sampling recipe needs the weights back
    cached = tmp_path / "cache" / "domain" / Path(clf[0]).parent.name / "model.safetensors"
    cached.write_bytes(trained[:-1] + bytes([trained[-1] ^ 1]))                     # another machine's retrain
    with pytest.raises(ConfigError, match="domain classifier cached at .* other weights .*extractor"):
        main(["--config", CONFIG, *tiny_overrides(out, tmp_path / "cache")])     # FIDs must not mix extractors


def test_jobs_deal_rows_sharing_a_tokenizer_to_one_worker():
    from pipeline.parallel import deal_rows, worker_commands

    rows = [("vq", "a"), ("g4_ind", "b"), ("g8_ind", "c"), ("qg", "d"), ("g4_sub", "b"), ("g8_sub", "c")]
    assert deal_rows(rows, 2) == [["vq", "g8_ind", "g8_sub"], ["g4_ind", "g4_sub", "qg"]]
    assert deal_rows(rows, 9) == [["vq"], ["g4_ind", "g4_sub"], ["g8_ind", "g8_sub"], ["qg"]]   # no idle worker
    assert deal_rows(rows, 1) == [["vq", "g4_ind", "g4_sub", "g8_ind", "g8_sub", "qg"]]
    cmd = worker_commands("c.yaml", ["out=x", "select=[vq,qg]"], [["vq"], ["qg"]])[1]
    assert cmd[-2:] == ["select=[qg]", "--rows-only"] and cmd[cmd.index("--config") + 1] == "c.yaml"


def test_jobs_sigterm_stops_every_worker_and_the_caller_exits(tmp_path):
    # the handler runs inside Popen.wait (which holds that Popen's wait lock): it must forward and return
    import signal
    import sys
    import time

    worker = [sys.executable, "-c", "import time; time.sleep(120)", "rows", "--rows-only"]
    driver = (f"import sys; sys.path.insert(0, {str(Path.cwd())!r}); from pipeline.parallel import run_workers; "
              f"run_workers({[worker, worker]!r}, log=lambda m: print(m, flush=True))")
    p = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().startswith("worker 0") and p.stdout.readline().startswith("worker 1")
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    try:
        assert p.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        p.kill()
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(p.pid)], capture_output=True, text=True).stdout
    assert out.strip() == ""                                             # no worker left behind


def test_jobs_2_trains_the_rows_in_two_processes_to_the_same_numbers(tmp_path):
    # two workers (one row each, 1 thread), then one collecting process: the same numbers as one process
    common = [o for o in tiny_overrides(tmp_path / "x", tmp_path / "cache") if not o.startswith(("out=", "seeds="))]
    one = main(["--config", CONFIG, *common, f"out={tmp_path / 'one'}", "seeds=[0]"])
    two = main(["--config", CONFIG, "jobs=2", *common, f"out={tmp_path / 'two'}", "seeds=[0]"])
    fids = lambda res: [(r["name"], c["step"], c["fid"]) for r in res["rows"] for c in r["curve"]]
    assert fids(two) == fids(one) and len(fids(one)) == 4
    assert len(list((tmp_path / "two" / "stages").glob("3_ar-*"))) == 2
    assert two["fid_floor"]["fid"] == one["fid_floor"]["fid"]


def test_jobs_2_redo_runs_once_and_the_classifier_is_trained_before_the_workers(tmp_path, capfd):
    common = [o for o in tiny_overrides(tmp_path / "x", tmp_path / "cache") if not o.startswith(("out=", "seeds="))]
    args = ["--config", CONFIG, "jobs=2", *common, f"out={tmp_path / 'two'}", "seeds=[0]"]
    main(args)
    log = capfd.readouterr().err
    assert log.count("training the domain classifier") == 1                    # by the caller, for both workers
    assert log.index("training the domain classifier") < log.index("worker 0:")
    main(args + ["redo=[eval]"])
    log = capfd.readouterr().err
    # 2 rows x 2 checkpoints scored again by the workers, the floor and the baseline by the caller: no more
    assert log.count("stage eval: running") == 4 + 2
    assert not list((tmp_path / "two" / "stages").glob(".old-*"))


def test_both_mgvq_head_rows_share_one_tokenizer_key_and_config_errors():
    cfg = load_config(CompareConfig, CONFIG)
    names = [r.name for r in cfg.rows()]
    assert names == ["vq_g1", "mgvq_g4_indep", "mgvq_g4_subtoken", "qgvae_seq"]   # extras only on request
    every = [r.name for r in load_config(CompareConfig, CONFIG, ["select=[all]"]).rows()]
    assert every[:4] == names and {"vq_g1_subtoken", "rvq_d4", "fsq", "lfq_g2", "emavq"} == set(every[4:])
    indep, sub = cfg.layouts[1], cfg.layouts[2]
    assert indep.tokenizer == sub.tokenizer and indep.ar_overrides != sub.ar_overrides
    # workers are dealt rows by the tokenizer config they load, not by the override text
    from groupgen.config import config_hash
    from pipeline.compare import tokenizer_config

    spelled = dataclasses.replace(indep, tokenizer=dataclasses.replace(
        indep.tokenizer, overrides=indep.tokenizer.overrides + [f"train.seed={tokenizer_config(cfg, indep).train.seed}"]))
    assert config_hash(tokenizer_config(cfg, spelled)) == config_hash(tokenizer_config(cfg, indep))
    assert config_hash(tokenizer_config(cfg, cfg.layouts[0])) != config_hash(tokenizer_config(cfg, indep))
    with pytest.raises(ConfigError, match="unknown rows"):
        load_config(CompareConfig, CONFIG, ["select=[nope]"])
    with pytest.raises(ConfigError, match="redo"):
        load_config(CompareConfig, CONFIG, ["redo=[tokeniser]"])
    with pytest.raises(ConfigError, match="unique"):
        load_config(CompareConfig, CONFIG, ["layouts=[{name: a}, {name: a}]"])


def test_real_train_baseline_uses_the_configured_ref_resize(tmp_path, monkeypatch):
    import eval.fidelity
    import eval.generation
    from pipeline.compare import Comparison

    cfg = load_config(CompareConfig, CONFIG, [f"out={tmp_path / 'cmp'}", "quality.overrides=[ref_resize=resize]"])
    seen = {}

    def fake_dataset_images(name, split, hw, n=0, resize="pad"):
        seen.update(name=name, split=split, n=n, resize=resize)
        return np.zeros((n, *hw, 3), np.uint8), np.zeros(n, np.int64)

    monkeypatch.setattr(eval.fidelity, "dataset_images", fake_dataset_images)
    monkeypatch.setattr(eval.generation, "evaluate_samples",
                        lambda images, labels, ref, e_cfg, log=None: {"fid": 0.0, "ref_resize": e_cfg.ref_resize})
    out = Comparison(cfg).real_baseline(30, (32, 32))
    # the real side is resized like the reference it is compared with (default "pad" would differ)
    assert seen == {"name": "fmnist", "split": "train", "n": 30, "resize": "resize"}
    assert out["ref_resize"] == "resize"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_bench_needs_llamagen_and_gives_each_script_its_own_args(tmp_path):
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(["make", "-s", "llamagen-check"], cwd=root, capture_output=True, text=True)
    assert r.returncode != 0 and "LLAMAGEN" in r.stderr and "make bench LLAMAGEN=" in r.stderr
    r = subprocess.run(["make", "llamagen-check", f"LLAMAGEN={tmp_path / 'missing'}"], cwd=root,
                       capture_output=True, text=True)
    assert r.returncode != 0 and str(tmp_path / "missing") in r.stderr
    # dry run: print the commands only
    r = subprocess.run(["make", "-n", "bench", f"LLAMAGEN={tmp_path}", "AR_ARGS=--quick", "STORE_ARGS=--n 10",
                        "TOK_ARGS=--batch 1", "ARGS=--nope"], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = {w[1]: ln for ln in r.stdout.splitlines() if (w := ln.split())[1:2] and w[1].startswith("bench/")}
    assert lines["bench/ar_vs_llamagen.py"].endswith(f'--llamagen "{tmp_path}" --quick')
    assert lines["bench/token_store.py"].endswith("token_store.py --n 10")
    assert lines["bench/tokenizer_speed.py"].endswith("tokenizer_speed.py --batch 1")
    assert "--nope" not in r.stdout


def test_the_verdict_rows_train_their_priors_for_equal_flops():
    """configs/main/compare_verdict_fmnist.yaml holds the prior's training compute equal across layouts and
    heads: FLOPs of one step (fwd + bwd, counted by torch on the meta device, where the model runs plain
    PyTorch ops) x the row's steps agree within 0.1%."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ar_model import GPT
    from ar_model.train import ARTrainConfig, resolve_gpt_config
    from tokenizer.model import build_tokenizer
    from tokenizer.train import TokenizerTrainConfig

    cfg = load_config(CompareConfig, "configs/main/compare_verdict_fmnist.yaml")
    budgets = {}
    for spec in cfg.rows():
        lay = build_tokenizer(load_config(TokenizerTrainConfig, spec.tokenizer.config,
                                          spec.tokenizer.overrides + cfg.tokenizer_overrides)).layout
        ar = load_config(ARTrainConfig, cfg.ar.config, cfg.ar.overrides + spec.ar_overrides)
        gpt = GPT(resolve_gpt_config(ar.model), lay, 10).to("meta")
        gpt.check_inputs = False
        with torch.device("meta"):
            codes = torch.zeros(ar.train.batch_size, lay.L, lay.G, dtype=torch.long)
            with FlopCounterMode(display=False) as fc:
                gpt.loss(codes, torch.zeros(ar.train.batch_size, dtype=torch.long))[0].backward()
        budgets[spec.name] = fc.get_total_flops() * ar.train.steps
    lo, hi = min(budgets.values()), max(budgets.values())
    assert hi / lo < 1.001, budgets
    assert len(budgets) == 7 and lo > 6e13                       # 4,800 steps x 12.9 GFLOP


def test_one_comparison_per_out_folder(tmp_path):
    """A second comparison on a folder in use is refused, naming the holder, before it touches anything."""
    import sys

    out = tmp_path / "cmp"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys, time; sys.path.insert(0, {str(Path.cwd())!r}); "
         f"from groupgen.runlock import hold_run_folder; l = hold_run_folder({str(out)!r}, 'pipeline.compare'); "
         "print('held', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = ["--config", CONFIG, *tiny_overrides(out, tmp_path / "cache")]
        from groupgen.runlock import RunLockedError
        with pytest.raises(RunLockedError, match=f"run folder {out} is in use by pid {holder.pid}.*pipeline.compare"):
            main(args)
        cli = subprocess.run([sys.executable, "-m", "pipeline.compare", *args], capture_output=True, text=True)
        assert cli.returncode == 1 and cli.stderr.startswith("python -m pipeline.compare: error: run folder")
        assert "Traceback" not in cli.stderr
        assert sorted(p.name for p in out.iterdir()) == [".groupgen.lock"]   # nothing written
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "archive").exists()
