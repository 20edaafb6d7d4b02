"""The quantizer's config (``QuantizerConfig``) and its validation, apart from the quantizers in
``quantize.py`` / ``quantize_extra.py`` that it configures."""
from __future__ import annotations

from dataclasses import dataclass, field

from groupgen.config import added_field

KINDS = ("vq", "multigroup", "pertoken", "residual", "fsq", "lfq")
CODEBOOK_KINDS = ("vq", "multigroup", "pertoken", "residual")


@dataclass
class QuantizerConfig:
    kind: str = "vq"                 # vq | multigroup | pertoken | residual | fsq | lfq
    codebook_size: int = 16384       # K per codebook (vq kinds; fsq/lfq derive K from levels/bits)
    groups: int = 1                  # G: multigroup sub-vectors, residual depth
    code_dim: int = 0                # 0 = derived (D/G; D for pertoken/residual); else must match
    l2_norm: bool = False            # cosine lookup: z and codes l2-normalised (LlamaGen, MGVQ)
    beta: float = 0.25               # commitment weight
    codebook_weight: float = 1.0     # codebook-loss weight (QG-VAE release: 0.25 with beta 1.0)
    init_scale: float = 0.0          # codes ~ U(-s, s); 0 = auto: 0.5 pertoken, 1/K otherwise
    ema: bool = False                # EMA codebook (VQ-VAE, Laplace smoothing) instead of gradient
    ema_decay: float = 0.99
    ema_eps: float = 1e-5
    entropy_weight: float = 0.0      # entropy loss: per-sample entropy low, codebook entropy high
    entropy_temperature: float = 0.01
    entropy_diversity: float = 1.0   # weight of the codebook-average entropy inside that loss
    nested_mask: bool = False        # MGVQ: keep the first k groups per batch (training only)
    nested_keep_probs: list[float] = field(default_factory=list)  # P(keep k=1..G); [] = default
    mask_until_step: int = 0         # MGVQ's two stages: masking for steps <= this, then off (0 = always)
    revive_every: int = 0            # steps between dead-code revivals (0 = off)
    revive_threshold: float = 1.0    # a code used fewer times than this in the window is dead
    revive_noise: float = 0.01       # revived code = distinct batch feature + N(0, (this * its rms)^2)
    revive_pool: int = 0             # features kept per slot to revive from (0 = the last batch only)
    revive_pick: str = "uniform"     # uniform | d2: features far from the live codes first (k-means++ weights)
    soft_revive: bool = False        # MGVQ release: usage EMA, rare codes pulled to batch features each step
    soft_revive_decay: float = 0.99
    num_tokens: int = 0              # pertoken: C (= L)
    learned_offset: bool | None = None  # per-slot offset added after lookup; None = pertoken only
    reset_every: int = 0             # pertoken-style grad-magnitude resets (0 = off)
    reset_noise: float = 1e-4        # moved code = loaded code + U(-1,1) * reset_noise
    reset_rule: str = "once"         # once (QG-VAE: live codes at most double a reset) | proportional
    refit_steps: list[int] = added_field(default_factory=list)  # after these steps: codes re-fit by Lloyd
    refit_images: int = added_field(default=8192)   # training images the trainer encodes for a refit
    refit_iters: int = added_field(default=5)       # Lloyd steps a refit
    refit_balance: float = added_field(default=0.0)  # > 0: equal-mass cells (Sinkhorn temperature); 0 = Lloyd
    ordered_dropout_p: float = 0.0   # pertoken: per sample, zero tokens from a random k onward
    residual_shared: bool = False    # residual: one codebook for all depths
    levels: list[int] = field(default_factory=list)     # fsq levels per channel, e.g. [8,8,8,5,5,5]
    fsq_groups: int = 1              # fsq: split channels into this many sub-indices
    lfq_split: list[int] = field(default_factory=list)  # lfq: bits per sub-index, [] = one index

    def keep_probs(self) -> list[float]:
        """P(keep k groups), k = 1..G. Default: MGVQ's release for G=4 (0.2/0.1/0.1/0.6); for other
        G, keep 1 w.p. 0.2, all w.p. 0.6, and 0.2 spread over the k in between (G=2: 0.4/0.6)."""
        G = self.groups
        if self.nested_keep_probs:
            return list(self.nested_keep_probs)
        if G == 1:
            return [1.0]
        if G == 2:
            return [0.4, 0.6]
        return [0.2] + [0.2 / (G - 2)] * (G - 2) + [0.6]

    def validate(self, dim: int | None = None) -> None:
        """Raise ValueError naming the bad field; with ``dim`` also check the latent dim fits."""
        def bad(msg):
            raise ValueError(f"quantizer config (kind={self.kind!r}): {msg}")
        if self.kind not in KINDS:
            bad(f"unknown kind; expected one of {list(KINDS)}")
        if self.groups < 1:
            bad(f"groups must be >= 1, got {self.groups}")
        if self.kind in CODEBOOK_KINDS and self.codebook_size < 2:
            bad(f"codebook_size must be >= 2, got {self.codebook_size}")
        if self.kind == "vq" and self.groups != 1:
            bad(f"kind 'vq' has one codebook (groups=1), got groups={self.groups}; use 'multigroup'")
        if self.kind in ("pertoken", "fsq", "lfq") and self.groups != 1:
            where = {"pertoken": "num_tokens", "fsq": "fsq_groups", "lfq": "lfq_split"}[self.kind]
            bad(f"groups must stay 1 for this kind (set {where} instead), got {self.groups}")
        for name in ("beta", "codebook_weight", "entropy_weight", "init_scale", "reset_noise", "revive_noise"):
            if getattr(self, name) < 0:
                bad(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.ema_decay < 1.0:
            bad(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.entropy_temperature <= 0:
            bad(f"entropy_temperature must be > 0, got {self.entropy_temperature}")
        if self.revive_every < 0 or self.reset_every < 0 or self.revive_pool < 0:
            bad("revive_every, reset_every and revive_pool must be >= 0")
        if self.mask_until_step < 0 or (self.mask_until_step and not self.nested_mask):
            bad(f"mask_until_step must be >= 0 and needs nested_mask=true, got {self.mask_until_step}")
        if self.revive_pick not in ("uniform", "d2"):
            bad(f"revive_pick must be 'uniform' or 'd2', got {self.revive_pick!r}")
        if self.reset_rule not in ("once", "proportional"):
            bad(f"reset_rule must be 'once' or 'proportional', got {self.reset_rule!r}")
        if self.refit_steps and (self.kind not in ("vq", "multigroup", "pertoken") or self.refit_images < 1
                                 or self.refit_iters < 1 or min(self.refit_steps) < 1 or self.refit_balance < 0):
            bad("refit_steps needs kind vq/multigroup/pertoken, steps >= 1, refit_images >= 1, refit_iters >= 1 "
                f"and refit_balance >= 0; "
                f"got kind {self.kind!r}, steps {self.refit_steps}, {self.refit_images} images, "
                f"{self.refit_iters} iters, balance {self.refit_balance}")
        if self.soft_revive and (self.ema or self.kind not in CODEBOOK_KINDS):
            bad("soft_revive needs a gradient-trained codebook (not ema, fsq or lfq)")
        if not 0.0 < self.soft_revive_decay < 1.0:
            bad(f"soft_revive_decay must be in (0, 1), got {self.soft_revive_decay}")
        if self.nested_mask and self.kind not in ("vq", "multigroup"):
            bad("nested_mask applies to kinds 'vq'/'multigroup' only")
        if self.nested_keep_probs:
            p = self.nested_keep_probs
            if len(p) != self.groups:
                bad(f"nested_keep_probs needs one probability per k=1..G ({self.groups}), got {len(p)}")
            if min(p) < 0 or abs(sum(p) - 1.0) > 1e-6:
                bad(f"nested_keep_probs must be >= 0 and sum to 1, got {p} (sum {sum(p)})")
        if not 0.0 <= self.ordered_dropout_p <= 1.0:
            bad(f"ordered_dropout_p must be in [0, 1], got {self.ordered_dropout_p}")
        if self.ordered_dropout_p > 0 and self.kind != "pertoken":
            bad("ordered_dropout_p applies to kind 'pertoken' only")
        if self.kind == "pertoken" and self.num_tokens < 1:
            bad(f"pertoken needs num_tokens >= 1 (the sequence length C), got {self.num_tokens}")
        if (self.ema or self.revive_every or self.reset_every) and self.kind not in CODEBOOK_KINDS:
            bad("ema / revive_every / reset_every need a learned codebook (not fsq/lfq)")
        if self.ema and self.reset_every:
            bad("reset_every uses codebook gradients; it cannot be combined with ema=True")
        if self.kind == "residual" and self.l2_norm:
            bad("l2_norm does not apply to residuals (they are not unit vectors)")
        if self.kind == "fsq":
            if not self.levels or min(self.levels) < 2:
                bad(f"fsq needs levels (each >= 2), got {self.levels}")
            if self.fsq_groups < 1 or len(self.levels) % self.fsq_groups:
                bad(f"fsq_groups={self.fsq_groups} must divide len(levels)={len(self.levels)}")
        if self.kind == "lfq" and self.lfq_split and min(self.lfq_split) < 1:
            bad(f"lfq_split entries must be >= 1, got {self.lfq_split}")
        if dim is not None:
            self._validate_dim(dim, bad)

    def _validate_dim(self, dim: int, bad) -> None:
        if dim < 1:
            bad(f"latent dim must be >= 1, got {dim}")
        if self.kind == "multigroup" and dim % self.groups:
            bad(f"latent dim D={dim} is not divisible by groups G={self.groups}")
        if self.kind in CODEBOOK_KINDS and self.code_dim:
            want = dim // self.groups if self.kind == "multigroup" else dim
            if self.code_dim != want:
                bad(f"code_dim={self.code_dim} does not match the latent: expected {want} "
                    f"(D={dim}{f' / G={self.groups}' if self.kind == 'multigroup' else ''}); "
                    "project the latent in the model, or set code_dim=0")
        if self.kind == "fsq" and dim != len(self.levels):
            bad(f"fsq needs latent dim D == len(levels) = {len(self.levels)}, got D={dim}")
        if self.kind == "lfq" and self.lfq_split and sum(self.lfq_split) != dim:
            bad(f"lfq_split {self.lfq_split} sums to {sum(self.lfq_split)} bits, latent dim D={dim}")
