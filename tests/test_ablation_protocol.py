"""Issue 23: the tokenizer-study protocol (>= 3 seeds, t intervals, convergence-driven steps with a
cap, per-row results.json, seed-by-seed resume), at a tiny size."""
import json
import math

import pytest

from bench import tokenizer_ablation as ab

TINY = ["--study", "tokenizer_ablation", "--rows", "c_vq_g1_k1024", "--seeds", "0,1,2", "--min-steps", "5",
        "--max-steps", "10", "--eval-every", "1", "--eval-batches", "1", "--eval-images", "16", "--batch", "8",
        "--set", "data.limit=64", "--set", "quantizer.revive_every=0"]


def test_ci95_is_the_student_t_half_width():
    assert math.isclose(ab.ci95([1.0, 2.0, 3.0]), 4.302652729930 / math.sqrt(3), rel_tol=1e-9)  # t(0.975, 2)
    xs = [20.1, 20.5, 19.9, 20.3]
    s = math.sqrt(sum((x - sum(xs) / 4) ** 2 for x in xs) / 3)
    assert math.isclose(ab.ci95(xs), 3.182446305284 * s / 2, rel_tol=1e-9)                     # t(0.975, 3)
    assert ab.ci95([20.0]) is None


def test_paired_difference_matches_seeds_and_reads_a_results_file(tmp_path, capsys):
    from eval.study_stats import main, paired_difference

    p = paired_difference({0: 30.0, 1: 29.5, 2: 29.0, 3: 1.0}, {0: 29.0, 1: 30.0, 2: 28.0})   # seed 3 unpaired
    assert p["seeds"] == [0, 1, 2] and p["diffs"] == [1.0, -0.5, 1.0] and p["negative"] == 1
    assert math.isclose(p["mean"], 0.5) and math.isclose(p["ci95"], ab.ci95([1.0, -0.5, 1.0]))
    res = {"rows": [{"row": "a", "per_seed": [{"seed": 0, "psnr_native_per_image": 2.0}, {"seed": 1, "psnr_native_per_image": 4.0}]},
                    {"row": "b", "per_seed": [{"seed": 1, "psnr_native_per_image": 1.0}, {"seed": 0, "psnr_native_per_image": 1.5}]}]}
    f = tmp_path / "results.json"
    f.write_text(json.dumps(res))
    out = main([str(f), "--paired", "a,b"])
    assert out[0]["diffs"] == [0.5, 3.0] and "+1.75" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no row 'c'"):
        main([str(f), "--paired", "a,c"])


def test_convergence_window_and_growth():
    curve = [(s, p) for s, p in zip(range(100, 1001, 100), [10, 12, 13, 14, 14.5, 14.8, 15, 15.1, 15.15, 15.2])]
    c = ab.convergence(curve, 1000, 0.2)       # eval at 800 (15.1) -> 1000 (15.2): +0.1 dB
    assert c["converged"] and math.isclose(c["gain_last_fifth_db"], 0.1, abs_tol=1e-9)
    assert not ab.convergence(curve[:5], 500, 0.2)["converged"]   # 400 -> 500: +0.5 dB
    a = type("A", (), {"eval_every": 100, "grow": 1.5, "max_steps": 2500})()
    assert [ab.next_target(s, a) for s in (1000, 1500, 2000)] == [1500, 2500, 2500]


def test_psnr_at_a_fixed_budget_ignores_steps_past_it():
    curve = [(s, float(s // 100)) for s in range(100, 5001, 100)]       # 1 dB per 100 steps
    assert ab.at_budget(curve, 2500) == pytest.approx((21 + 22 + 23 + 24 + 25) / 5)
    assert ab.at_budget(curve[:20], 2500) is None                        # stopped at 2,000: no figure
    assert ab.at_budget([(100, 9.0), (200, 11.0)], 200) == 10.0          # fewer points than the window


def test_protocol_writes_rows_with_intervals_and_resumes_seed_by_seed(tmp_path, monkeypatch):
    args = TINY + ["--out", str(tmp_path / "res"), "--work", str(tmp_path / "work")]
    R = ab.main(args)
    data = json.loads((tmp_path / "res" / "tokenizer_ablation" / "results.json").read_text())
    assert data["protocol"]["seeds"] == [0, 1, 2] and data["protocol"]["threads"] == 1
    (row,) = data["rows"]
    for k in ("row", "seeds", "steps", "converged", "bits_per_image", "psnr_native_mean", "psnr_native_ci95",
              "usage_mean", "curves"):
        assert k in row
    assert row["row"] == "c_vq_g1_k1024" and row["seeds"] == [0, 1, 2] and not row["partial"]
    assert row["bits_per_image"] == 64 * 10
    for seed, steps in zip(row["seeds"], row["steps"]):
        curve = row["curves"][str(seed)]
        assert steps in (5, 10) and curve[-1][0] == steps and len(curve) == steps   # an eval every step
        conv = ab.convergence([tuple(p) for p in curve], steps, 0.2)["converged"]
        assert row["converged_per_seed"][seed] == conv and (conv or steps == 10)    # grown to the cap if not
    assert row["converged"] == all(row["converged_per_seed"])
    vals = [s["psnr_native_per_image"] for s in row["per_seed"]]
    assert math.isclose(row["psnr_native_mean"], sum(vals) / 3, rel_tol=1e-12)
    assert math.isclose(row["psnr_native_ci95"], ab.ci95(vals), rel_tol=1e-12)
    assert row["native_basis"].startswith("28x28")
    assert all(0 < s["usage"] <= 1 for s in row["per_seed"])
    # the fixed-budget figure: every seed's held-out PSNR at --min-steps (mean of its last 5 evals there)
    at = [sum(p for st, p in row["curves"][str(sd)] if st <= 5) / 5 for sd in row["seeds"]]
    assert row["budget_steps"] == 5 and row["psnr_at_budget_per_seed"] == pytest.approx(at, rel=1e-12)
    assert math.isclose(row["psnr_at_budget_mean"], sum(at) / 3, rel_tol=1e-12)
    assert math.isclose(row["psnr_at_budget_ci95"], ab.ci95(at), rel_tol=1e-12)
    assert (tmp_path / "res" / "tokenizer_ablation" / "table.md").read_text().count("VQ G1×1024") == 1

    # a rerun trains nothing (every seed reused); losing one seed's record retrains exactly that seed
    calls = []
    real_train = ab.train
    monkeypatch.setattr(ab, "train", lambda cfg, out: calls.append(cfg.train.seed) or real_train(cfg, out))
    assert ab.main(args)["rows"][0]["per_seed"] == R["rows"][0]["per_seed"]
    assert calls == []
    # a fresh checkout (no run folders) reuses the finished seeds kept beside the results
    import shutil
    shutil.copytree(tmp_path / "work", tmp_path / "work_saved")
    shutil.rmtree(tmp_path / "work")
    assert ab.main(args)["rows"][0]["per_seed"] == R["rows"][0]["per_seed"] and calls == []
    shutil.rmtree(tmp_path / "work")
    shutil.copytree(tmp_path / "work_saved", tmp_path / "work")
    (tmp_path / "work" / "c_vq_g1_k1024" / "seed1" / "seed.json").unlink()
    (tmp_path / "res" / "tokenizer_ablation" / "seeds" / "c_vq_g1_k1024" / "seed1.json").unlink()
    partial = ab.collect("tokenizer_ablation", _ns(args), tmp_path / "work", tmp_path / "res" / "tokenizer_ablation")
    assert partial["rows"][0]["partial"] and not partial["rows"][0]["converged"]
    assert partial["rows"][0]["seeds"] == [0, 2]
    (run,) = partial["rows"][0]["in_progress"]          # the unfinished seed is listed with its curve
    assert run["seed"] == 1 and [list(p) for p in run["curve"]] == R["rows"][0]["curves"]["1"]
    ab.main(args)
    assert set(calls) == {1}


def test_a_kept_record_predating_a_config_field_is_reused_only_at_that_fields_default():
    a = _ns(TINY)
    row = next(r for r in ab.STUDIES["tokenizer_ablation"] if r[0] == "c_vq_g1_k1024")
    key = ab.seed_key(row, 0, a)
    assert key["config"]["train"]["schedule"] == "constant"
    old = json.loads(json.dumps(key))
    del old["config"]["train"]["schedule"]             # a record written before the field existed
    assert old != key and ab.key_matches(old, key)
    assert not ab.key_matches(old, ab.seed_key((*row[:4], row[4] + ["train.schedule=cosine"]), 0, a))
    assert not ab.key_matches(key, ab.seed_key(row, 1, a))                # another seed
    old["protocol"]["batch"] = 16
    assert not ab.key_matches(old, key)                                   # the protocol has no defaults
    assert not ab.key_matches(None, key)
    official = {"official": "f285b2c", "settings": {"steps": 1500}}   # a key with no config (the official code's)
    assert ab.key_matches(json.loads(json.dumps(official)), official)
    assert not ab.key_matches({**official, "official": "0000000"}, official)


def _ns(args):
    import argparse
    a = argparse.Namespace(min_steps=5, max_steps=10, grow=1.5, eval_every=1, eval_batches=1, eval_images=16,
                           conv_db=0.2, batch=8, seeds=[0, 1, 2], threads=1,
                           set=["data.limit=64", "quantizer.revive_every=0"])
    return a


def test_protocol_refuses_fewer_than_three_seeds(tmp_path):
    with pytest.raises(SystemExit, match=">= 3"):
        ab.main(TINY[:4] + ["--seeds", "0,1"] + ["--out", str(tmp_path)])


@pytest.mark.parametrize("study,entries,bits", [("mgvq_equal_entries", 16384, None), ("equal_bits_1024", None, 1024)])
def test_each_study_row_holds_its_equal_quantity(study, entries, bits):
    """The studies compare at equal codebook entries (16,384) or equal bits per image (1,024): every row's
    resolved tokenizer must have them, whatever its preset's defaults."""
    from groupgen.config import load_config
    from tokenizer.model import build_tokenizer
    from tokenizer.train import TokenizerTrainConfig
    for rid, _fam, _label, preset, overrides in ab.STUDIES[study]:
        lay = build_tokenizer(load_config(TokenizerTrainConfig, ab.REPO / ab.CFG / f"{preset}.yaml", overrides)).layout
        if entries is not None:
            assert sum(lay.K) == entries, (rid, lay.K)
        if bits is not None:
            assert lay.L == 64 and ab.bits_per_image(lay.to_dict()) == bits, (rid, lay.L, lay.K)
