"""Per-group output heads: each turns the trunk's hidden state at a position into G logit tensors.

``independent``: one linear map per group on the same hidden state (stored as one fused matrix
of ``sum(K)`` rows, split per group: one matmul instead of G). Groups are conditionally
independent given the hidden state.

``subtoken``: the exact chain rule p(s_0 | h) p(s_1 | h, s_0) ... as in MGVQ / Open-MAGVIT2 /
RQ-Transformer: a small causal transformer over [h, e(s_0), ..., e(s_{G-2})] plus a learned
per-group position, read out by one linear per group (K_g may differ). Teacher-forced in
``forward``; ``sample`` runs it group by group with its own G-slot KV cache.

Both heads: ``forward(h [..., dim], codes [..., G]) -> list[G] of [..., K_g]`` and
``sample(h [B, dim], pick) -> codes [B, G]``; the output matrices start at zero (LlamaGen).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Block, Linear, RMSNorm

Pick = Callable[[int, torch.Tensor], torch.Tensor]


def _picked(g: int, c: torch.Tensor, B: int) -> torch.Tensor:
    if c.shape != (B,):
        raise ValueError(f"pick(g={g}, logits) must return a LongTensor of shape [{B}], got {list(c.shape)}")
    return c.long()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype linear layers produce from ``x``: the autocast dtype when autocast is on."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class IndependentHeads(nn.Module):
    def __init__(self, dim: int, K: Sequence[int]):
        super().__init__()
        self.K = tuple(K)
        self.out = Linear(dim, sum(self.K), bias=False)

    def zero_init(self) -> None:
        nn.init.zeros_(self.out.weight)

    def forward(self, h: torch.Tensor, codes: torch.Tensor | None = None) -> list[torch.Tensor]:
        return list(self.out(h).split(self.K, dim=-1))

    def sample(self, h: torch.Tensor, pick: Pick) -> torch.Tensor:
        logits = self.forward(h)
        return torch.stack([_picked(g, pick(g, lg), h.shape[0]) for g, lg in enumerate(logits)], -1)


class SubtokenHead(nn.Module):
    def __init__(self, dim: int, K: Sequence[int], width: int, n_layer: int, n_head: int,
                 n_kv_head: int, hidden: int, norm_eps: float, resid_dropout: float = 0.0,
                 ffn_dropout: float = 0.0, attn_dropout: float = 0.0):
        super().__init__()
        self.K = tuple(K)
        G = len(self.K)
        self.width = width
        self.in_proj = Linear(dim, width, bias=False) if width != dim else nn.Identity()
        # One table for the G-1 conditioning groups, group g's rows start at offsets[g].
        self.embed = nn.Embedding(sum(self.K[:-1]), width) if G > 1 else None
        offs = [0]
        for k in self.K[:-2]:
            offs.append(offs[-1] + k)
        self.register_buffer("offsets", torch.tensor(offs[: max(G - 1, 0)], dtype=torch.long, device="cpu"),
                             persistent=False)
        self.pos = nn.Parameter(torch.zeros(G, width))
        self.layers = nn.ModuleList(
            Block(width, n_head, n_kv_head, hidden, norm_eps, attn_dropout, resid_dropout, ffn_dropout)
            for _ in range(n_layer))
        self.norm = RMSNorm(width, norm_eps)
        self.out = nn.ModuleList(Linear(width, k, bias=False) for k in self.K)

    def zero_init(self) -> None:
        for lin in self.out:
            nn.init.zeros_(lin.weight)

    def forward(self, h: torch.Tensor, codes: torch.Tensor) -> list[torch.Tensor]:
        G, W = len(self.K), self.width
        lead = h.shape[:-1]
        x = self.in_proj(h).unsqueeze(-2)                                     # [..., 1, W]
        if G > 1:
            e = F.embedding(codes[..., : G - 1] + self.offsets, self.embed.weight)  # [..., G-1, W]
            x = torch.cat([x, e.to(x.dtype)], dim=-2)
        x = (x + self.pos).reshape(-1, G, W)
        for layer in self.layers:
            x = layer(x)          # causal over the G sub-tokens; order is given by self.pos
        x = self.norm(x).reshape(*lead, G, W)
        return [self.out[g](x[..., g, :]) for g in range(G)]

    def sample(self, h: torch.Tensor, pick: Pick) -> torch.Tensor:
        G, B = len(self.K), h.shape[0]
        x = (self.in_proj(h) + self.pos[0]).unsqueeze(1)                     # [B, 1, W]
        att = self.layers[0].attention if len(self.layers) else None
        caches = []
        if att is not None:
            buf = torch.empty(len(self.layers), 2, B, att.n_kv_head, G, att.head_dim,
                              device=h.device, dtype=compute_dtype(x))   # k/v arrive in it: no upcast copies
            caches = [(buf[i, 0], buf[i, 1]) for i in range(len(self.layers))]
        out = []
        for g in range(G):
            y = x
            for layer, (kc, vc) in zip(self.layers, caches):
                y = layer.step(y, None, None, kc, vc, g)
            c = _picked(g, pick(g, self.out[g](self.norm(y[:, 0]))), B)
            out.append(c)
            if g < G - 1:
                x = (F.embedding(c + self.offsets[g], self.embed.weight) + self.pos[g + 1]).unsqueeze(1)
        return torch.stack(out, -1)
