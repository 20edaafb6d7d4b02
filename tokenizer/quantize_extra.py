"""Quantizers beyond plain codebook lookup: residual VQ (RQ-VAE), FSQ and LFQ.

Same interface as ``tokenizer.quantize`` (build them with ``build_quantizer``).
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from tokenizer.code_usage import UsageTracker
from tokenizer.quantize import Codebooks, Quantizer, QuantizerConfig, entropy_terms


class ResidualVQ(Quantizer):
    """RQ-VAE: sub-index g quantises the residual left by depths < g; z_q is the sum of the G looked-
    up codes. Codebooks are separate per depth, or one shared (``residual_shared``)."""

    def __init__(self, cfg: QuantizerConfig, dim: int):
        super().__init__(cfg, dim)
        self.G = cfg.groups
        K = cfg.codebook_size
        self.books = Codebooks(1 if cfg.residual_shared else self.G, K, dim, cfg,
                               cfg.init_scale or 1.0 / K)
        self.tracker = UsageTracker([K] * self.G)

    def layout_K(self) -> tuple[int, ...]:
        return (self.cfg.codebook_size,) * self.G

    def _slot(self, g: int) -> int:
        return 0 if self.cfg.residual_shared else g

    def quantize(self, z: torch.Tensor):
        self._check_z(z)
        B, L, D = z.shape
        cfg = self.cfg
        with torch.autocast(z.device.type, enabled=False):
            x = z.float().reshape(1, B * L, D)
            e_all = self.books.codebook()
            r, total_q = x.detach(), None
            cb = commit = x.new_zeros(())
            idxs = []
            for g in range(self.G):
                s = self._slot(g)
                e = e_all[s:s + 1]
                idx = self.books.nearest(r, e.detach())
                q = self.books.lookup(e, idx)
                if not cfg.ema:
                    cb = cb + F.mse_loss(q, r)
                if self.training:  # shared book: revive from depth-0 features only
                    self.books.observe(r, idx, first=s, recent=(g == 0 or not cfg.residual_shared))
                total_q = q.detach() if total_q is None else total_q + q.detach()
                commit = commit + F.mse_loss(x, total_q)  # RQ-VAE: z vs every partial sum
                r = r - q.detach()
                idxs.append(idx)
            idx = torch.cat(idxs, 0)  # [G, N]
            if self.training:  # usage stats count training forwards only
                self.tracker.update(idx)
            cb, commit = cb / self.G, commit / self.G
            losses = {"codebook": cb, "commitment": commit,
                      "vq": cfg.codebook_weight * cb + cfg.beta * commit}
            out = (total_q + (x - x.detach())).reshape(B, L, D)
        return out, idx.t().reshape(B, L, self.G), losses

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        self._check_codes(codes)
        B, L, G = codes.shape
        idx = codes.reshape(B * L, G).t().long()
        with torch.autocast(codes.device.type, enabled=False):
            e_all = self.books.codebook()
            total = None
            for g in range(G):  # same summation order as quantize, so the result is bit-identical
                s = self._slot(g)
                q = self.books.lookup(e_all[s:s + 1], idx[g:g + 1])
                total = q if total is None else total + q
            return total.reshape(B, L, self.dim)

    def after_backward(self) -> None:
        self.books.after_backward()

    def step_end(self, step: int) -> dict:
        return self.books.step_end(step)


class _ChannelCodes(Quantizer):
    """Shared code<->digit plumbing for FSQ/LFQ: channel c has ``radix[c]`` values, channels are split
    into contiguous groups, and a group's index is the mixed-radix number of its digits (first
    channel least significant)."""

    def _setup(self, radix: list[int], split: list[int]):
        self.radix_list, self.split = radix, split
        basis, Ks, gid = [], [], []
        start = 0
        for g, n in enumerate(split):
            b = 1
            for c in range(start, start + n):
                basis.append(b)
                b *= radix[c]
                gid.append(g)
            Ks.append(b)
            start += n
        self.Ks = tuple(Ks)
        self.register_buffer("radix", torch.tensor(radix, dtype=torch.long), persistent=False)
        self.register_buffer("basis", torch.tensor(basis, dtype=torch.long), persistent=False)
        self.register_buffer("gid", torch.tensor(gid, dtype=torch.long), persistent=False)
        self.tracker = UsageTracker(list(Ks))

    def layout_K(self) -> tuple[int, ...]:
        return self.Ks

    def digits_to_codes(self, digits: torch.Tensor) -> torch.Tensor:
        """``[B, L, D]`` digits -> ``[B, L, G]`` indices."""
        B, L, _ = digits.shape
        out = torch.zeros(B, L, len(self.Ks), dtype=torch.long, device=digits.device)
        return out.index_add_(2, self.gid, digits.long() * self.basis)

    def codes_to_digits(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes.long()[..., self.gid] // self.basis) % self.radix

    def _track(self, codes: torch.Tensor) -> None:
        if self.training:  # usage stats count training forwards only
            self.tracker.update(codes.reshape(-1, codes.shape[-1]).t())

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        self._check_codes(codes)
        with torch.autocast(codes.device.type, enabled=False):
            return self.digits_to_values(self.codes_to_digits(codes))


class FSQuantizer(_ChannelCodes):
    """Finite scalar quantisation: channel c is squashed by a shifted tanh into ``levels[c]`` integer
    bins and rounded; values are ``(digit - levels//2) / (levels//2)``. G = ``fsq_groups``."""

    def __init__(self, cfg: QuantizerConfig, dim: int):
        super().__init__(cfg, dim)
        G = cfg.fsq_groups
        self._setup(list(cfg.levels), [dim // G] * G)
        lv = torch.tensor(cfg.levels, dtype=torch.float32)
        self.register_buffer("half_l", (lv - 1) * (1 + 1e-3) / 2, persistent=False)
        self.register_buffer("offset", (1 - torch.remainder(lv, 2)) * 0.5, persistent=False)
        self.register_buffer("half_w", torch.div(lv, 2, rounding_mode="floor"), persistent=False)

    def bound(self, x: torch.Tensor) -> torch.Tensor:
        """Squash to (-(L//2) - eps, L - 1 - L//2 + eps); z = 0 maps to 0 for odd and even L."""
        shift = torch.atanh(self.offset / self.half_l)
        return torch.tanh(x + shift) * self.half_l - self.offset

    def digits_to_values(self, digits: torch.Tensor) -> torch.Tensor:
        return (digits.float() - self.half_w) / self.half_w

    def quantize(self, z: torch.Tensor):
        self._check_z(z)
        with torch.autocast(z.device.type, enabled=False):
            s = self.bound(z.float())
            digits = (torch.round(s.detach()) + self.half_w).long()
            digits = torch.minimum(digits.clamp_min(0), self.radix - 1)
            v = self.digits_to_values(digits)
            s = s / self.half_w
            out = v + (s - s.detach())  # straight-through rounding; forward value is exactly v
        codes = self.digits_to_codes(digits)
        self._track(codes)
        return out, codes, {"vq": out.new_zeros(())}


class LFQuantizer(_ChannelCodes):
    """Lookup-free quantisation: each channel becomes one bit (z > 0 -> +1 else -1); the D bits are
    split into sub-indices by ``lfq_split`` (e.g. 18 bits -> [6, 12]). Loss: ``beta`` * commitment
    + ``entropy_weight`` * (per-sample entropy - ``entropy_diversity`` * batch entropy) of the
    distribution softmax(-|z - c|^2 / T) over codes c, which factorises per bit."""

    EXACT_BITS = 12  # batch entropy exact over 2^bits codes up to this chunk size, per-bit beyond

    def __init__(self, cfg: QuantizerConfig, dim: int):
        super().__init__(cfg, dim)
        self._setup([2] * dim, list(cfg.lfq_split) or [dim])

    def digits_to_values(self, digits: torch.Tensor) -> torch.Tensor:
        return digits.float() * 2.0 - 1.0

    def entropy(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-sample entropy, batch-average entropy), summed over sub-indices, for ``x [N, D]``."""
        T = self.cfg.entropy_temperature
        sample = codebook = x.new_zeros(())
        for chunk in torch.split(x, self.split, dim=-1):
            k = chunk.shape[-1]
            if k <= self.EXACT_BITS:
                corners = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=k)),
                                       device=x.device)  # [2^k, k]
                s, c = entropy_terms((chunk @ corners.t() * (2.0 / T))[None])
            else:  # per-bit: exact per-sample entropy, batch entropy from bit marginals (an upper bound)
                p = torch.sigmoid(chunk * (4.0 / T))
                s = _bin_entropy(p).sum(-1).mean()
                c = _bin_entropy(p.mean(0)).sum()
            sample, codebook = sample + s, codebook + c
        return sample, codebook

    def quantize(self, z: torch.Tensor):
        self._check_z(z)
        cfg = self.cfg
        with torch.autocast(z.device.type, enabled=False):
            x = z.float()
            digits = (x.detach() > 0).long()
            v = self.digits_to_values(digits)
            commit = F.mse_loss(x, v)
            losses = {"commitment": commit}
            total = cfg.beta * commit
            if cfg.entropy_weight > 0:
                s_ent, c_ent = self.entropy(x.reshape(-1, self.dim))
                ent = s_ent - cfg.entropy_diversity * c_ent
                losses.update(entropy=ent, sample_entropy=s_ent, codebook_entropy=c_ent)
                total = total + cfg.entropy_weight * ent
            losses["vq"] = total
            out = v + (x - x.detach())
        codes = self.digits_to_codes(digits)
        self._track(codes)
        return out, codes, losses


def _bin_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-7, 1 - 1e-7)
    return -(p * p.log() + (1 - p) * (1 - p).log())


__all__ = ["ResidualVQ", "FSQuantizer", "LFQuantizer"]
