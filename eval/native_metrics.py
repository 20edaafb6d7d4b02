"""Reconstruction metrics on a dataset's native basis, the one its reference code scores on.

Fashion-MNIST is 28x28; groupgen pads it to 32x32 with -1 (black), and a padded border is
reconstructed almost exactly, which adds ~1.15 dB of PSNR that the references never see. Here the
metrics are taken on the 28x28 centre only, with the references' conventions:

* PSNR per image (mean of per-image PSNRs) and from the mean MSE over all native pixels
  (MGVQ's convention), images on [0, 1] (peak 1; the same numbers as [-1, 1] with peak 2);
* SSIM as ``skimage.metrics.structural_similarity`` computes it by default: a 7x7 *uniform* window,
  sample covariances (N / (N - 1), N = 49), K1 0.01, K2 0.03, ``data_range`` given (1 on [0, 1]),
  the SSIM map averaged after cropping (7 - 1) / 2 = 3 px from each border (so only full windows
  count), mean over channels. groupgen's other SSIM (``eval.reconstruction.ssim``) keeps Wang et
  al.'s 11x11 Gaussian window.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NATIVE_SIZE = {"fmnist": 28}   # datasets whose images groupgen pads (data.resize="pad")


def native_box(data_cfg) -> tuple[int, int] | None:
    """(offset, size) of the native image inside the model's images, or None when they coincide."""
    n = NATIVE_SIZE.get(getattr(data_cfg, "name", ""))
    s = data_cfg.image_size
    if n is None or data_cfg.resize != "pad" or s <= n:
        return None
    return (s - n) // 2, n


def crop_native(x: torch.Tensor, box: tuple[int, int] | None) -> torch.Tensor:
    if box is None:
        return x
    o, n = box
    return x[..., o:o + n, o:o + n]


def ssim_skimage(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win: int = 7) -> torch.Tensor:
    """Per-image SSIM [B] of ``[B, C, H, W]`` images, skimage's default (see the module docstring)."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim_skimage needs two [B,C,H,W] tensors of one shape, got {list(x.shape)}, {list(y.shape)}")
    if min(x.shape[-2:]) < win:
        raise ValueError(f"images of {list(x.shape[-2:])} are smaller than the {win}x{win} window")
    x, y = x.double(), y.double()
    c = x.shape[1]
    k = torch.full((c, 1, win, win), 1.0 / (win * win), dtype=torch.float64, device=x.device)
    f = lambda t: F.conv2d(t, k, groups=c)  # noqa: E731  valid windows = skimage's map after its crop
    ux, uy = f(x), f(y)
    cov = win * win / (win * win - 1.0)
    vx, vy, vxy = cov * (f(x * x) - ux * ux), cov * (f(y * y) - uy * uy), cov * (f(x * y) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


class NativeMeter:
    """Accumulates native-basis PSNR / SSIM over batches of images in [-1, 1]."""

    def __init__(self, box: tuple[int, int] | None):
        self.box = box
        self.sse, self.npix, self.per_psnr, self.ssims = 0.0, 0, [], []

    @torch.no_grad()
    def update(self, x: torch.Tensor, xrec: torch.Tensor) -> None:
        a = (crop_native(x, self.box).double() + 1) / 2          # [0, 1], peak 1
        b = (crop_native(xrec, self.box).double().clamp(-1, 1) + 1) / 2
        d2 = (a - b).pow(2).flatten(1)
        self.sse += float(d2.sum())
        self.npix += d2.numel()
        self.per_psnr += [10 * math.log10(1.0 / max(float(m), 1e-20)) for m in d2.mean(1)]
        self.ssims.append(ssim_skimage(a, b, data_range=1.0).cpu())

    def result(self) -> dict:
        n = len(self.per_psnr)
        basis = "full image" if self.box is None else f"{self.box[1]}x{self.box[1]} centre at offset {self.box[0]}"
        return {"native_basis": basis,
                "psnr_native": 10 * math.log10(1.0 / max(self.sse / max(1, self.npix), 1e-20)),
                "psnr_native_per_image": sum(self.per_psnr) / max(1, n),
                "ssim_native": float(torch.cat(self.ssims).mean()) if self.ssims else float("nan")}
