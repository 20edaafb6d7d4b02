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
