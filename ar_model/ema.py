"""Exponential moving average of model weights, kept in fp32 on rank 0 (exported as ``ema.safetensors``)."""
from __future__ import annotations

import torch


class EMA:
    """``shadow = d * shadow + (1 - d) * param`` over the floating-point entries of a state dict.

    ``d = min(decay, (1 + n) / (10 + n))`` at the n-th update (from 0): without this warm-up the initial
    weights keep ``decay ** steps`` of the average (0.999 over 2,000 steps: 14%), and a short run's EMA
    samples from a blend of the trained and the random model.
    """

    def __init__(self, state: dict[str, torch.Tensor], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in state.items() if v.is_floating_point()}

    def decay_at(self, n: int) -> float:
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor], n: int) -> None:
        """``params``: name -> current tensor (same names as the state dict the EMA was built from);
        ``n``: how many updates came before this one (the optimizer step, so a resume continues the ramp)."""
        keys = [k for k in self.shadow if k in params]
        if len(keys) != len(self.shadow):
            missing = sorted(set(self.shadow) - set(params))[:5]
            raise KeyError(f"EMA update is missing parameters {missing}")
        src = [params[k].detach().float() for k in keys]
        # lerp(shadow, p, 1 - d) == d * shadow + (1 - d) * p, one fused op per tensor list.
        torch._foreach_lerp_([self.shadow[k] for k in keys], src, 1.0 - self.decay_at(n))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        if set(sd) != set(self.shadow):
            diff = sorted(set(sd) ^ set(self.shadow))[:5]
            raise KeyError(f"EMA state does not match the model: differing keys {diff}")
        for k, v in sd.items():
            self.shadow[k].copy_(v.float())
