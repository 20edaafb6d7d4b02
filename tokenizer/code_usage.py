"""Code-usage statistics of a quantizer: counts per codebook slot since the last reset, reported as
usage (fraction of codes hit) and perplexity (exp of the code entropy) per group."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class UsageTracker(nn.Module):
    """Code counts per stat slot since the last reset; ``slot_group[s]`` maps a slot to its group
    (for pertoken every token is a slot of group 0 and the group's numbers are token means)."""

    def __init__(self, sizes: list[int], slot_group: list[int] | None = None):
        super().__init__()
        self.sizes = list(sizes)
        self.slot_group = slot_group or list(range(len(sizes)))
        self.register_buffer("counts", torch.zeros(len(sizes), max(sizes), dtype=torch.float64),
                             persistent=False)

    @torch.no_grad()
    def update(self, idx: torch.Tensor, first: int = 0) -> None:
        """Count ``idx [p, N]`` (indices of slots first..first+p-1)."""
        p, kmax = idx.shape[0], self.counts.shape[1]
        flat = (idx + torch.arange(p, device=idx.device)[:, None] * kmax).reshape(-1)
        self.counts[first:first + p] += torch.bincount(flat, minlength=p * kmax).view(p, kmax).to(
            self.counts)

    def reset(self) -> None:
        self.counts.zero_()

    def stats(self) -> dict:
        per_group: dict[int, list[tuple[float, float]]] = {}
        for s, k in enumerate(self.sizes):
            c = self.counts[s, :k]
            n = float(c.sum())
            if n > 0:
                p = c / n
                ent = float(-(p[p > 0] * p[p > 0].log()).sum())
                usage, ppl = float((c > 0).double().mean()), math.exp(ent)
            else:
                usage, ppl = 0.0, 0.0
            per_group.setdefault(self.slot_group[s], []).append((usage, ppl))
        out = {}
        for g, vals in sorted(per_group.items()):
            out[f"usage/g{g}"] = sum(v[0] for v in vals) / len(vals)
            out[f"perplexity/g{g}"] = sum(v[1] for v in vals) / len(vals)
        G = len(per_group)
        out["usage"] = sum(out[f"usage/g{g}"] for g in per_group) / G
        out["perplexity"] = sum(out[f"perplexity/g{g}"] for g in per_group) / G
        out["count"] = float(self.counts[0].sum())
        return out
