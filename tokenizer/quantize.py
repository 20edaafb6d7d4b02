"""Stage-1 quantizers behind one interface (codes are always ``[B, L, G]``).

``build_quantizer(cfg, dim)`` returns a :class:`Quantizer`:

* ``q.quantize(z [B,L,D]) -> (z_q [B,L,D] fp32, codes [B,L,G] long, losses)``; ``losses["vq"]`` is
  the weighted total to add to the training loss, the other keys are components for logging.
* ``q.decode_codes(codes) -> z_q``, bit-for-bit equal to the eval-mode ``quantize`` output.
* ``q.layout_K()``, ``q.per_position_codebook``; ``q.stats()`` -> ``usage/g{g}``, ``perplexity/g{g}``
  (pertoken: means over tokens), ``usage``, ``perplexity`` (means over groups) and ``count`` (codes
  counted per slot), over every training-mode forward since ``q.reset_stats()``; rank-local under DDP.
* Trainer hooks, called once per optimizer step: ``q.after_backward()`` right after ``backward()``
  (before ``zero_grad``; accumulates |grad| per code for grad-magnitude resets) and
  ``q.step_end(step)`` after ``optimizer.step()`` with the 1-based global step (dead-code revival
  every ``revive_every`` steps, grad-magnitude resets every ``reset_every`` steps, soft revival every
  step, and the switch from nested masking to the unmasked fine-tune after ``mask_until_step``
  steps; the maintenance itself lives in ``quantize_revival.py``). Both return quickly when their
  feature is off; ``step_end`` returns a dict of counts for logging.

Kinds ``vq``, ``multigroup`` and ``pertoken`` are one class: ``P`` codebooks ``[P,K,d]`` searched
with one batched matmul. For ``multigroup`` a slot is a group (D split into G sub-vectors, MGVQ /
PQGAN, ``vq`` is G=1); for ``pertoken`` a slot is a position (QG-VAE: one codebook per token).
``residual``, ``fsq`` and ``lfq`` live in ``quantize_extra.py``; the config and its validation in
``quantizer_config.py`` (``QuantizerConfig`` is importable from here too).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from tokenizer import nearest_cpu
from tokenizer.code_usage import UsageTracker
from tokenizer.quantize_revival import grad_reset, lloyd, revive_dead, soft_revive
from tokenizer.quantizer_config import CODEBOOK_KINDS, QuantizerConfig



def build_quantizer(cfg: QuantizerConfig, dim: int) -> "Quantizer":
    """The quantizer for ``cfg`` acting on latents of width ``dim`` (= D)."""
    cfg.validate(dim)
    if cfg.kind in ("vq", "multigroup", "pertoken"):
        return VectorQuantizer(cfg, dim)
    from tokenizer.quantize_extra import FSQuantizer, LFQuantizer, ResidualVQ
    return {"residual": ResidualVQ, "fsq": FSQuantizer, "lfq": LFQuantizer}[cfg.kind](cfg, dim)


# ----------------------------------------------------------------------------- shared pieces

def entropy_terms(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean per-sample entropy, mean entropy of the sample-averaged distribution) of
    ``softmax(logits)`` for logits ``[P, N, K]``. A good code assignment has the first low
    (confident) and the second high (diverse), so the loss is ``first - gamma * second``."""
    logp = F.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    sample = -(p * logp).sum(-1).mean()
    avg = p.mean(dim=-2)
    codebook = -(avg * torch.log(avg.clamp_min(1e-12))).sum(-1).mean()
    return sample, codebook


class Quantizer(nn.Module):
    """Base class: see the module docstring for the contract."""

    per_position_codebook: bool = False

    def __init__(self, cfg: QuantizerConfig, dim: int):
        super().__init__()
        self.cfg, self.dim = cfg, dim

    def forward(self, z):
        return self.quantize(z)

    def quantize(self, z: torch.Tensor):
        raise NotImplementedError

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def layout_K(self) -> tuple[int, ...]:
        raise NotImplementedError

    def stats(self) -> dict:
        return self.tracker.stats()

    def reset_stats(self) -> None:
        self.tracker.reset()

    def after_backward(self) -> None:
        pass

    def step_end(self, step: int) -> dict:
        return {}

    def _check_z(self, z: torch.Tensor, L: int | None = None) -> None:
        if z.dim() != 3 or z.shape[-1] != self.dim or (L is not None and z.shape[1] != L):
            want = f"[B, {L if L is not None else 'L'}, {self.dim}]"
            raise ValueError(f"{type(self).__name__}.quantize: expected z of shape {want}, "
                             f"got {list(z.shape)}")

    def _check_codes(self, codes: torch.Tensor, L: int | None = None) -> None:
        G = len(self.layout_K())
        if codes.dim() != 3 or codes.shape[-1] != G or (L is not None and codes.shape[1] != L):
            raise ValueError(f"{type(self).__name__}.decode_codes: expected codes of shape "
                             f"[B, {L if L is not None else 'L'}, {G}], got {list(codes.shape)}")


# ----------------------------------------------------------------------------- codebooks

class Codebooks(nn.Module):
    """``P`` independent codebooks ``embed [P, K, d]`` with batched nearest-code search, optional EMA
    updates, dead-code revival and grad-magnitude resets. Used by the vq kinds and residual."""

    def __init__(self, P: int, K: int, d: int, cfg: QuantizerConfig, init_scale: float):
        super().__init__()
        self.P, self.K, self.d, self.cfg = P, K, d, cfg
        w = torch.empty(P, K, d).uniform_(-init_scale, init_scale)
        self.embed = nn.Parameter(w, requires_grad=not cfg.ema)
        if cfg.ema:  # counts start at one so unused codes stay put instead of blowing up
            self.register_buffer("ema_count", torch.ones(P, K))
            self.register_buffer("ema_sum", w.clone())
        if cfg.revive_every:
            self.register_buffer("window_usage", torch.zeros(P, K))
        if cfg.reset_every:
            self.register_buffer("grad_acc", torch.zeros(P, K))
            self.register_buffer("round_usage", torch.zeros(P, K))
        if cfg.soft_revive:  # the EMA is state (saved for an exact resume); the step's counts are not
            self.register_buffer("usage_ema", torch.zeros(P, K))
            self.register_buffer("step_counts", torch.zeros(P, K), persistent=False)
        self._recent: list[torch.Tensor | None] = [None] * P  # revival pool per slot (newest first)

    def codebook(self) -> torch.Tensor:
        """The effective fp32 codebook ``[P, K, d]`` (normalised under ``l2_norm``)."""
        e = self.embed.float()
        return F.normalize(e, dim=-1) if self.cfg.l2_norm else e

    @staticmethod
    def distances(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Squared distances ``[p, N, K]`` = |x|^2 + |e|^2 - 2 x.e by batched matmul."""
        sq = (x * x).sum(-1, keepdim=True) + (e * e).sum(-1)[:, None, :]
        return torch.baddbmm(sq, x, e.transpose(1, 2), alpha=-2.0)

    @torch.no_grad()
    def nearest(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """argmin over codes for ``x [p, N, d]`` against ``e [p, K, d]``, chunked over N so the
        distance block stays in cache (2^20 floats, 4 MiB: at 2^23 each block went to memory and the
        search took 5x longer at K 16384, BENCHMARKS.md "tokenizer_speed"). For K >= 2048 on the CPU
        the fused kernel of ``nearest_cpu`` runs instead (no distance block at all)."""
        # large K on the CPU: the fused kernel, if it builds (it is built on the first such call)
        if nearest_cpu.applies(x, e) and (idx := nearest_cpu.nearest(x, e)) is not None:
            return idx
        p, N, _ = x.shape
        rows = max(1, (1 << 20) // max(1, p * e.shape[1]))
        e2, et = (e * e).sum(-1)[:, None, :], e.transpose(1, 2)
        # |x|^2 is constant per row, so argmin needs only |e|^2 - 2 x.e (one pass fewer over [N, K]).
        # One block buffer for every chunk: a fresh 4 MiB tensor per chunk is fresh pages (page faults).
        buf = x.new_empty(p * min(rows, N) * e.shape[1])
        out = []
        for i in range(0, N, rows):
            xi = x[:, i:i + rows]
            blk = buf[:xi.shape[1] * p * e.shape[1]].view(p, xi.shape[1], e.shape[1])
            out.append(nearest_cpu.argmin_last(torch.baddbmm(e2, xi, et, alpha=-2.0, out=blk)))
        return torch.cat(out, dim=1) if out else x.new_zeros(p, 0, dtype=torch.long)

    @staticmethod
    def lookup(e: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``e [p, K, d]`` gathered at ``idx [p, N]`` -> ``[p, N, d]``."""
        return e.gather(1, idx[..., None].expand(-1, -1, e.shape[-1]))

    @torch.no_grad()
    def observe(self, x: torch.Tensor, idx: torch.Tensor, first: int = 0, recent: bool = True):
        """Training-time bookkeeping for slots first..first+p-1: usage windows, the feature pool for
        revival, and the EMA update."""
        p = x.shape[0]
        sl = slice(first, first + p)
        counts = torch.zeros(p, self.K, device=x.device).scatter_add_(
            1, idx, torch.ones_like(idx, dtype=torch.float32))
        if self.cfg.revive_every:
            self.window_usage[sl] += counts
        if self.cfg.reset_every:
            self.round_usage[sl] += counts
        if self.cfg.soft_revive:
            self.step_counts[sl] += counts
        if recent:  # the revival pool: the newest `revive_pool` features (at least the last batch)
            for i in range(p):
                old = self._recent[first + i]
                keep = self.cfg.revive_pool - x.shape[1]
                self._recent[first + i] = (torch.cat([x[i], old[:keep]]) if keep > 0 and old is not None
                                           else x[i])
        if self.cfg.ema:
            sums = torch.zeros(p, self.K, self.d, device=x.device).scatter_add_(
                1, idx[..., None].expand(-1, -1, self.d), x.float())
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(counts)
                dist.all_reduce(sums)
            a = 1.0 - self.cfg.ema_decay
            self.ema_count[sl].mul_(1 - a).add_(counts, alpha=a)
            self.ema_sum[sl].mul_(1 - a).add_(sums, alpha=a)
            n = self.ema_count[sl].sum(-1, keepdim=True)
            smoothed = (self.ema_count[sl] + self.cfg.ema_eps) / (n + self.K * self.cfg.ema_eps) * n
            self.embed.data[sl] = (self.ema_sum[sl] / smoothed[..., None]).to(self.embed.dtype)

    @torch.no_grad()
    def after_backward(self) -> None:
        if self.cfg.reset_every and self.embed.grad is not None:
            self.grad_acc += self.embed.grad.detach().float().abs().sum(-1)

    def revive(self) -> int:
        """Dead-code revival (``quantize_revival.revive_dead``)."""
        return revive_dead(self)

    def grad_reset(self) -> int:
        """QG-VAE reset (``quantize_revival.grad_reset``)."""
        return grad_reset(self)

    def step_end(self, step: int) -> dict:
        out = {}
        if self.cfg.soft_revive and step > 0:
            out["soft_revived"] = soft_revive(self)
        if self.cfg.revive_every and step > 0 and step % self.cfg.revive_every == 0:
            out["revived"] = self.revive()
        if self.cfg.reset_every and step > 0 and step % self.cfg.reset_every == 0:
            out["reset"] = self.grad_reset()
        return out


# ----------------------------------------------------------------------------- vq / multigroup / pertoken

class VectorQuantizer(Quantizer):
    """kinds ``vq``, ``multigroup`` (slot = group, codes shared over positions) and ``pertoken``
    (slot = position, QG-VAE). Latents are rearranged to ``[P, N, d]`` and searched in one batched
    matmul against ``[P, K, d]``."""

    def __init__(self, cfg: QuantizerConfig, dim: int):
        super().__init__(cfg, dim)
        self.per_position_codebook = cfg.kind == "pertoken"
        self.G = 1 if self.per_position_codebook else cfg.groups
        self.P = cfg.num_tokens if self.per_position_codebook else self.G
        self.d = dim if self.per_position_codebook else dim // self.G
        K = cfg.codebook_size
        scale = cfg.init_scale or (0.5 if self.per_position_codebook else 1.0 / K)
        self.books = Codebooks(self.P, K, self.d, cfg, scale)
        use_offset = self.per_position_codebook if cfg.learned_offset is None else cfg.learned_offset
        self.offset = nn.Parameter(torch.zeros(self.P, self.d)) if use_offset else None
        self.tracker = UsageTracker([K] * self.P, [0] * self.P if self.per_position_codebook else None)
        self.last_keep = self.G  # groups kept by the last forward (nested masking)
        if cfg.mask_until_step:  # optimizer steps done, saved so a resumed run keeps its stage
            self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def layout_K(self) -> tuple[int, ...]:
        return (self.cfg.codebook_size,) * self.G

    def _to_slots(self, z: torch.Tensor) -> torch.Tensor:
        B, L, _ = z.shape
        if self.per_position_codebook:
            return z.transpose(0, 1)                                  # [C, B, D]
        return z.reshape(B * L, self.G, self.d).transpose(0, 1)      # [G, B*L, d]

    def _from_slots(self, x: torch.Tensor, B: int, L: int) -> torch.Tensor:
        if self.per_position_codebook:
            return x.transpose(0, 1).contiguous()
        return x.transpose(0, 1).reshape(B, L, self.dim)

    def _finish(self, q: torch.Tensor, keep: int) -> torch.Tensor:
        """Post-lookup steps shared by quantize and decode_codes (so both agree bit for bit)."""
        if self.offset is not None:
            q = q + self.offset.float()[:, None, :]
        if keep < self.P:  # nested masking: zero every group from `keep` on, after lookup
            mask = torch.arange(self.P, device=q.device)[:, None, None] < keep
            q = torch.where(mask, q, torch.zeros((), device=q.device))
        return q

    def masking_on(self) -> bool:
        """Stage 1 (nested masking) while fewer than ``mask_until_step`` steps are done; stage 2 (the
        unmasked fine-tune of MGVQ's release) after. Always on when ``mask_until_step`` is 0."""
        return not self.cfg.mask_until_step or int(self.steps_done) < self.cfg.mask_until_step

    def _draw_keep(self, device) -> int:
        """One draw per batch; under data parallelism rank 0's draw is used by every rank so the
        EMA all-reduce sees the same groups everywhere."""
        probs = torch.tensor(self.cfg.keep_probs(), dtype=torch.float)
        k = torch.multinomial(probs, 1).to(device) + 1
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(k, src=0)
        return int(k)

    def quantize(self, z: torch.Tensor, keep_groups: int | None = None):
        """``keep_groups`` (multigroup, eval) zeroes groups >= k like nested masking does in training."""
        self._check_z(z, self.cfg.num_tokens if self.per_position_codebook else None)
        B, L, _ = z.shape
        cfg = self.cfg
        if keep_groups is not None:
            keep = keep_groups
        elif self.training and cfg.nested_mask and self.masking_on():
            keep = self._draw_keep(z.device)
        else:
            keep = self.P
        if not 1 <= keep <= self.P or (keep < self.P and self.per_position_codebook):
            raise ValueError(f"keep_groups={keep} must be in [1, G={self.G}] (multigroup only)")
        self.last_keep = keep
        with torch.autocast(z.device.type, enabled=False):
            x = self._to_slots(z.float())
            if cfg.l2_norm:
                x = F.normalize(x, dim=-1)
            e = self.books.codebook()
            idx = self.books.nearest(x.detach(), e.detach())
            q = self.books.lookup(e, idx)
            xk, qk = x[:keep], q[:keep]  # masked groups contribute no VQ losses
            commit = F.mse_loss(xk, qk.detach())
            zero = x.new_zeros(())
            cb = zero if cfg.ema else F.mse_loss(qk, xk.detach())
            losses = {"codebook": cb, "commitment": commit}
            total = cfg.codebook_weight * cb + cfg.beta * commit
            if cfg.entropy_weight > 0:
                logits = -self.books.distances(xk, e[:keep]) / cfg.entropy_temperature
                s_ent, c_ent = entropy_terms(logits)
                ent = s_ent - cfg.entropy_diversity * c_ent
                losses.update(entropy=ent, sample_entropy=s_ent, codebook_entropy=c_ent)
                total = total + cfg.entropy_weight * ent
            losses["vq"] = total
            if self.training:  # eval forwards (held-out PSNR, recon strips) stay out of the training stats
                self.books.observe(xk.detach(), idx[:keep])
                self.tracker.update(idx[:keep])
            # straight-through: forward value is exactly q (x - x.detach() == 0), gradient goes to x
            out = self._finish(q.detach() + (x - x.detach()), keep)
            out = self._from_slots(out, B, L)
            if self.training and cfg.ordered_dropout_p > 0:
                out = out * self._ordered_mask(B, L, out.device)[:, :, None]
        if self.per_position_codebook:
            codes = idx.t()[:, :, None]
        else:
            codes = idx.t().reshape(B, L, self.G)
        return out, codes, losses

    def _ordered_mask(self, B: int, L: int, device) -> torch.Tensor:
        """Per sample w.p. p keep tokens < k for k ~ U{1..L-1}, else keep all: [B, L] of 0/1."""
        drop = torch.rand(B, device=device) < self.cfg.ordered_dropout_p
        k = torch.randint(1, max(2, L), (B,), device=device)
        k = torch.where(drop, k, torch.full_like(k, L))
        return (torch.arange(L, device=device)[None, :] < k[:, None]).float()

    def decode_codes(self, codes: torch.Tensor, keep_groups: int | None = None) -> torch.Tensor:
        self._check_codes(codes, self.cfg.num_tokens if self.per_position_codebook else None)
        B, L, _ = codes.shape
        idx = codes[..., 0].t() if self.per_position_codebook else codes.reshape(B * L, self.G).t()
        with torch.autocast(codes.device.type, enabled=False):
            q = self.books.lookup(self.books.codebook(), idx.long())
            return self._from_slots(self._finish(q, keep_groups or self.P), B, L)

    def after_backward(self) -> None:
        self.books.after_backward()

    @torch.no_grad()
    def refit(self, latents: list[torch.Tensor]) -> int:
        """Re-fit every codebook by Lloyd to the encoder latents ``[B, L, D]`` of fresh images (the trainer's
        ``refit_steps``); returns how many empty cells were re-seeded."""
        x = torch.cat([self._to_slots(z.float()) for z in latents], dim=1)
        if self.cfg.l2_norm:
            x = F.normalize(x, dim=-1)
        return lloyd(self.books, x, self.cfg.refit_iters, self.cfg.refit_balance)

    def step_end(self, step: int) -> dict:
        if self.cfg.mask_until_step:
            self.steps_done.fill_(step)
        return self.books.step_end(step)
