"""Stage-1 tokenizer ablation on Fashion-MNIST (CPU): one training recipe, many quantizer layouts.

    python bench/tokenizer_ablation.py [--rows a,b,c] [--steps 500] [--quick] [--out DIR] [--work RUNS] [--png PATH]

Every row trains with the same steps, seed, batch and optimizer (``tokenizer.train.train`` in this
process, one row at a time, ``train.threads`` threads), then is evaluated with
``eval.reconstruction.evaluate_tokenizer`` on the first ``--eval-images`` test images. Families:

* (a) MGVQ's ablation at equal total codebook entries (16384): VQ G=1 x 16384 (LlamaGen-style, code
  dim 8), MGVQ G=4 x 4096 (dim 8) and G=8 x 2048 (dim 4) on the same 32-dim latent, with and without
  nested masking;
* (b) equal bits per image (64 positions x 12 bits = 768): G=1 x 4096, G=2 x 64, G=4 x 8, code dim 8
  per group, no masking, so only the factorisation of the 12 bits changes;
* (c) QG-VAE with 64 global tokens (as many as the VQ grid has positions) against VQ G=1, K 1024 each.

Writes ``DIR/results.json`` and ``DIR/table.md`` and a PNG of the held-out PSNR curves. A row whose
``RUNS/<row>/row.json`` (RUNS = ``--work``, default ``DIR/runs``) matches the current settings is reused (re-run with ``--fresh``);
``tokenizer.train`` itself resumes an interrupted row from its checkpoint. Convergence: the held-out
PSNR gain over the last fifth of training must be < ``--conv-db`` (0.2 dB, the issue's criterion).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import REPO, machine_info, write_json

os.environ.setdefault("GROUPGEN_QUIET", "1")  # no tqdm bars in the benchmark log

from groupgen.config import load_config, to_dict  # noqa: E402
from groupgen.runs import read_jsonl, set_threads  # noqa: E402
from eval.reconstruction import ReconEvalConfig, evaluate_tokenizer  # noqa: E402
from tokenizer.train import TokenizerTrainConfig, train  # noqa: E402

CFG = "configs/tokenizer"
# (id, family, label, preset, overrides). Overrides the presets' defaults only where the row differs.
ROWS = [
    ("a_vq_g1_k16384", "a", "VQ G1×16384", "fmnist_vq", ["quantizer.codebook_size=16384"]),
    ("a_mgvq_g4_k4096_mask", "a", "MGVQ G4×4096 +mask", "fmnist_mgvq_g4",
     ["quantizer.codebook_size=4096", "quantizer.nested_mask=true"]),
    ("a_mgvq_g4_k4096_nomask", "a", "MGVQ G4×4096 no mask", "fmnist_mgvq_g4",
     ["quantizer.codebook_size=4096", "quantizer.nested_mask=false"]),
    ("a_mgvq_g8_k2048_mask", "a", "MGVQ G8×2048 +mask", "fmnist_mgvq_g8",
     ["quantizer.codebook_size=2048", "quantizer.nested_mask=true"]),
    ("a_mgvq_g8_k2048_nomask", "a", "MGVQ G8×2048 no mask", "fmnist_mgvq_g8",
     ["quantizer.codebook_size=2048", "quantizer.nested_mask=false"]),
    ("b_vq_g1_k4096", "b", "VQ G1×4096", "fmnist_vq", ["quantizer.codebook_size=4096"]),
    ("b_mg_g2_k64", "b", "MG G2×64", "fmnist_mgvq_g4",
     ["quantizer.groups=2", "quantizer.codebook_size=64", "model.embed_dim=16", "quantizer.nested_mask=false"]),
    ("b_mg_g4_k8", "b", "MG G4×8", "fmnist_mgvq_g4", ["quantizer.codebook_size=8", "quantizer.nested_mask=false"]),
    ("c_vq_g1_k1024", "c", "VQ G1×1024 (64 pos)", "fmnist_vq", ["quantizer.codebook_size=1024"]),
    ("c_qgvae_t64_k1024", "c", "QG-VAE 64 tok×1024", "fmnist_qgvae", ["quantizer.codebook_size=1024"]),
]
FAMILY_TITLES = {"a": "(a) equal codebook entries (16384)", "b": "(b) equal bits (768/image)",
                 "c": "(c) QG-VAE vs VQ, 64 tokens, K 1024"}


def row_settings(steps: int, batch: int, seed: int, threads: int, eval_every: int, eval_batches: int) -> list[str]:
    """Overrides shared by every row (the 'same recipe' part); checkpoints only at the end."""
    return [f"train.steps={steps}", f"train.batch_size={batch}", f"train.seed={seed}", f"train.threads={threads}",
            f"train.eval_every={eval_every}", f"train.eval_batches={eval_batches}",
            f"train.log_every={math.gcd(eval_every, 10)}", "train.sample_every=0", f"train.ckpt_every={steps}",
            "train.keep_last=1", "train.device=cpu"]


def bits_per_image(layout: dict) -> float:
    return layout["L"] * sum(math.log2(k) for k in layout["K"])


def convergence(curve: list[tuple[int, float]], steps: int, tol_db: float) -> dict:
    """Held-out PSNR gain from the eval at (or just before) 80% of training to the last eval."""
    if not curve:
        return {"gain_last_fifth_db": None, "converged": None}
    mark = 0.8 * steps
    before = [p for s, p in curve if s <= mark]
    ref = before[-1] if before else curve[0][1]
    gain = curve[-1][1] - ref
    return {"gain_last_fifth_db": gain, "converged": bool(gain < tol_db)}


def run_row(row, a, shared: list[str], work: Path) -> dict:
    rid, fam, label, preset, overrides = row
    out = work / rid
    cfg = load_config(TokenizerTrainConfig, REPO / CFG / f"{preset}.yaml", overrides + shared)
    key = {"config": to_dict(cfg), "eval_images": a.eval_images}
    cache = out / "row.json"
    if cache.exists() and not a.fresh:
        old = json.loads(cache.read_text())
        if old.get("key") == json.loads(json.dumps(key, default=str)):
            print(f"[{rid}] reusing {cache}", flush=True)
            return old
    if a.fresh and out.exists():
        import shutil
        shutil.rmtree(out)
    print(f"[{rid}] training {label}: {preset} {' '.join(overrides)}", flush=True)
    c0, w0 = time.process_time(), time.perf_counter()
    res = train(cfg, out)
    cpu_s, wall_s = time.process_time() - c0, time.perf_counter() - w0
    metrics = read_jsonl(out / "metrics.jsonl")
    curve = [(m["step"], m["eval_psnr"]) for m in metrics if "eval_psnr" in m]
    # step time per logging window, first window dropped (oneDNN warm-up)
    st = sorted(m["step_time"] for m in metrics[1:] if "step_time" in m) or [res.get("step_time", float("nan"))]
    print(f"[{rid}] evaluating on {a.eval_images} test images", flush=True)
    from tokenizer.model import load_tokenizer

    set_threads(a.threads)
    ev = evaluate_tokenizer(load_tokenizer(res["checkpoint"], "cpu"), ReconEvalConfig(
        n=a.eval_images, batch_size=128, lpips=False, extractor="none", device="cpu"))
    (out / "eval.json").write_text(json.dumps(ev, indent=1))
    n_params = sum(p.numel() for p in load_tokenizer(res["checkpoint"], "cpu").parameters())
    layout = res["layout"]
    G = len(layout["K"])
    out_row = {
        "id": rid, "family": fam, "label": label, "preset": f"{CFG}/{preset}.yaml", "overrides": overrides,
        "layout": layout, "G": G, "K": layout["K"], "L": layout["L"], "bits_per_image": bits_per_image(layout),
        "params": n_params, "steps": res["step"],
        "psnr": ev["psnr"], "psnr_per_image": ev["psnr_per_image"], "ssim": ev["ssim"],
        "usage_per_group": ev["usage"], "perplexity_per_group": ev["perplexity"],
        "usage": ev["usage_mean"], "train_psnr_last": res.get("psnr"),
        "step_time_median_s": st[len(st) // 2], "train_wall_s": wall_s, "train_cpu_s": cpu_s,
        "cpu_s_per_step": cpu_s / max(1, res["step"]), "curve": curve,
        **convergence(curve, a.steps, a.conv_db), "key": key,
    }
    cache.write_text(json.dumps(out_row, indent=1, default=str))
    return json.loads(cache.read_text())


def fmt_usage(u: list[float]) -> str:
    if len(u) <= 4:
        return " / ".join(f"{100 * x:.0f}" for x in u)
    return f"{100 * min(u):.0f}–{100 * max(u):.0f} (min–max of {len(u)})"


def table(rows: list[dict]) -> str:
    head = ("| row | layout | bits/img | params | PSNR (mean-MSE) dB | PSNR (per-image) dB | SSIM | usage % per group "
            "| step s (wall median) | CPU s/step | ΔPSNR last 1/5 dB | converged |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        conv = "n/a" if r["converged"] is None else ("yes" if r["converged"] else "**no**")
        gain = "n/a" if r["gain_last_fifth_db"] is None else f"{r['gain_last_fifth_db']:+.2f}"
        lay = f"L{r['L']}×G{r['G']}×K{r['K'][0]}"
        lines.append(f"| {r['family']}: {r['label']} | {lay} | {r['bits_per_image']:.0f} | {r['params'] / 1e6:.2f}M "
                     f"| {r['psnr']:.2f} | {r['psnr_per_image']:.2f} | {r['ssim']:.3f} | {fmt_usage(r['usage_per_group'])} "
                     f"| {r['step_time_median_s']:.3f} | {r['cpu_s_per_step']:.3f} | {gain} | {conv} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, steps: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = [f for f in "abc" if any(r["family"] == f for r in rows)]
    fig, axes = plt.subplots(1, len(fams), figsize=(4.2 * len(fams), 3.2), squeeze=False)
    for ax, f in zip(axes[0], fams):
        for r in rows:
            if r["family"] == f and r["curve"]:
                s, p = zip(*r["curve"])
                ax.plot(s, p, marker=".", ms=3, lw=1.2, label=r["label"])
        ax.axvspan(0.8 * steps, steps, color="0.9", zorder=0)  # the convergence window
        ax.set_title(FAMILY_TITLES[f], fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("held-out PSNR (dB)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="a,b,c", help="families (a,b,c) and/or row ids, comma-separated")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=0, help="0 = steps/10")
    ap.add_argument("--eval-batches", type=int, default=8, help="held-out batches per curve point")
    ap.add_argument("--eval-images", type=int, default=2000, help="test images for the final evaluation")
    ap.add_argument("--conv-db", type=float, default=0.2)
    ap.add_argument("--quick", action="store_true", help="smoke test: 10 steps, tiny evals")
    ap.add_argument("--out", default="runs/bench/tokenizer_ablation", help="results.json, table.md (and curves.png)")
    ap.add_argument("--work", default="", help="row run dirs (checkpoints; default OUT/runs)")
    ap.add_argument("--png", default="", help="curves PNG (default DIR/curves.png)")
    ap.add_argument("--json", default="", help="also write the raw results here")
    ap.add_argument("--fresh", action="store_true", help="retrain rows even if a matching row.json exists")
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.eval_every, a.eval_batches, a.eval_images = 10, 2, 1, 64
    a.eval_every = a.eval_every or max(1, a.steps // 10)
    if a.steps % a.eval_every or (a.steps // 5) % a.eval_every:
        raise SystemExit(f"--eval-every {a.eval_every} must divide steps ({a.steps}) and steps/5, so that the "
                         "convergence window starts on an eval point")
    want = [w.strip() for w in a.rows.split(",") if w.strip()]
    known = {r[0] for r in ROWS} | set(FAMILY_TITLES)
    bad = [w for w in want if w not in known]
    if bad:
        raise SystemExit(f"unknown rows {bad}; families a,b,c or ids {[r[0] for r in ROWS]}")
    rows = [r for r in ROWS if r[1] in want or r[0] in want]
    set_threads(a.threads)
    out = Path(a.out)
    shared = row_settings(a.steps, a.batch, a.seed, a.threads, a.eval_every, a.eval_batches)
    info = machine_info(a.threads)
    results = []
    for r in rows:
        results.append(run_row(r, a, shared, Path(a.work) if a.work else out / "runs"))
        print(table(results[-1:]).splitlines()[-1], flush=True)
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    png = Path(a.png) if a.png else out / "curves.png"
    plot(results, png, a.steps)
    md = table(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(md)
    summary = {"machine": info, "argv": sys.argv[1:], "steps": a.steps, "batch": a.batch, "seed": a.seed,
               "threads": a.threads, "eval_every": a.eval_every, "eval_images": a.eval_images,
               "shared_overrides": shared, "png": str(png),
               "rows": [{k: v for k, v in r.items() if k != "key"} for r in results]}
    write_json(out / "results.json", summary)
    write_json(a.json or None, summary)
    print(md)
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {png}")
    return summary


if __name__ == "__main__":
    main()
