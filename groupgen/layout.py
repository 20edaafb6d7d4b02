"""The token layout: the one contract between tokenizer, token store, AR model, sampler and evaluator.

Codes have shape ``[N, L, G]``: ``L`` positions, ``G`` sub-indices per position, sub-index ``g`` drawn
from its own codebook of size ``K[g]``. ``kind`` says how positions are arranged: ``grid`` (``h x w``
raster order) or ``seq`` (1D global tokens, e.g. QG-VAE, whose codebook may differ per position).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch


class LayoutError(ValueError):
    pass


@dataclass(frozen=True)
class TokenLayout:
    kind: str                       # "grid" | "seq"
    L: int                          # positions
    K: tuple[int, ...]              # codebook size per group; len(K) == G
    h: int = 0                      # grid rows (grid only)
    w: int = 0                      # grid cols (grid only)
    per_position_codebook: bool = False   # seq layouts whose codebook differs per position
    image_size: int = 0             # pixels per side of the images the tokenizer reads/writes
    channels: int = 3               # image channels the tokenizer reads/writes

    def __post_init__(self):
        object.__setattr__(self, "K", tuple(int(k) for k in self.K))
        if self.kind not in ("grid", "seq"):
            raise LayoutError(f"layout kind must be 'grid' or 'seq', got {self.kind!r}")
        if self.L <= 0 or not self.K or min(self.K) <= 1:
            raise LayoutError(f"layout needs L > 0 and every K > 1, got L={self.L} K={self.K}")
        if self.kind == "grid" and self.h * self.w != self.L:
            raise LayoutError(f"grid layout {self.h}x{self.w} does not have L={self.L} positions")

    @property
    def G(self) -> int:
        return len(self.K)

    @property
    def bits_per_image(self) -> float:
        return self.L * sum(math.log2(k) for k in self.K)

    def code_dtype(self) -> np.dtype:
        """Smallest unsigned integer type that holds every code."""
        m = max(self.K) - 1
        for dt in (np.uint8, np.uint16, np.uint32):
            if m <= np.iinfo(dt).max:
                return np.dtype(dt)
        return np.dtype(np.int64)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["K"] = list(self.K)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TokenLayout":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise LayoutError(f"unknown layout keys {sorted(unknown)}; expected {sorted(names)}")
        return cls(**{k: (tuple(v) if k == "K" else v) for k, v in d.items()})

    def check_codes(self, codes: torch.Tensor | np.ndarray, what: str = "codes") -> None:
        """Raise LayoutError unless ``codes`` is ``[..., L, G]`` with every index in range."""
        shape = tuple(codes.shape)
        if len(shape) < 2 or shape[-2:] != (self.L, self.G):
            raise LayoutError(f"{what}: expected shape [..., L={self.L}, G={self.G}], got {list(shape)}")
        if codes.size == 0 if isinstance(codes, np.ndarray) else codes.numel() == 0:
            return
        arr = codes if isinstance(codes, torch.Tensor) else torch.from_numpy(np.asarray(codes).astype(np.int64))
        flat = arr.reshape(-1, self.G).long()
        lo = flat.min(0).values
        hi = flat.max(0).values
        for g, k in enumerate(self.K):
            if lo[g] < 0 or hi[g] >= k:
                raise LayoutError(f"{what}: group {g} has indices in [{int(lo[g])}, {int(hi[g])}], "
                                  f"codebook size is {k}")

    def check_same(self, other: "TokenLayout", a: str = "expected", b: str = "got") -> None:
        """Raise LayoutError naming each field where two layouts differ (image fields ignored)."""
        diffs = []
        for f in ("kind", "L", "K", "h", "w", "per_position_codebook"):
            x, y = getattr(self, f), getattr(other, f)
            if x != y:
                diffs.append(f"{f}: {a} {x!r} vs {b} {y!r}")
        if diffs:
            raise LayoutError("token layout mismatch: " + "; ".join(diffs))

    def describe(self) -> str:
        pos = f"{self.h}x{self.w} grid" if self.kind == "grid" else f"{self.L}-token seq"
        ks = f"{self.K[0]}" if len(set(self.K)) == 1 else "/".join(map(str, self.K))
        return f"{pos}, G={self.G} x K={ks} ({self.bits_per_image:.0f} bits/image)"
