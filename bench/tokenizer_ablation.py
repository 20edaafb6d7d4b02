"""Stage-1 tokenizer studies on Fashion-MNIST (CPU) under one protocol (issue 23).

    python bench/tokenizer_ablation.py --study mgvq_equal_entries [--rows ID,..|FAMILY,..] [--seeds 0,1,2]
        [--min-steps 1000 --max-steps 5000 --eval-every 100] [--threads 1] [--out bench/results]

Protocol, for every row of a study:
* >= 3 seeds (``--seeds``); each seed trains ``tokenizer.train.train`` in this process, 1 thread by
  default, so two processes (two rows, or two seed lists) share a 2-core host;
* it trains until the held-out PSNR (``train.eval_psnr``: ``--eval-batches`` test batches every
  ``--eval-every`` steps) gains < ``--conv-db`` (0.2 dB) over the last fifth of its steps: from
  ``--min-steps`` the target grows by half (``--grow``) until converged or ``--max-steps``, where the
  seed is kept with ``converged: false`` and its curve;
* each seed is then scored by ``eval.reconstruction.evaluate_tokenizer`` on ``--eval-images`` test
  images, on the 32x32 model basis and on the native 28x28 basis (``eval.native_metrics``);
* a row reports mean and a 95% interval over its seeds (Student t, n - 1 degrees of freedom;
  ``ci95`` is the half-width) and every seed's curve.

Resumable seed by seed: ``WORK/<row>/seed<k>/seed.json`` and its copy ``OUT/<study>/seeds/<row>/seed<k>.json``
(committed with the results, so a fresh checkout reuses it) hold a finished seed (reused while the
protocol settings match, ``--fresh`` retrains), ``progress.json`` the current step target, and
``tokenizer.train`` resumes an interrupted seed from its checkpoint. ``OUT/<study>/results.json``
(one object per row: ``row``, ``seeds``, ``steps``, ``converged``, ``partial``, ``bits_per_image``,
``psnr_native_mean``, ``psnr_native_ci95``, ``usage_mean``, ``curves``, ...) is rebuilt under a file
lock from every finished seed on disk after each seed, so concurrent processes never drop rows.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import REPO, key_matches, machine_info, write_json

os.environ.setdefault("GROUPGEN_QUIET", "1")  # no tqdm bars in the benchmark log

from groupgen.config import load_config, to_dict  # noqa: E402
from groupgen.runs import read_jsonl, set_threads  # noqa: E402
from eval.reconstruction import ReconEvalConfig, evaluate_tokenizer  # noqa: E402
from eval.study_stats import ci95, convergence  # noqa: E402
from tokenizer.model import load_tokenizer  # noqa: E402
from tokenizer.train import TokenizerTrainConfig, train  # noqa: E402

CFG = "configs/tokenizer"
MG = ["quantizer.codebook_size=4096"]
MG8 = ["quantizer.codebook_size=2048"]
SWITCH = "quantizer.mask_until_step=1500"   # MGVQ's two stages: masked, then an unmasked fine-tune
# study -> rows (id, family, label, preset, overrides); overrides change the preset only where the row differs
STUDIES = {
    # MGVQ's ablation at equal total codebook entries (16384), the paper's regime of large codebooks
    "mgvq_equal_entries": [
        ("vq_g1_k16384", "a", "VQ G1×16384", "fmnist_vq", ["quantizer.codebook_size=16384"]),
        ("mgvq_g4_k4096_nomask", "a", "MGVQ G4×4096 no mask", "fmnist_mgvq_g4", MG + ["quantizer.nested_mask=false"]),
        ("mgvq_g4_k4096_mask", "a", "MGVQ G4×4096 mask", "fmnist_mgvq_g4", MG + ["quantizer.nested_mask=true"]),
        ("mgvq_g4_k4096_2stage", "a", "MGVQ G4×4096 mask→fine-tune", "fmnist_mgvq_g4",
         MG + ["quantizer.nested_mask=true", SWITCH]),
        ("mgvq_g4_k4096_release", "a", "MGVQ G4×4096 as released (2 stages, soft revival)", "fmnist_mgvq_g4",
         MG + ["quantizer.nested_mask=true", SWITCH, "quantizer.soft_revive=true", "quantizer.revive_every=0"]),
        ("mgvq_g8_k2048_nomask", "a", "MGVQ G8×2048 no mask", "fmnist_mgvq_g8", MG8 + ["quantizer.nested_mask=false"]),
        ("mgvq_g8_k2048_mask", "a", "MGVQ G8×2048 mask", "fmnist_mgvq_g8", MG8 + ["quantizer.nested_mask=true"]),
        ("mgvq_g8_k2048_2stage", "a", "MGVQ G8×2048 mask→fine-tune", "fmnist_mgvq_g8",
         MG8 + ["quantizer.nested_mask=true", SWITCH]),
    ],
    # Equal bits where MGVQ claims to help (issue 23 item 4): 1,024 bits per image on the 8x8 grid (16 bits a
    # position), one big codebook against sub-codebooks, product quantisation and the seed variants. Each row
    # keeps its preset's latent width (VQ 8, MGVQ/PQ 32, RVQ/LFQ/EMA-VQ 16, FSQ 6: one dim per level).
    "equal_bits_1024": [
        ("eb_vq_g1_k65536", "d", "VQ G1×65536", "fmnist_vq", ["quantizer.codebook_size=65536"]),
        ("eb_mgvq_g2_k256", "d", "MGVQ G2×256", "fmnist_mgvq_g4",
         ["quantizer.groups=2", "quantizer.codebook_size=256", "quantizer.nested_mask=false"]),
        ("eb_mgvq_g4_k16", "d", "MGVQ G4×16", "fmnist_mgvq_g4", ["quantizer.codebook_size=16", "quantizer.nested_mask=false"]),
        ("eb_pq_g8_k4", "d", "PQ G8×4", "fmnist_pq", ["quantizer.groups=8", "quantizer.codebook_size=4"]),
        ("eb_rvq_d2_k256", "d", "RVQ 2 depths×256", "fmnist_rvq", ["quantizer.groups=2", "quantizer.codebook_size=256"]),
        ("eb_fsq_65536", "d", "FSQ 8,8,8,8,4,4", "fmnist_fsq", ["quantizer.levels=[8,8,8,8,4,4]", "model.embed_dim=6"]),
        ("eb_lfq_8x2", "d", "LFQ 16 bits (8+8)", "fmnist_lfq", ["model.embed_dim=16", "quantizer.lfq_split=[8,8]"]),
        ("eb_emavq_k65536", "d", "EMA-VQ 65536", "fmnist_emavq", ["quantizer.codebook_size=65536"]),
    ],
    # the 2026-11-23 families: (b) equal bits (768/image), (c) QG-VAE vs VQ at 64 tokens x K 1024
    "tokenizer_ablation": [
        ("b_vq_g1_k4096", "b", "VQ G1×4096", "fmnist_vq", ["quantizer.codebook_size=4096"]),
        ("b_mg_g2_k64", "b", "MG G2×64", "fmnist_mgvq_g4",
         ["quantizer.groups=2", "quantizer.codebook_size=64", "model.embed_dim=16", "quantizer.nested_mask=false"]),
        ("b_mg_g4_k8", "b", "MG G4×8", "fmnist_mgvq_g4", ["quantizer.codebook_size=8", "quantizer.nested_mask=false"]),
        ("c_vq_g1_k1024", "c", "VQ G1×1024 (64 pos)", "fmnist_vq", ["quantizer.codebook_size=1024"]),
        ("c_qgvae_t64_k1024", "c", "QG-VAE 64 tok×1024", "fmnist_qgvae", ["quantizer.codebook_size=1024"]),
    ],
}


def bits_per_image(layout: dict) -> float:
    return layout["L"] * sum(math.log2(k) for k in layout["K"])


def next_target(steps: int, a) -> int:
    """Grow by ``--grow`` in whole convergence windows (5 evals), so 80% of it is an eval step."""
    unit = 5 * a.eval_every
    return min(a.max_steps, max(steps + unit, -(-int(steps * a.grow) // unit) * unit))


def shared_overrides(a, seed: int, steps: int) -> list[str]:
    """The 'same recipe' part of every row; checkpoints every 5 evals and at each target."""
    return [f"train.steps={steps}", f"train.batch_size={a.batch}", f"train.seed={seed}",
            f"train.threads={a.threads}", f"train.eval_every={a.eval_every}", f"train.eval_batches={a.eval_batches}",
            f"train.log_every={math.gcd(a.eval_every, 10)}", "train.sample_every=0",
            f"train.ckpt_every={5 * a.eval_every}", "train.keep_last=1", "train.device=cpu"] + list(a.set)


def protocol(a) -> dict:
    return {k: getattr(a, k) for k in ("min_steps", "max_steps", "grow", "eval_every", "eval_batches",
                                       "eval_images", "conv_db", "batch")}


def kept_seed(results: Path, rid: str, seed: int) -> Path:
    """Where a finished seed's record is kept beside the results (committed with them, so a later
    session on a fresh checkout reuses it instead of training the seed again)."""
    return results / "seeds" / rid / f"seed{seed}.json"


def seed_key(row, seed: int, a) -> dict:
    """What a seed's result depends on: the row's resolved config (steps aside) and the protocol."""
    _rid, _fam, _label, preset, overrides = row
    cfg = load_config(TokenizerTrainConfig, REPO / CFG / f"{preset}.yaml",
                      overrides + shared_overrides(a, seed, a.min_steps))
    return json.loads(json.dumps({"config": {**to_dict(cfg), "train": {**to_dict(cfg.train), "steps": None}},
                                  "protocol": protocol(a)}, default=str))


def run_seed(row, seed: int, a, work: Path, results: Path) -> dict | None:
    """Train (resuming) and evaluate one seed; None when training was interrupted (partial)."""
    rid, _fam, label, preset, overrides = row
    out = work / rid / f"seed{seed}"
    kept = kept_seed(results, rid, seed)
    key = seed_key(row, seed, a)
    cache, prog = out / "seed.json", out / "progress.json"
    for f in (cache, kept):
        if f.exists() and not a.fresh:
            old = json.loads(f.read_text())
            if key_matches(old.get("key"), key):
                print(f"[{rid} seed {seed}] reusing {f}", flush=True)
                return old
    if a.fresh and out.exists():
        import shutil
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    steps = a.min_steps
    if prog.exists() and key_matches(json.loads(prog.read_text()).get("key"), key):
        steps = json.loads(prog.read_text())["target"]
    w0 = time.perf_counter()
    while True:
        prog.write_text(json.dumps({"key": key, "target": steps}))
        print(f"[{rid} seed {seed}] training {label} to step {steps}", flush=True)
        cfg = load_config(TokenizerTrainConfig, REPO / CFG / f"{preset}.yaml",
                          overrides + shared_overrides(a, seed, steps))
        res = train(cfg, out)
        if res.get("interrupted"):
            return None
        metrics = read_jsonl(out / "metrics.jsonl")
        curve = [(m["step"], m["eval_psnr"]) for m in metrics if "eval_psnr" in m]
        conv = convergence(curve, steps, a.conv_db)
        if conv["converged"] or steps >= a.max_steps:
            break
        steps = next_target(steps, a)
    wall = time.perf_counter() - w0
    st = sorted(m["step_time"] for m in metrics[1:] if "step_time" in m) or [float("nan")]
    set_threads(a.threads)
    ev = evaluate_tokenizer(load_tokenizer(res["checkpoint"], "cpu"), ReconEvalConfig(
        n=a.eval_images, batch_size=128, lpips=False, extractor="none", device="cpu"))
    (out / "eval.json").write_text(json.dumps(ev, indent=1))
    layout = res["layout"]
    G = len(layout["K"])
    rec = {"seed": seed, "steps": res["step"], **conv, "curve": curve, "layout": layout,
           "bits_per_image": bits_per_image(layout), "step_time_median_s": st[len(st) // 2], "wall_s": wall,
           **{k: ev[k] for k in ("psnr", "psnr_per_image", "ssim", "psnr_native", "psnr_native_per_image",
                                 "ssim_native", "native_basis")},
           "usage": ev["usage_mean"], "perplexity": ev["perplexity_mean"],
           "usage_per_group": ev["usage"][:G], "key": key}
    cache.write_text(json.dumps(rec, indent=1, default=str))
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(cache.read_text())
    return json.loads(cache.read_text())


def at_budget(curve: list, budget: int, window: int = 5) -> float | None:
    """Held-out PSNR at a fixed step budget: the mean of the last ``window`` curve points at or before
    ``budget`` (smooths the few-image eval noise); None when the curve stops short of the budget.

    Why: the convergence test stops one seed on a plateau that another seed of the same row leaves, so
    the final scores mix budgets (2,500 vs 5,000 steps); every seed reaches ``--min-steps``, where all
    rows compare at equal training steps."""
    if not curve or curve[-1][0] < budget:
        return None
    return statistics.fmean([p for s, p in curve if s <= budget][-window:])


def summarize_row(row, recs: list[dict], seeds: list[int], budget: int) -> dict:
    rid, fam, label, preset, overrides = row
    vals = lambda k: [r[k] for r in recs]  # noqa: E731
    out = {"row": rid, "family": fam, "label": label, "preset": f"{CFG}/{preset}.yaml", "overrides": overrides,
           "seeds": [r["seed"] for r in recs], "seeds_planned": seeds, "partial": len(recs) < len(seeds),
           "steps": vals("steps"), "converged": bool(recs) and len(recs) >= len(seeds) and all(vals("converged")),
           "converged_per_seed": vals("converged"), "gain_last_fifth_db": vals("gain_last_fifth_db"),
           "bits_per_image": recs[0]["bits_per_image"], "layout": recs[0]["layout"],
           "native_basis": recs[0]["native_basis"]}
    # psnr_native: mean of per-image PSNRs on the native basis (the figure); _mse: from the mean MSE
    for name, key in (("psnr_native", "psnr_native_per_image"), ("psnr_native_mse", "psnr_native"),
                      ("ssim_native", "ssim_native"), ("psnr_model", "psnr_per_image"),
                      ("psnr_model_mse", "psnr"), ("ssim_model", "ssim"), ("usage", "usage"),
                      ("step_time_s", "step_time_median_s")):
        out[f"{name}_mean"] = statistics.fmean(vals(key))
        out[f"{name}_ci95"] = ci95(vals(key))
    # every seed at the same step count (``budget``: the protocol's --min-steps)
    at = [v for v in (at_budget(r["curve"], budget) for r in recs) if v is not None]
    out.update(budget_steps=budget, psnr_at_budget_per_seed=at,
               psnr_at_budget_mean=statistics.fmean(at) if at else None, psnr_at_budget_ci95=ci95(at))
    out["per_seed"] = [{k: v for k, v in r.items() if k not in ("key", "curve", "layout")} for r in recs]
    out["curves"] = {str(r["seed"]): r["curve"] for r in recs}
    return out


def _in_progress(rowdir: Path, a) -> list[dict]:
    """Seeds started under this protocol but not finished: step reached, target, held-out curve."""
    out = []
    for prog in sorted(rowdir.glob("seed*/progress.json")):
        d = prog.parent
        if (d / "seed.json").exists() or not (d / "metrics.jsonl").exists():
            continue
        pk = json.loads(prog.read_text())
        if pk.get("key", {}).get("protocol") != json.loads(json.dumps(protocol(a))):
            continue
        m = read_jsonl(d / "metrics.jsonl")
        out.append({"seed": int(d.name[4:]), "step": m[-1]["step"] if m else 0, "target": pk["target"],
                    "curve": [(x["step"], x["eval_psnr"]) for x in m if "eval_psnr" in x]})
    return out


def collect(study: str, a, work: Path, out: Path) -> dict:
    """Rebuild results.json from every finished seed on disk (under a lock: two processes may write)."""
    out.mkdir(parents=True, exist_ok=True)
    with results_lock(work):
        rows = []
        for row in STUDIES[study]:
            recs = []
            for p in sorted((out / "seeds" / row[0]).glob("seed*.json")):   # finished seeds, kept
                r = json.loads(p.read_text())
                if key_matches(r.get("key"), seed_key(row, r["seed"], a)):   # the rule run_seed reuses by
                    recs.append(r)
            running = _in_progress(work / row[0], a)
            if recs:
                rows.append({**summarize_row(row, sorted(recs, key=lambda r: r["seed"]), a.seeds, a.min_steps),
                             "in_progress": running})
            elif running:  # no seed finished yet: the row is listed as partial with its curves so far
                rows.append({"row": row[0], "family": row[1], "label": row[2], "seeds": [], "seeds_planned": a.seeds,
                             "partial": True, "converged": False, "steps": [], "in_progress": running})
        summary = {"study": study, "protocol": {**protocol(a), "seeds": a.seeds, "threads": a.threads,
                                                "set": a.set}, "machine": machine_info(a.threads), "rows": rows}
        write_results(out, summary, table(rows))
    return summary


def _fmt(m, ci, digits=2, scale=1.0) -> str:
    return f"{scale * m:.{digits}f}" + (f" ± {scale * ci:.{digits}f}" if ci is not None else "")


def _budget_cell(r: dict) -> str:
    if r["psnr_at_budget_mean"] is None:
        return ""
    return f"{_fmt(r['psnr_at_budget_mean'], r['psnr_at_budget_ci95'])} ({r['budget_steps']})"


def native_cells(r: dict) -> str:
    """The three native-basis table cells of a summarized row: PSNR per image, PSNR of the mean MSE, SSIM."""
    return (f"| {_fmt(r['psnr_native_mean'], r['psnr_native_ci95'])} "
            f"| {_fmt(r['psnr_native_mse_mean'], r['psnr_native_mse_ci95'])} "
            f"| {_fmt(r['ssim_native_mean'], r['ssim_native_ci95'], 3)} ")


@contextlib.contextmanager
def results_lock(work: Path):
    """Held while a study's results are rebuilt: two processes may collect at once. The lock file lives in
    the (ignored) run dir, not next to the results."""
    work.mkdir(parents=True, exist_ok=True)
    with open(work / ".results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def write_results(out: Path, summary: dict, table_md: str) -> None:
    """results.json (written beside and renamed: a reader never sees half of it) and table.md."""
    tmp = out / "results.json.tmp"
    write_json(tmp, summary)
    os.replace(tmp, out / "results.json")
    (out / "table.md").write_text(table_md)


def table(rows: list[dict]) -> str:
    lines = ["| row | bits/img | seeds | steps | converged | PSNR native (per-image) dB | PSNR native (mean MSE) dB "
             "| SSIM native | PSNR 32×32 (per-image) dB | usage % | step s | held-out PSNR at the min. steps dB |",
             "|" + "---|" * 12]
    for r in rows:
        if not r["seeds"]:
            runs = ", ".join(f"seed {p['seed']} at step {p['step']}" for p in r["in_progress"])
            lines.append(f"| {r['label']} | | 0/{len(r['seeds_planned'])} | {runs} | **partial** | | | | | | | |")
            continue
        conv = "yes" if r["converged"] else ("**partial**" if r["partial"] else "**no**")
        lines.append(f"| {r['label']} | {r['bits_per_image']:.0f} | {len(r['seeds'])}/{len(r['seeds_planned'])} "
                     f"| {'/'.join(str(s) for s in r['steps'])} | {conv} " + native_cells(r) +
                     f"| {_fmt(r['psnr_model_mean'], r['psnr_model_ci95'])} "
                     f"| {_fmt(100 * r['usage_mean'], None if r['usage_ci95'] is None else 100 * r['usage_ci95'], 1)} "
                     f"| {r['step_time_s_mean']:.3f} "
                     f"| {_budget_cell(r)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", default="mgvq_equal_entries", choices=sorted(STUDIES))
    ap.add_argument("--rows", default="", help="row ids and/or families, comma-separated (default: all)")
    ap.add_argument("--seeds", default="0,1,2", help=">= 3 seeds, comma-separated")
    ap.add_argument("--min-steps", type=int, default=1000)
    ap.add_argument("--max-steps", type=int, default=5000, help="step cap: a seed stops here unconverged")
    ap.add_argument("--grow", type=float, default=1.5, help="target growth while not converged")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-batches", type=int, default=8, help="held-out batches per curve point")
    ap.add_argument("--eval-images", type=int, default=2000, help="test images for each seed's final scores")
    ap.add_argument("--conv-db", type=float, default=0.2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: two processes share 2 cores)")
    ap.add_argument("--set", action="append", default=[], help="extra key=value for every row (tests, probes)")
    ap.add_argument("--out", default="bench/results", help="results go to OUT/<study>/")
    ap.add_argument("--work", default="", help="seed run dirs (default runs/bench/<study>)")
    ap.add_argument("--fresh", action="store_true", help="retrain seeds even if a matching seed.json exists")
    a = ap.parse_args(argv)
    a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    if len(set(a.seeds)) < 3:
        raise SystemExit(f"the protocol needs >= 3 distinct seeds, got {a.seeds}")
    if a.min_steps % (5 * a.eval_every) or a.max_steps % (5 * a.eval_every) or a.max_steps < a.min_steps:
        raise SystemExit(f"--min-steps {a.min_steps} and --max-steps {a.max_steps} must be multiples of "
                         f"5 x --eval-every ({5 * a.eval_every}), min <= max: 80% of a target must be an eval")
    rows_all = STUDIES[a.study]
    want = [w.strip() for w in a.rows.split(",") if w.strip()]
    bad = [w for w in want if w not in {r[0] for r in rows_all} | {r[1] for r in rows_all}]
    if bad:
        raise SystemExit(f"unknown rows {bad} in study {a.study}; ids {[r[0] for r in rows_all]}")
    rows = [r for r in rows_all if not want or r[0] in want or r[1] in want]
    set_threads(a.threads)
    out = Path(a.out) / a.study
    work = Path(a.work) if a.work else Path("runs/bench") / a.study
    summary = {}
    for r in rows:
        for seed in a.seeds:
            rec = run_seed(r, seed, a, work, out)
            summary = collect(a.study, a, work, out)
            if rec is None:
                print(f"[{r[0]} seed {seed}] interrupted; rerun to resume", flush=True)
                sys.exit(143)
    summary = summary or collect(a.study, a, work, out)
    print(table(summary["rows"]))
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}")
    return summary


if __name__ == "__main__":
    main()
