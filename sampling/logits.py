"""Turning per-group logits into sub-indices: CFG combination, temperature, top-k, top-p, sampling.

Everything here works on one group's logits ``[B, K_g]`` at one position. ``GroupPicker`` is the
``pick(g, logits)`` callback that ``GPT.sample_position`` calls once per group: it applies the
guidance for the current position, filters with that group's settings and draws with the chunk's
own ``torch.Generator`` (so a sample depends only on its chunk, never on other processes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ar_model.cpu import dispatch


def per_group(value, G: int, name: str) -> list:
    """A scalar applies to every group; a list must give exactly one value per group."""
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return [value[0]] * G
        if len(value) != G:
            raise ValueError(f"sampling setting {name!r}: got {len(value)} values {list(value)}, "
                             f"but the layout has G={G} groups (give one value or {G})")
        return list(value)
    return [value] * G


@dataclass(frozen=True)
class GroupSettings:
    """Sampling settings of one group (sub-codebook)."""
    temperature: float = 1.0   # 0 means greedy (argmax)
    top_k: int = 0             # 0 (or >= K) means no top-k filter
    top_p: float = 1.0         # 1 means no nucleus filter

    def validate(self, g: int, K: int) -> None:
        if self.temperature < 0:
            raise ValueError(f"group {g}: temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"group {g}: top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"group {g}: top_p must be in (0, 1], got {self.top_p}")


def top_p_mask(sorted_logits: torch.Tensor, p: float) -> torch.Tensor:
    """For logits sorted in descending order, True where a token falls outside the nucleus.

    The nucleus is the smallest prefix whose probability mass is >= p: a token is dropped when the
    mass of the tokens before it already reaches p (so the top token is always kept).
    """
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs
    return before >= p


def filter_logits(logits: torch.Tensor, s: GroupSettings) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply temperature, top-k and top-p. Returns (kept logits, their indices or None for identity).

    With top-k the result has only ``k`` columns (``torch.topk`` is much cheaper than a full sort
    for K = 16384), in index order unless top-p needs them sorted by value; the caller maps a drawn
    column back through the returned indices.
    """
    logits = logits.float()
    if s.temperature != 1.0:
        logits = logits / s.temperature
    K = logits.shape[-1]
    idx = None
    if 0 < s.top_k < K:
        if s.top_p < 1.0:   # the nucleus needs the kept logits in descending order
            logits, idx = torch.topk(logits, s.top_k, dim=-1, sorted=True)
            logits = logits.masked_fill(top_p_mask(logits, s.top_p), float("-inf"))
        else:
            # ``draw`` spends one random number per column, so every path must keep the columns in
            # the same (index) order for a seed to give the same tokens everywhere: the CPU kernel
            # (~7x faster than torch.topk) returns them so; torch.topk does not, so its k indices
            # are sorted after it (together about the cost of a value-sorted torch.topk).
            picked = dispatch.topk(logits, s.top_k)
            if picked is not None:
                logits, idx = picked
            else:
                idx = torch.topk(logits, s.top_k, dim=-1, sorted=False).indices.sort(dim=-1).values
                logits = logits.gather(-1, idx)
    elif s.top_p < 1.0:
        logits, idx = torch.sort(logits, dim=-1, descending=True)
        logits = logits.masked_fill(top_p_mask(logits, s.top_p), float("-inf"))
    return logits, idx


def draw(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One categorical draw per row via the exponential race (argmax p/E, E ~ Exp(1)).

    Same distribution as ``torch.multinomial`` but no host sync and a fixed amount of randomness
    per row, so draws are reproducible for a given generator state. E = -log U with U uniform in
    [0, 1): on the CPU ``exponential_`` costs ~40 ns an element, uniform + log ~12 ns.
    """
    probs = torch.softmax(logits, dim=-1)
    e = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype).log_().neg_()
    return torch.argmax(probs / e, dim=-1)


def sample_from_logits(logits: torch.Tensor, s: GroupSettings,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Sub-indices ``[B]`` for logits ``[B, K]`` under settings ``s``."""
    if s.temperature == 0:
        return torch.argmax(logits, dim=-1)
    kept, idx = filter_logits(logits, s)
    j = draw(kept, generator)
    if idx is None:
        return j
    return idx.gather(-1, j.unsqueeze(-1)).squeeze(-1)


def cfg_scale_at(scale: float, pos: int, L: int, schedule: str, stop_after: int) -> float:
    """Guidance scale at position ``pos`` (0-based) of ``L``.

    ``linear`` ramps from 1 towards ``scale``, reaching it at the last position:
    ``1 + (scale - 1) * (pos + 1) / L``. Positions after ``stop_after`` (when >= 0) are unguided.
    """
    if stop_after >= 0 and pos > stop_after:
        return 1.0
    if schedule == "constant":
        return float(scale)
    if schedule == "linear":
        return 1.0 + (float(scale) - 1.0) * (pos + 1) / L
    raise ValueError(f"cfg_schedule must be 'constant' or 'linear', got {schedule!r}")


class GroupPicker:
    """The ``pick(g, logits)`` callback for one chunk.

    With ``guided=True`` the model runs on the doubled batch ``[cond; null]``: the callback combines
    ``u + s * (c - u)`` per group, draws once per sample and returns the same index for both halves,
    so the sub-token head conditions both halves on the same chosen sub-indices.
    """

    def __init__(self, settings: list[GroupSettings], scales: list[float], L: int, schedule: str,
                 stop_after: int, guided: bool, generator: torch.Generator | None):
        self.settings, self.scales, self.L = settings, scales, L
        self.schedule, self.stop_after, self.guided = schedule, stop_after, guided
        self.generator = generator
        self.pos = 0

    def scale(self, g: int) -> float:
        return cfg_scale_at(self.scales[g], self.pos, self.L, self.schedule, self.stop_after)

    def __call__(self, g: int, logits: torch.Tensor) -> torch.Tensor:
        if not self.guided:
            return sample_from_logits(logits, self.settings[g], self.generator)
        cond, uncond = logits.float().chunk(2, dim=0)
        s = self.scale(g)
        # s == 1 is plain conditional sampling: skip the combination so it is bit-identical.
        guided = cond if s == 1.0 else uncond + s * (cond - uncond)
        idx = sample_from_logits(guided, self.settings[g], self.generator)
        return torch.cat([idx, idx], dim=0)
