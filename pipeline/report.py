"""The main job's report: what a person sees (real images beside samples, per class; reconstructions;
both stages' loss curves) and the numbers next to their floors, as ``report.md`` plus PNGs in the run
folder. Reads only finished artefacts (metrics.json's dict, the stages' ``metrics.jsonl``, samples)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from groupgen.checkpoint import atomic_write_text


def _save_fig(fig, path: Path) -> Path:
    # write beside and rename: a reader never sees half a PNG
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    return path


def per_class_rows(images: np.ndarray, labels: np.ndarray, classes: int, k: int) -> np.ndarray:
    """The first ``k`` images of each class, class-major: uint8 [classes, k, H, W, 3] (black where a class
    has fewer than k)."""
    out = np.zeros((classes, k) + images.shape[1:], np.uint8)
    for c in range(classes):
        sel = np.flatnonzero(labels == c)[:k]
        out[c, : len(sel)] = images[sel]
    return out


def real_vs_samples_png(real: np.ndarray, real_labels: np.ndarray, samples: np.ndarray, sample_labels: np.ndarray,
                        path: Path, k: int = 8, class_names: list[str] | None = None) -> Path:
    """One row per class: ``k`` real images on the left, ``k`` samples of that class on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = int(max(real_labels.max(), sample_labels.max())) + 1
    a, b = per_class_rows(real, real_labels, classes, k), per_class_rows(samples, sample_labels, classes, k)
    h, w = real.shape[1:3]
    gap = max(4, w // 2)
    canvas = np.full((classes * (h + 2), 2 * k * (w + 2) + gap, 3), 255, np.uint8)
    for c in range(classes):
        for j in range(k):
            y = c * (h + 2)
            canvas[y: y + h, j * (w + 2): j * (w + 2) + w] = a[c, j]
            x = k * (w + 2) + gap + j * (w + 2)
            canvas[y: y + h, x: x + w] = b[c, j]
    fig, ax = plt.subplots(figsize=(2 * k * 0.45 + 1.5, classes * 0.45 + 0.6))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_yticks([c * (h + 2) + h / 2 for c in range(classes)])
    ax.set_yticklabels(class_names[:classes] if class_names else [str(c) for c in range(classes)], fontsize=8)
    ax.set_xticks([k * (w + 2) / 2, k * (w + 2) + gap + k * (w + 2) / 2])
    ax.set_xticklabels(["real (held-out test split)", "samples (same class)"], fontsize=9)
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    _save_fig(fig, path)
    plt.close(fig)
    return path


def _rows(path: Path, key: str) -> tuple[list[int], list[float]]:
    from groupgen.runs import read_jsonl

    if not Path(path).is_file():
        return [], []
    rows = [r for r in read_jsonl(path) if isinstance(r.get(key), (int, float))]
    return [r["step"] for r in rows], [float(r[key]) for r in rows]


def loss_curves_png(tok_log: Path, ar_log: Path, path: Path) -> Path:
    """Left: the tokenizer's training loss (and held-out PSNR); right: the prior's training and validation
    loss in nats per sub-token, with the uniform baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (t, a) = plt.subplots(1, 2, figsize=(10, 3.4))
    s, v = _rows(tok_log, "loss")
    t.plot(s, v, color="C0", label="train loss")
    t.set_xlabel("tokenizer step")
    t.set_ylabel("loss (charbonnier + l2 + vq)")
    t.set_yscale("log")
    handles = t.get_lines()
    s, v = _rows(tok_log, "eval_psnr")
    if s:
        p = t.twinx()
        handles += p.plot(s, v, "o-", color="C3", label="held-out PSNR (right axis)")
        p.set_ylabel("PSNR (dB)", color="C3")
    t.set_title("stage 1: tokenizer")
    t.legend(handles=handles, loc="center right", fontsize=8)
    s, v = _rows(ar_log, "loss")
    a.plot(s, v, color="C0", label="train")
    s, v = _rows(ar_log, "val_loss")
    if s:
        a.plot(s, v, "o-", color="C1", label="validation")
    _, u = _rows(ar_log, "uniform")
    if u:
        a.axhline(u[0], color="grey", ls="--", lw=1, label=f"uniform ({u[0]:.2f})")
    a.set_xlabel("prior step")
    a.set_ylabel("cross entropy (nats / sub-token)")
    a.set_title("stage 2: AR prior")
    a.legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)
    return path


def _f(x, fmt=".3f") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else "n/a"


def numbers_table(m: dict) -> list[str]:
    """The numbers with their floors, as markdown lines."""
    g, r, fl = m["generation"], m["real_train_vs_test"], m.get("fid_floor") or {}
    n = g.get("num_samples")
    floor = (f"{_f(fl.get('fid_mean'))} ± {_f(fl.get('fid_std'))} (range {_f(fl.get('fid_min'))}–"
             f"{_f(fl.get('fid_max'))}; {fl.get('draws')} draws, seeds {fl.get('seeds')})") if fl else "n/a"
    return [
        f"| metric | samples (N = {n}) | floor: real train images at the same N | samples / floor "
        f"| real train vs test at N = {r.get('n')} |",
        "|---|---|---|---|---|",
        f"| FID (domain features; lower is better) | {_f(g.get('fid'))} | {floor} | "
        f"**{_f(m.get('fid_ratio'), '.2f')}×** | {_f(r.get('fid'))} |",
        f"| IS | {_f(g.get('is'))} | {_f(fl.get('is_mean'))} | | {_f(r.get('is'))} |",
        f"| class-conditional accuracy | {_f(g.get('class_acc'))} | classifier on real test images: "
        f"{_f(g.get('classifier_test_acc'))} | **{_f(m.get('class_acc_ratio'))}** | |",
    ]


def write_report(out: Path, m: dict, figures: dict[str, str]) -> Path:
    """``out/report.md`` from the metrics dict and the figure files made beside it."""
    tok = m["tokenizer"]
    scalars = {k: v for k, v in tok.items() if isinstance(v, (int, float))}
    lines = [
        "# groupgen main job report", "",
        f"Layout: {m['layout_text']}", "",
        "## Numbers and their floors", "",
        *numbers_table(m), "",
        "How to read them: FID is biased upwards at small N, so the samples' FID is compared with real "
        "training images scored the same way at the same N (the floor: what a perfect generator would "
        "score here); *samples / floor* is how many times that floor the samples sit at (1× = as close "
        "to the test images as real images are). The class accuracy ratio is the domain classifier's "
        "accuracy on the samples (the class they were asked for) over its accuracy on real test images "
        "(1 = as recognisable as real images). The last column is the same FID between 10,000-image "
        "sets, for scale only. Domain numbers compare runs of this project, not papers.", "",
    ]
    if "real_vs_samples" in figures:
        lines += ["## Real images and samples, per class", "",
                  f"![real vs samples]({figures['real_vs_samples']})", ""]
    lines += ["## Tokenizer", f"Held-out test split ({tok.get('images', '?')} images): `{json.dumps(scalars)}`", "",
              "Reconstructions (top: real, bottom: reconstructed): ![recon](recon.png)", ""]
    if "loss_curves" in figures:
        lines += ["## Training curves", "", f"![loss curves]({figures['loss_curves']})", ""]
    lines += ["## AR prior", f"Final metrics: `{json.dumps(m['ar'])}`", "",
              "## All samples", "Rows are classes: ![grid](grid.png) — all samples in `samples.npz`.", "",
              "| stage | seconds |", "|---|---|",
              *[f"| {k} | {v} |" for k, v in m["stage_seconds"].items()],
              f"| total (this invocation) | {m['wall_seconds']} |", "",
              "Full numbers: [metrics.json](metrics.json)."]
    path = Path(out) / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
