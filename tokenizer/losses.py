"""Tokenizer training losses: reconstruction (L1 | Charbonnier, + L2), LPIPS, PatchGAN hinge.

LPIPS weights never download here. Sources, in order: ``lpips_vgg_path`` (a torchvision VGG16 state
dict), the torch hub cache ``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``, or ``lpips_random``
(random VGG trunk: builds offline for tests/demos, **plumbing only; the number means nothing**).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from groupgen.config import ConfigError

from .conv import Conv2d

VGG16_FILE = "vgg16-397923af.pth"


@dataclass
class LossConfig:
    recon: str = "l1"                   # l1 | charbonnier (MGVQ) | none
    recon_weight: float = 1.0
    l2_weight: float = 1.0
    charbonnier_eps: float = 1e-3
    vq_weight: float = 1.0              # multiplies the quantizer's losses["vq"]
    perceptual_weight: float = 0.0      # LPIPS (VGG); needs weights, see module docstring
    lpips_vgg_path: str = ""            # torchvision VGG16 state dict (vgg16-397923af.pth)
    lpips_random: bool = False          # random VGG trunk: plumbing only
    disc_weight: float = 0.0            # 0 = no GAN
    disc_start: int = 0                 # generator/discriminator GAN terms from this step on
    disc_ndf: int = 64
    disc_layers: int = 3
    disc_norm: str = "group"            # group | batch | none
    adaptive_disc_weight: bool = False  # VQGAN: scale by |grad rec| / |grad gan| on the last layer

    def validate(self):
        if self.recon not in ("l1", "charbonnier", "none"):
            raise ConfigError(f"loss.recon must be l1, charbonnier or none, got {self.recon!r}")
        if self.disc_norm not in ("group", "batch", "none"):
            raise ConfigError(f"loss.disc_norm must be group, batch or none, got {self.disc_norm!r}")
        for k in ("recon_weight", "l2_weight", "vq_weight", "perceptual_weight", "disc_weight"):
            if getattr(self, k) < 0:
                raise ConfigError(f"loss.{k} must be >= 0, got {getattr(self, k)}")


def recon_loss(x: torch.Tensor, xrec: torch.Tensor, cfg: LossConfig) -> dict[str, torch.Tensor]:
    """Per-part reconstruction losses (unweighted, fp32)."""
    d = xrec.float() - x.float()
    out = {"l2": d.pow(2).mean()}
    if cfg.recon == "l1":
        out["l1"] = d.abs().mean()
    elif cfg.recon == "charbonnier":
        out["charbonnier"] = torch.sqrt(d * d + cfg.charbonnier_eps ** 2).mean()
    return out


# ----------------------------------------------------------------------------- LPIPS

class LPIPSUnavailable(RuntimeError):
    pass


def vgg16_cache_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def lpips_weights_available(vgg_path: str = "") -> bool:
    return bool(vgg_path and Path(vgg_path).is_file()) or vgg16_cache_path().is_file()


class LPIPS(nn.Module):
    """Frozen LPIPS(VGG) on images in [-1, 1]; grey images are repeated to 3 channels."""

    def __init__(self, vgg_path: str = "", random: bool = False):
        super().__init__()
        import lpips

        if random:
            warnings.warn("LPIPS with a random VGG trunk (lpips_random=True): for plumbing only, the values "
                          "are not a perceptual metric", stacklevel=2)
            self.net = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
        elif vgg_path:
            if not Path(vgg_path).is_file():
                raise LPIPSUnavailable(f"lpips_vgg_path {vgg_path!r} does not exist")
            self.net = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
            self._load_vgg(vgg_path)
        elif vgg16_cache_path().is_file():
            self.net = lpips.LPIPS(net="vgg", verbose=False)  # torchvision finds the cached file
        else:
            raise LPIPSUnavailable(
                "LPIPS needs VGG16 weights and nothing may be downloaded here. Provide them by either "
                f"(a) copying torchvision's {VGG16_FILE} to {vgg16_cache_path()} (set TORCH_HOME to move "
                "that cache), or (b) setting loss.lpips_vgg_path=/path/to/vgg16.pth (a torchvision VGG16 "
                "state dict); or set loss.perceptual_weight=0. (loss.lpips_random=true builds with a random "
                "trunk for plumbing tests only.)")
        self.net.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def _load_vgg(self, path: str) -> None:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        trunk = self.net.net  # slices of torchvision's vgg16().features, same child indices
        n = 0
        for sname, sl in trunk.named_children():
            for idx, mod in sl.named_children():
                for pname, p in mod.named_parameters(recurse=False):
                    key = f"features.{idx}.{pname}"
                    if key not in sd:
                        raise LPIPSUnavailable(f"{path}: not a torchvision VGG16 state dict (missing {key})")
                    p.data.copy_(sd[key])
                    n += 1
        if n == 0:
            raise LPIPSUnavailable(f"{path}: no VGG16 feature weights loaded")

    def train(self, mode: bool = True):
        return super().train(False)  # always eval (dropout in the lin layers off)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image distances [B]."""
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        return self.net(x.float(), y.float()).flatten()


def build_lpips(cfg: LossConfig) -> LPIPS | None:
    if cfg.perceptual_weight <= 0:
        return None
    return LPIPS(cfg.lpips_vgg_path, cfg.lpips_random)


# ----------------------------------------------------------------------------- PatchGAN

class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix/taming): 4x4 convs, stride 2 for the first n_layers, LeakyReLU(0.2),
    a 1-channel map of patch logits. ``norm='group'`` by default: batch statistics would let the
    discriminator tell a real-only from a fake-only batch and depend on the per-rank batch."""

    def __init__(self, in_channels: int, ndf: int = 64, n_layers: int = 3, norm: str = "group"):
        super().__init__()

        def nrm(c):
            if norm == "batch":
                return nn.BatchNorm2d(c)
            if norm == "group":
                return nn.GroupNorm(min(32, c // 4) if c >= 4 else 1, c)
            return nn.Identity()

        layers = [Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = ndf
        for i in range(1, n_layers + 1):
            cn = ndf * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1
            layers += [Conv2d(c, cn, 4, stride, 1, bias=norm == "none"), nrm(cn), nn.LeakyReLU(0.2, True)]
            c = cn
        layers.append(Conv2d(c, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # taming init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.float().mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's balance: |d rec / d W_last| / (|d gan / d W_last| + 1e-4), clamped, no gradient."""
    gr = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gg = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (gr.norm() / (gg.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def gan_active(cfg: LossConfig, step: int) -> bool:
    """``step`` is the 0-based index of the optimizer step being computed."""
    return cfg.disc_weight > 0 and step >= cfg.disc_start
