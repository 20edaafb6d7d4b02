"""QG-VAE against its official code (issue 23, item 5): one command, one budget, one metric basis.

    git clone https://github.com/DaiDaiLoh/QG-VAE /tmp/QG-VAE      # fetched, never vendored
    OMP_NUM_THREADS=1 .venv/bin/python bench/qgvae_official.py --official /tmp/QG-VAE \
        [--rows official_code,gg_official,gg_best] [--seeds 0,1,2] [--steps 1500] [--threads 1]

``--official`` is the notebook ``QG-VAE.ipynb``, a folder holding it, or a bare git directory of the
repository (its ``HEAD:QG-VAE.ipynb`` is read). Its code cells are taken out with the json module at
run time, written to a module under a temporary folder and imported; nothing of it is copied here.
Rows, each trained for ``--steps`` steps at batch ``--batch`` per seed on groupgen's Fashion-MNIST
32x32 (``groupgen.data``: the same seeded batch order as ``tokenizer.train``):

* ``official_code``: the notebook's ``BaseAE`` trained by the notebook's own training cell (AdamW
  2e-4, its losses, its codebook resets), run as released: one epoch of ``--steps`` batches; images go
  in on [0, 1] like its ``ToTensor`` loader gives them;
* ``gg_official``: groupgen's QG-VAE with that recipe (``configs/tokenizer/fmnist_qgvae_official.yaml``);
* ``gg_best``: groupgen's QG-VAE preset (``configs/tokenizer/fmnist_qgvae.yaml``).

Every row is scored by ``eval.reconstruction.evaluate_tokenizer`` (the official model through
``OfficialTokenizer``, an adapter with ``encode``/``decode_codes``) on ``--eval-images`` test images:
PSNR per image and from the mean MSE on the native 28x28 basis, skimage SSIM, and code usage per
token's codebook. Seconds per step: the median over steps (official: time between the training
cell's batch requests; groupgen: the trainer's ``step_time`` per log window of 10 steps).

Resumable seed by seed: ``OUT/qgvae_official/seeds/<row>/seed<k>.json`` (kept with the results) holds a
finished seed, reused while its settings match (``--fresh`` retrains); ``results.json`` (one object
per row: ``row``, ``seeds``, ``steps``, ``psnr_native_mean``, ``psnr_native_ci95``, ``usage_mean``,
``sec_per_step_median``, ``per_seed``) and ``table.md`` are rebuilt from them under a file lock after
every seed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import REPO, key_matches, machine_info  # noqa: E402

os.environ.setdefault("GROUPGEN_QUIET", "1")

from bench.qgvae_notebook import (NOTEBOOK, check_adapter, data_config, notebook_revision,  # noqa: E402
                                  read_notebook, train_official)
from bench.tokenizer_ablation import CFG, _fmt, native_cells, results_lock, write_results  # noqa: E402
from eval.study_stats import ci95  # noqa: E402
from eval.reconstruction import ReconEvalConfig, evaluate_tokenizer  # noqa: E402
from groupgen.config import load_config, to_dict  # noqa: E402
from groupgen.data import build_dataset  # noqa: E402
from groupgen.runs import read_jsonl, set_threads  # noqa: E402
from tokenizer.model import load_tokenizer  # noqa: E402
from tokenizer.train import TokenizerTrainConfig, train  # noqa: E402

STUDY = "qgvae_official"
# The protocol's seeds (issue 23: three a row). A run given fewer (--seeds 1, to spread seeds over processes)
# adds to this set, never shrinks it: the table says 1/3, not 1/1.
PLANNED_SEEDS = (0, 1, 2)
# (id, label, preset or None for the official code, overrides on the preset: a candidate preset runs as a
# row of its own until its seeds say whether it replaces the best one)
ROWS = [
    ("official_code", "official notebook code (DaiDaiLoh/QG-VAE)", None, []),
    ("gg_official", "groupgen, official recipe (fmnist_qgvae_official)", "fmnist_qgvae_official", []),
    ("gg_best", "groupgen, best preset (fmnist_qgvae)", "fmnist_qgvae", []),
    # the growth-ceiling fix: codes re-fit by Lloyd to 16,384 fresh images' features after steps 100-300
    ("gg_refit", "groupgen, best preset + codebook refit at steps 100/200/300", "fmnist_qgvae",
     ["quantizer.refit_steps=[100,200,300]", "quantizer.refit_images=16384", "quantizer.refit_iters=8"]),
    # usage past 95%: equal-mass refits (Sinkhorn) at 100-300 and at step 1400, then the decoder alone adapts to
    # the fixed codes for the last 100 steps (at --steps 1500)
    ("gg_balanced", "groupgen, best preset + equal-mass refits (100/200/300/1400), decoder-only after 1400",
     "fmnist_qgvae", ["quantizer.refit_steps=[100,200,300,1400]", "quantizer.refit_balance=0.01",
                      "quantizer.refit_images=8192", "quantizer.refit_iters=3", "train.decoder_only_after=1400"]),
]

# ----------------------------------------------------------------------------- rows and seeds

def eval_config(a) -> ReconEvalConfig:
    return ReconEvalConfig(n=a.eval_images, batch_size=128, lpips=False, extractor="none", device="cpu")


def settings(a) -> dict:
    return {"steps": a.steps, "batch": a.batch, "eval_images": a.eval_images, "threads": a.threads}


def group_overrides(a, seed: int) -> list[str]:
    return [f"train.steps={a.steps}", f"train.batch_size={a.batch}", f"train.seed={seed}", f"train.threads={a.threads}",
            "train.eval_every=0", "train.log_every=10", "train.sample_every=0", "train.ckpt_every=500",
            "train.keep_last=3", "train.device=cpu"]


def score(ev: dict) -> dict:
    return {k: ev[k] for k in ("psnr", "psnr_per_image", "ssim", "psnr_native", "psnr_native_per_image",
                               "ssim_native", "native_basis", "usage_mean", "perplexity_mean", "images")}


def row_config(row, seed: int, a) -> TokenizerTrainConfig:
    """A groupgen row's training config: its preset, its overrides, then the run settings."""
    return load_config(TokenizerTrainConfig, REPO / CFG / f"{row[2]}.yaml", row[3] + group_overrides(a, seed))


def seed_key(row, seed: int, a) -> dict:
    """What a seed's result depends on: the official notebook's revision, or groupgen's resolved config;
    and the run settings."""
    if row[2] is None:
        return {"official": a.official_rev, "settings": settings(a)}
    cfg = row_config(row, seed, a)
    return json.loads(json.dumps({"config": to_dict(cfg), "settings": settings(a)}, default=str))


def record_matches(old, row, seed: int, a) -> bool:
    """Whether a kept record belongs to this run: ``key_matches`` on its key. A collect without
    ``--official`` cannot know the notebook's revision, so there an official record matches on the
    settings alone (results.json lists the revisions it holds)."""
    if row[2] is None and a.official_rev == "unknown":
        return isinstance(old, dict) and "official" in old and old.get("settings") == settings(a)
    return key_matches(old, seed_key(row, seed, a))


def run_seed(row, seed: int, a, work: Path, results: Path, nb: dict | None) -> dict:
    rid, label, preset, _ = row
    out = work / rid / f"seed{seed}"
    kept = results / "seeds" / rid / f"seed{seed}.json"
    key = seed_key(row, seed, a)
    if kept.exists() and not a.fresh and key_matches(json.loads(kept.read_text()).get("key"), key):
        print(f"[{rid} seed {seed}] reusing {kept}", flush=True)
        return json.loads(kept.read_text())
    if a.fresh and out.exists():
        import shutil
        shutil.rmtree(out)
    print(f"[{rid} seed {seed}] training {label} for {a.steps} steps", flush=True)
    w0 = time.perf_counter()
    set_threads(a.threads)
    partial = False
    if preset is None:
        tok, times, steps = train_official(nb, seed, a, out, key)
        partial = steps < a.steps
        wall = time.perf_counter() - w0
        set_threads(a.threads)
        x = build_dataset(data_config(), "test").batch(range(8))[0]
        gap = check_adapter(tok, x)
        if gap > 1e-4:
            raise SystemExit(f"OfficialTokenizer differs from BaseAE.forward by {gap}")
        ev = evaluate_tokenizer(tok, eval_config(a), train_data=to_dict(data_config()))
        extra = {"adapter_max_abs_diff": gap}
        times = times[1:]   # the first step (allocation, warm-up) left out
    else:
        res = train(row_config(row, seed, a), out)
        if res.get("interrupted"):
            raise SystemExit(f"[{rid} seed {seed}] interrupted; rerun to resume")
        wall = time.perf_counter() - w0
        # the trainer's mean step time per 10-step log window; the first window (warm-up) left out
        times = [m["step_time"] for m in read_jsonl(out / "metrics.jsonl")[1:] if "step_time" in m]
        set_threads(a.threads)
        ev = evaluate_tokenizer(load_tokenizer(res["checkpoint"], "cpu"), eval_config(a))
        steps, extra = res["step"], {}
    st = sorted(times) or [float("nan")]
    rec = {"seed": seed, "steps": steps, "sec_per_step_median": st[len(st) // 2], "wall_s": wall,
           **score(ev), **extra, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "key": key}
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(ev, indent=1, default=str))
    kept.parent.mkdir(parents=True, exist_ok=True)
    if partial:   # cut by --stop-after: scored where it stands, kept apart from finished seeds
        rec["partial"] = True
        kept.with_name(f"partial_seed{seed}.json").write_text(json.dumps(rec, indent=1, default=str))
        print(f"[{rid} seed {seed}] stopped at step {steps} of {a.steps} (--stop-after); rerun to resume", flush=True)
        return None
    kept.with_name(f"partial_seed{seed}.json").unlink(missing_ok=True)
    kept.write_text(json.dumps(rec, indent=1, default=str))
    return rec


def summarize_row(row, recs: list[dict], seeds: list[int], partial: list[dict]) -> dict:
    """Mean and 95% t interval over the finished seeds; ``in_progress``: seeds cut short, scored at
    the step they reached (not in the means)."""
    rid, label, preset, _ = row
    strip = lambda r: {k: v for k, v in r.items() if k != "key"}  # noqa: E731
    if not recs:
        return {"row": rid, "label": label, "preset": f"{CFG}/{preset}.yaml" if preset else None, "seeds": [],
                "seeds_planned": seeds, "partial": True, "steps": [], "in_progress": [strip(r) for r in partial]}
    vals = lambda k: [r[k] for r in recs]  # noqa: E731
    out = {"row": rid, "label": label, "preset": f"{CFG}/{preset}.yaml" if preset else None,
           "seeds": vals("seed"), "seeds_planned": seeds, "partial": len(recs) < len(seeds), "steps": vals("steps"),
           "native_basis": recs[0]["native_basis"]}
    for name, key in (("psnr_native", "psnr_native_per_image"), ("psnr_native_mse", "psnr_native"),
                      ("ssim_native", "ssim_native"), ("psnr_model", "psnr_per_image"), ("usage", "usage_mean")):
        out[f"{name}_mean"] = statistics.fmean(vals(key))
        out[f"{name}_ci95"] = ci95(vals(key))
    out["sec_per_step_median"] = statistics.median(vals("sec_per_step_median"))
    out["per_seed"] = [strip(r) for r in recs]
    out["in_progress"] = [strip(r) for r in partial]
    return out


def collect(a, work: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    with results_lock(work):
        rows, revs, planned = [], set(), sorted(set(PLANNED_SEEDS) | set(a.seeds))
        for row in ROWS:
            recs, partial = [], []
            for p in sorted((out / "seeds" / row[0]).glob("*seed*.json")):
                r = json.loads(p.read_text())
                if record_matches(r.get("key"), row, r["seed"], a):
                    (partial if p.name.startswith("partial_") else recs).append(r)
                    if "official" in r["key"]:
                        revs.add(r["key"]["official"])
            done = {r["seed"] for r in recs}
            partial = [r for r in partial if r["seed"] not in done]
            if recs or partial:
                rows.append(summarize_row(row, sorted(recs, key=lambda r: r["seed"]), planned,
                                          sorted(partial, key=lambda r: r["seed"])))
        summary = {"study": STUDY, "official": {"repo": "DaiDaiLoh/QG-VAE", "notebook": NOTEBOOK,
                                                "revision": sorted(revs) or [a.official_rev]},
                   "protocol": {**settings(a), "seeds": planned}, "machine": machine_info(a.threads), "rows": rows}
        write_results(out, summary, table(rows))
    return summary


def table(rows: list[dict]) -> str:
    lines = ["| row | seeds | steps | PSNR native (per-image) dB | PSNR native (mean MSE) dB | SSIM native "
             "| usage % | s/step (median) |", "|" + "---|" * 8]
    for r in rows:
        for p in r["in_progress"]:
            lines.append(f"| {r['label']}, seed {p['seed']} **partial: step {p['steps']}** | 1 | {p['steps']} "
                         f"| {p['psnr_native_per_image']:.2f} | {p['psnr_native']:.2f} | {p['ssim_native']:.3f} "
                         f"| {100 * p['usage_mean']:.1f} | {p['sec_per_step_median']:.3f} |")
        if not r["seeds"]:
            continue
        part = " **partial**" if r["partial"] else ""
        lines.append(f"| {r['label']} | {len(r['seeds'])}/{len(r['seeds_planned'])}{part} "
                     f"| {'/'.join(str(s) for s in r['steps'])} " + native_cells(r) +
                     f"| {_fmt(r['usage_mean'], r['usage_ci95'], 1, 100.0)} | {r['sec_per_step_median']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", default="", help=f"{NOTEBOOK}, a folder with it, or the repo's git dir "
                                                   "(needed for the official_code row)")
    ap.add_argument("--rows", default="", help="row ids, comma-separated (default: all)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--eval-images", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results", help=f"results go to OUT/{STUDY}/")
    ap.add_argument("--work", default="", help=f"run dirs (default runs/bench/{STUDY})")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--stop-after", type=float, default=0.0,
                    help="minutes: no new seed after this; the official run checkpoints, stops and is scored "
                         "as partial (a rerun resumes it)")
    ap.add_argument("--collect-only", action="store_true", help="rebuild results.json / table.md from the kept "
                                                                    "seeds, train nothing")
    ap.add_argument("--official-ckpt-every", type=int, default=50, help="official run: steps between checkpoints")
    a = ap.parse_args(argv)
    a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    a.stop_at = time.time() + 60 * a.stop_after if a.stop_after > 0 else 0.0
    want = [w.strip() for w in a.rows.split(",") if w.strip()]
    bad = [w for w in want if w not in {r[0] for r in ROWS}]
    if bad:
        raise SystemExit(f"unknown rows {bad}; ids {[r[0] for r in ROWS]}")
    rows = [r for r in ROWS if not want or r[0] in want]
    nb = None
    if a.collect_only:
        rows = []
    elif any(r[2] is None for r in rows):
        if not a.official:
            raise SystemExit("the official_code row needs --official PATH (the fetched DaiDaiLoh/QG-VAE)")
        nb = read_notebook(a.official)
    a.official_rev = notebook_revision(a.official) if a.official else "unknown"
    set_threads(a.threads)
    out = Path(a.out) / STUDY
    work = Path(a.work) if a.work else Path("runs/bench") / STUDY
    summary = {}
    for seed in a.seeds:          # seed 0 of every row first, then seed 1, ...
        for r in rows:
            if a.stop_at and time.time() > a.stop_at:
                break
            run_seed(r, seed, a, work, out, nb)
            summary = collect(a, work, out)
    summary = summary or collect(a, work, out)
    print(table(summary["rows"]))
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}")
    return summary


if __name__ == "__main__":
    main()
