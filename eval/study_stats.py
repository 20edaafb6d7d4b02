"""Statistics shared by the studies (``bench/tokenizer_ablation.py``, ``bench/qgvae_official.py``) and the
layout comparison (``pipeline.compare``): the 95% interval of a mean over seeds and the convergence rule
of issue 23 (held-out PSNR gains < ``tol_db`` over the last fifth of training)."""
from __future__ import annotations

import math
import statistics


def ci95(xs: list[float]) -> float | None:
    """Half-width of the 95% interval of the mean: t_{0.975, n-1} s / sqrt(n) (None below 2 values)."""
    if len(xs) < 2:
        return None
    from scipy.stats import t
    return float(t.ppf(0.975, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs)))


def convergence(curve: list[tuple[int, float]], steps: int, tol_db: float) -> dict:
    """Held-out PSNR gain from the eval at (or just before) 80% of ``steps`` to the last eval."""
    if not curve:
        return {"gain_last_fifth_db": None, "converged": False}
    before = [p for s, p in curve if s <= 0.8 * steps]
    gain = curve[-1][1] - (before[-1] if before else curve[0][1])
    return {"gain_last_fifth_db": gain, "converged": bool(gain < tol_db)}


def paired_difference(a: dict[int, float], b: dict[int, float]) -> dict:
    """``a - b`` over the seeds both have (values keyed by seed: the same seed is the same data order in
    every row of a study): mean, 95% t half-width, per-seed differences and how many are below zero."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    return {"seeds": seeds, "diffs": d, "mean": statistics.fmean(d) if d else None, "ci95": ci95(d),
            "negative": sum(x < 0 for x in d)}


def _per_seed(results: dict, row: str, metric: str) -> dict[int, float]:
    rows = {r["row"]: r for r in results["rows"]}
    if row not in rows:
        raise SystemExit(f"no row {row!r} in the results; rows: {sorted(rows)}")
    return {p["seed"]: float(p[metric]) for p in rows[row]["per_seed"] if p.get(metric) is not None}


def main(argv: list[str] | None = None) -> list[dict]:
    """``python -m eval.study_stats RESULTS.json --paired ROW_A,ROW_B [...]``: per-seed paired differences."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m eval.study_stats", description=main.__doc__)
    ap.add_argument("results", help="a study's results.json (bench/tokenizer_ablation.py, bench/qgvae_official.py)")
    ap.add_argument("--paired", action="append", default=[], metavar="A,B", help="row A minus row B, per seed")
    ap.add_argument("--metric", default="psnr_native_per_image", help="a per-seed field")
    a = ap.parse_args(argv)
    results = json.loads(open(a.results).read())
    out = []
    for pair in a.paired:
        ra, _, rb = pair.partition(",")
        p = paired_difference(_per_seed(results, ra, a.metric), _per_seed(results, rb, a.metric))
        ci = "n/a" if p["ci95"] is None else f"{p['ci95']:.2f}"
        mean = "n/a" if p["mean"] is None else f"{p['mean']:+.2f}"
        print(f"{ra} - {rb} ({a.metric}): {mean} ± {ci} (95% t, n={len(p['seeds'])}); per seed "
              f"{' / '.join(f'{x:+.2f}' for x in p['diffs'])}; {p['negative']}/{len(p['diffs'])} below zero")
        out.append({"a": ra, "b": rb, **p})
    return out


if __name__ == "__main__":
    main()
