"""The outputs of a token-layout comparison (``pipeline.compare``): the study's results.json (one object
per row, issue 23's fields), the markdown table and the quality-vs-steps figure."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from groupgen.checkpoint import atomic_write_text

from .main import ratios

FINAL_KEYS = ("fid", "class_acc", "val_nll_bits")


def write_study_results(res: dict, path: Path) -> None:
    """The study's results.json (issue 23): one object per row with its seeds, steps, convergence, bits,
    reconstruction on the native basis, and the final generation numbers as mean and 95% t interval over
    the AR seeds, beside the equal-N floor. One tokenizer per row: its PSNR has no interval over seeds."""
    floor = res.get("fid_floor") or {}
    rows = []
    for r in res["rows"]:
        fin, rec = r["final"] or {}, r["recon"]
        ratio = ratios(fin, floor).get("fid_ratio") if fin.get("fid") is not None else None
        rows.append({
            "row": r["name"], "seeds": [run["seed"] for run in r["runs"]], "steps": fin.get("step"),
            "tokenizer_steps": r["tokenizer_steps"], "converged": r["tokenizer_convergence"]["converged"],
            "gain_last_fifth_db": r["tokenizer_convergence"]["gain_last_fifth_db"],
            "tokenizer_curve": [[int(st), float(p)] for st, p in r["tokenizer_curve"]],   # held-out PSNR (train basis)
            "bits_per_image": r["bits_per_image"], "layout": r["layout_text"], "ar_overrides": r["ar_overrides"],
            "psnr_native_mean": rec.get("psnr_native_per_image"), "psnr_native_ci95": None,
            "usage_mean": rec.get("usage_mean"),
            "fid_mean": fin.get("fid"), "fid_ci95": fin.get("fid_ci95"), "fid_floor": floor.get("fid_mean"),
            "fid_ratio": ratio, "class_acc_mean": fin.get("class_acc"), "class_acc_ci95": fin.get("class_acc_ci95"),
            "nll_bits_per_image": fin.get("val_nll_bits"), "nll_bits_ci95": fin.get("val_nll_bits_ci95"),
            "per_seed": [{"seed": run["seed"], **{k: run["points"][-1].get(k) for k in FINAL_KEYS}}
                         for run in r["runs"] if run["points"]],
        })
    out = {"study": path.parent.name, "extractor": res["extractor"], "ref": res["ref"], "fid_floor": floor or None,
           "config": res["config"], "rows": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(out, indent=1, default=str))


def _fmt(x, nd=2) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _pm(row: dict | None, k: str, nd=2) -> str:
    if not row or row.get(k) is None:
        return "n/a"
    s = row.get(f"{k}_ci95")
    return _fmt(row[k], nd) + (f" ± {s:.{nd}f}" if s is not None else "")


def write_table(res: dict, path: Path) -> None:
    cfg = res["config"]
    lines = [
        "# Token-layout comparison", "",
        f"Same AR recipe for every row (`{cfg['ar']['config']}` + `{cfg['ar']['overrides']}`), seeds "
        f"{cfg['seeds']}; quality every {cfg['quality']['every'] or 'final'} steps on a fixed balanced sample set "
        f"(`{cfg['quality']['sampling']['config']}` + `{cfg['quality']['sampling']['overrides']}`), "
        f"extractor `{res['extractor']}` vs `{res['ref']}`. Bits = L·Σ_g log2 K_g. Val NLL = AR validation loss "
        "× L·G / ln 2 (bits per image; comparable across layouts, unlike the per-token loss). "
        "± = 95% t interval of the mean over seeds (none with one seed).", "",
        "| layout | tokenizer | positions × groups | K | bits/img | PSNR (dB) | usage | Σ pos. entropy (bits) "
        "| SPM tokens/img (ratio) | AR params | val loss | val NLL (bits/img) | FID (final) | class acc (final) "
        "| best FID @ step | FID by step |",
        "|" + "---|" * 16,
    ]
    for r in res["rows"]:
        rec, lay, fin, best = r["recon"], r["layout_stats"], r["final"], r["best_fid"]
        spm = (f"{lay['tokens_per_image']:.1f} ({lay['compression_ratio']:.2f}×)" if "tokens_per_image" in lay
               else "n/a")
        by_step = " / ".join(f"{c['step']}: {_fmt(c['fid'], 1)}" for c in r["curve"])
        lines.append(
            f"| {r['name']} | {Path(r['tokenizer']).stem} | {r['L']} × {r['G']} "
            f"| {'/'.join(map(str, sorted(set(r['K']))))} "
            f"| {r['bits_per_image']:.0f} | {_fmt(rec.get('psnr'))} | {_fmt(rec.get('usage_mean'), 3)} "
            f"| {_fmt(lay.get('sum_position_entropy_bits'), 0)} | {spm} "
            f"| {(r['params'] or 0) / 1e6:.2f}M | {_pm(fin, 'val_loss', 3)} | {_pm(fin, 'val_nll_bits', 0)} "
            f"| {_pm(fin, 'fid')} | {_pm(fin, 'class_acc', 3)} "
            f"| {_fmt(best['fid']) if best else 'n/a'} @ {best['step'] if best else '-'} | {by_step} |")
    bits = [r["bits_per_image"] for r in res["rows"]]
    lines.append("")
    if bits and max(bits) > 1.05 * min(bits):
        lines.append(f"**Note:** bits per image differ by more than 5 % ({min(bits):.0f}–{max(bits):.0f}).")
    fl = res.get("fid_floor")
    if fl:
        lines.append(f"Equal-N floor: {fl['draws']} draws of N={fl['n']} real train images scored like the samples: "
                     f"FID {fl['fid_mean']:.3f} ± {fl['fid_std']:.3f} (range {fl['fid_min']:.3f}–"
                     f"{fl['fid_max']:.3f}).")
    b = res.get("real_train_vs_ref")
    if b:
        lines.append(f"Yardstick: real train images vs `{res['ref']}` with the same metric and N={b['num_samples']}: "
                     f"FID {b['fid']:.2f}, class acc {_fmt(b.get('class_acc'), 3)} (classifier test acc "
                     f"{_fmt(b.get('classifier_test_acc'), 3)}).")
    conv = [f"{r['name']} {r['tokenizer_steps']} steps, {_fmt(r['tokenizer_convergence']['gain_last_fifth_db'])} dB "
            f"({'converged' if r['tokenizer_convergence']['converged'] else 'not converged'})" for r in res["rows"]]
    lines.append(f"Tokenizers, held-out PSNR gain over the last fifth of training (converged below "
                 f"{res['config']['tok_conv_db']} dB): " + "; ".join(conv) + ".")
    lines += ["", "Curves: ![quality vs steps](quality_vs_steps.png) (the last panel: each tokenizer's held-out PSNR) "
              "— all numbers in [compare.json](compare.json)."]
    atomic_write_text(path, "\n".join(lines) + "\n")


def plot_quality(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("fid", "FID (lower is better)"), ("class_acc", "class-conditional accuracy"),
              ("val_nll_bits", "AR val NLL (bits / image)")]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5 * (len(panels) + 1), 4))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {r["name"]: cycle[i % len(cycle)] for i, r in enumerate(res["rows"])}   # one colour a row, every panel
    for ax, (k, title) in zip(axes, panels):
        for r in res["rows"]:
            pts = [(c["step"], c[k], c.get(f"{k}_std")) for c in r["curve"] if c.get(k) is not None]
            if not pts:
                continue
            x, y, s = zip(*pts)
            line, = ax.plot(x, y, marker="o", label=r["name"], color=color[r["name"]])
            if any(v is not None for v in s):
                sd = np.array([v or 0.0 for v in s])
                ax.fill_between(x, np.array(y) - sd, np.array(y) + sd, alpha=0.2, color=line.get_color())
        b = res.get("real_train_vs_ref")
        if b and k in ("fid", "class_acc") and b.get(k) is not None:
            ax.axhline(b[k], color="k", ls="--", lw=1, label="real train")
        ax.set_xlabel("AR training step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax, seen = axes[-1], set()
    for r in res["rows"]:                     # one line per tokenizer (rows may share one)
        if r["tokenizer_curve"] and r["tokenizer_dir"] not in seen:
            seen.add(r["tokenizer_dir"])
            ax.plot(*zip(*r["tokenizer_curve"]), label=r["name"], color=color[r["name"]])
    ax.set_xlabel("tokenizer training step")
    ax.set_title("tokenizer held-out PSNR (dB, training basis)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
