"""Reconstruction metrics (PSNR, SSIM, LPIPS, rFID, codebook usage) and a CLI for a tokenizer.

    python -m eval.reconstruction --tokenizer CKPT [--out J.json] [--config Y] [key=value ...]

Functions take images in [-1, 1], ``[B,C,H,W]``, and are reused by ``tokenizer/evaluate`` and the
end-to-end job; ``ReconMeter`` accumulates them over batches. PSNR is reported two ways: from the
dataset-mean MSE (MGVQ's convention, ``psnr``) and as the mean of per-image PSNRs (``psnr_per_image``,
higher because good images dominate the log). rFID uses the same extractors as gFID (``domain`` on
Fashion-MNIST is not comparable to published rFID).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from groupgen.config import ConfigError, load_config, to_dict
from groupgen.data import DataConfig

from .domain import DomainConfig
from .fidelity import (EvalError, Extractor, emit_json, build_extractor, extract, fid_from_features, resolve_device,
                       to_uint8_nhwc)


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise EvalError(f"reconstruction metrics need two [B,C,H,W] tensors of one shape, got "
                        f"{list(x.shape)} and {list(y.shape)}")


def per_image_mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    _check_pair(x, y)
    return (x.double() - y.double()).pow(2).flatten(1).mean(1)


def psnr_from_mse(mse: torch.Tensor | float, data_range: float = 2.0) -> torch.Tensor:
    mse = torch.as_tensor(mse, dtype=torch.float64)
    return 10 * torch.log10(data_range ** 2 / mse.clamp_min(1e-20))


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> dict[str, float]:
    """{psnr: from the mean MSE over all pixels, psnr_per_image: mean of per-image PSNRs} in dB."""
    mse = per_image_mse(x, y)
    return {"psnr": float(psnr_from_mse(mse.mean(), data_range)),
            "psnr_per_image": float(psnr_from_mse(mse, data_range).mean())}


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, win: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM [B] (Wang et al. 2004: Gaussian 11x11, sigma 1.5, K1 .01, K2 .03, valid
    filtering, mean over channels). Windows shrink (odd) for images smaller than 11 px."""
    _check_pair(x, y)
    win = min(win, x.shape[-1], x.shape[-2])
    win -= 1 - win % 2
    c = x.shape[1]
    g = _gaussian_window(win, sigma).to(x.device)
    k = (g[:, None] * g[None, :]).expand(c, 1, win, win).contiguous()
    x, y = x.double(), y.double()

    def blur(t):
        return F.conv2d(t, k, groups=c)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def load_lpips(vgg_path: str = "", log=None):
    """The tokenizer's LPIPS(VGG) module, or None (with a logged reason) when weights are missing."""
    try:
        from tokenizer.losses import LPIPS, LPIPSUnavailable
    except ImportError as e:
        if log:
            log(f"LPIPS skipped: tokenizer.losses unavailable ({e})")
        return None
    try:
        return LPIPS(vgg_path)
    except LPIPSUnavailable as e:
        if log:
            log(f"LPIPS skipped: {e}")
        return None


def codebook_usage(codes: torch.Tensor | np.ndarray, K: tuple[int, ...] | list[int]) -> dict[str, list[float]]:
    """Per group g over all positions: usage (share of the K[g] codes seen), perplexity (exp entropy
    of the code histogram, max K[g]) and entropy in bits. ``codes`` [..., G]."""
    c = torch.as_tensor(np.asarray(codes) if not isinstance(codes, torch.Tensor) else codes).long()
    if c.shape[-1] != len(K):
        raise EvalError(f"codes have {c.shape[-1]} groups, layout K has {len(K)}")
    c = c.reshape(-1, len(K))
    out = {"usage": [], "perplexity": [], "entropy_bits": []}
    for g, k in enumerate(K):
        hist = torch.bincount(c[:, g], minlength=k).double()
        if hist.numel() > k:
            raise EvalError(f"group {g}: code {int(c[:, g].max())} >= K={k}")
        p = hist / hist.sum().clamp_min(1)
        h = float(-(p[p > 0] * p[p > 0].log()).sum())
        out["usage"].append(float((hist > 0).double().mean()))
        out["perplexity"].append(math.exp(h))
        out["entropy_bits"].append(h / math.log(2))
    return out


def rfid(real: torch.Tensor, rec: torch.Tensor, extractor: Extractor, batch_size: int = 100) -> float:
    """FID between real images and their reconstructions ([-1,1] tensors) under ``extractor``."""
    fr, _ = extract(extractor, to_uint8_nhwc(real), batch_size, "rFID real")
    fx, _ = extract(extractor, to_uint8_nhwc(rec), batch_size, "rFID recon")
    return fid_from_features(fx, fr)


class ReconMeter:
    """Accumulate per-image MSE/SSIM/LPIPS over batches; ``result()`` gives the dataset numbers."""

    def __init__(self, lpips_model=None, data_range: float = 2.0):
        self.lpips_model, self.data_range = lpips_model, data_range
        self.mse, self.ssim, self.lp = [], [], []

    @torch.no_grad()
    def update(self, x: torch.Tensor, xrec: torch.Tensor) -> None:
        xrec = xrec.clamp(-1, 1)
        self.mse.append(per_image_mse(x, xrec).cpu())
        self.ssim.append(ssim(x, xrec, self.data_range).cpu())
        if self.lpips_model is not None:
            self.lp.append(self.lpips_model(x.float(), xrec.float()).double().cpu())

    def result(self) -> dict[str, float]:
        mse = torch.cat(self.mse)
        out = {"psnr": float(psnr_from_mse(mse.mean(), self.data_range)),
               "psnr_per_image": float(psnr_from_mse(mse, self.data_range).mean()),
               "ssim": float(torch.cat(self.ssim).mean()), "mse": float(mse.mean()), "images": len(mse)}
        if self.lp:
            out["lpips"] = float(torch.cat(self.lp).mean())
        return out


@dataclass
class ReconEvalConfig:
    data: DataConfig = field(default_factory=DataConfig)   # image_size/channels follow the tokenizer
    split: str = "test"
    n: int = 2000                   # images evaluated (first n of the split; 0 = all)
    batch_size: int = 100
    extractor: str = "domain"       # rFID extractor: domain | inception | none
    inception_weights: str = ""
    domain: DomainConfig = field(default_factory=DomainConfig)
    lpips: bool = True              # computed when VGG16 weights are available
    lpips_vgg_path: str = ""
    device: str = "auto"
    cache: str = ""


def evaluate_tokenizer(tok, cfg: ReconEvalConfig, log=None) -> dict:
    from groupgen.data import build_dataset, loader_batches

    t0 = time.perf_counter()
    dev = resolve_device(cfg.device)
    lay = tok.layout
    data = DataConfig(**{**to_dict(cfg.data), "image_size": lay.image_size or cfg.data.image_size,
                         "channels": lay.channels or cfg.data.channels, "limit": cfg.n})
    ds = build_dataset(data, cfg.split)
    meter = ReconMeter(load_lpips(cfg.lpips_vgg_path, log) if cfg.lpips else None)
    reals, recs, codes = [], [], []
    with torch.no_grad():
        for x, _ in loader_batches(ds, range(len(ds)), cfg.batch_size):
            x = x.to(dev)
            c = tok.encode(x)
            xr = tok.decode_codes(c).float().clamp(-1, 1)
            meter.update(x, xr)
            codes.append(c.cpu())
            if cfg.extractor != "none":
                reals.append(x.cpu())
                recs.append(xr.cpu())
    out = {**meter.result(), **codebook_usage(torch.cat(codes), lay.K), "layout": lay.describe()}
    if cfg.extractor != "none":
        ext = build_extractor(cfg.extractor, dev, cfg.inception_weights, cfg.domain, cfg.cache)
        out["rfid"] = rfid(torch.cat(reals), torch.cat(recs), ext, cfg.batch_size)
        out["rfid_extractor"] = ext.name
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m eval.reconstruction", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, help="tokenizer checkpoint (dir, root or run dir)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--config", default=None)
    ap.add_argument("overrides", nargs="*", help="key=value (ReconEvalConfig keys)")
    args = ap.parse_args(argv)
    from groupgen.runs import set_threads
    from tokenizer.model import load_tokenizer

    set_threads()
    try:
        cfg = load_config(ReconEvalConfig, args.config, args.overrides)
        tok = load_tokenizer(args.tokenizer, resolve_device(cfg.device))
        out = {"tokenizer": str(args.tokenizer),
               **evaluate_tokenizer(tok, cfg, lambda m: print(m, file=sys.stderr))}
    except (EvalError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    emit_json(out, args.out)
    return out


if __name__ == "__main__":
    main()
