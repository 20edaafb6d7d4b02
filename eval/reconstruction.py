"""Reconstruction metrics (PSNR, SSIM, LPIPS, rFID, codebook usage) and a CLI for a tokenizer.

    python -m eval.reconstruction --tokenizer CKPT [--out J.json] [--config Y] [key=value ...]
    python -m tokenizer.evaluate --ckpt CKPT [...]      (the same command under its stage-1 name)

The one owner of tokenizer evaluation: the main job, the layout comparison and the benchmarks call
``evaluate_tokenizer``; stage 1 (``tokenizer/``) never imports ``eval`` (this module imports the
tokenizer, not the other way round). Functions take images in [-1, 1], ``[B,C,H,W]``;
``ReconMeter`` accumulates them over batches. The CLI evaluates on the tokenizer's own training data
(its checkpoint's ``config.data``; ``data={...}`` overrides keys of it). PSNR is reported two ways:
from the dataset-mean MSE (MGVQ's convention, ``psnr``) and as the mean of per-image PSNRs
(``psnr_per_image``, higher because good images dominate the log). rFID uses the same extractors as gFID (``domain`` on
Fashion-MNIST is not comparable to published rFID).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from groupgen.config import ConfigError, from_dict, load_config, to_dict
from groupgen.data import DataConfig

from .domain import DomainConfig
from .native_metrics import NativeMeter, native_box
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


def ssim(x: torch.Tensor, y: torch.Tensor, win: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM [B] of images in [-1, 1] (Wang et al. 2004: Gaussian 11x11, sigma 1.5, K1 .01,
    K2 .03, valid filtering, mean over channels), computed on [0, 1] with data range 1.

    The shift to [0, 1] matters: SSIM's luminance term (2 mx my + c1) / (mx^2 + my^2 + c1) is not
    shift-invariant, and on [-1, 1] it turns negative where the local means straddle 0. The window
    shrinks to the image for images smaller than 11 px.
    """
    _check_pair(x, y)
    win = min(win, x.shape[-1], x.shape[-2])
    c = x.shape[1]
    g = _gaussian_window(win, sigma).to(x.device)
    k = (g[:, None] * g[None, :]).expand(c, 1, win, win).contiguous()
    x, y = (x.double() + 1) / 2, (y.double() + 1) / 2

    def blur(t):
        return F.conv2d(t, k, groups=c)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2   # (K * data_range)^2 with data_range 1
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


def codebook_usage(codes: torch.Tensor | np.ndarray, K: tuple[int, ...] | list[int],
                   per_position: bool = False) -> dict[str, list[float]]:
    """Per group g: usage (share of the K[g] codes seen), perplexity (exp entropy of the code
    histogram, max K[g]) and entropy in bits. ``codes`` [..., G], or [N, L, G] with ``per_position``.

    A shared codebook is counted over all positions. With ``per_position`` (QG-VAE: one codebook per
    position) code i at two positions are different vectors, so pooling would count a collapsed model
    that emits one code per position as full usage: each position's codebook is counted on its own
    and the numbers are means over positions.
    """
    c = torch.as_tensor(np.asarray(codes) if not isinstance(codes, torch.Tensor) else codes).long()
    if c.shape[-1] != len(K):
        raise EvalError(f"codes have {c.shape[-1]} groups, layout K has {len(K)}")
    if per_position and c.dim() != 3:
        raise EvalError(f"per-position codebook usage needs codes [N, L, G], got shape {list(c.shape)}")
    c = c if per_position else c.reshape(-1, 1, len(K))   # [N, slots, G]: slots = positions or one pool
    slots = c.shape[1]
    out = {"usage": [], "perplexity": [], "entropy_bits": []}
    for g, k in enumerate(K):
        cg = c[:, :, g]
        if cg.numel() and (cg.min() < 0 or cg.max() >= k):
            raise EvalError(f"group {g}: codes must lie in [0, K={k}), got [{int(cg.min())}, {int(cg.max())}]")
        flat = (cg + torch.arange(slots)[None, :] * k).flatten()
        hist = torch.bincount(flat, minlength=slots * k).double().view(slots, k)
        p = hist / hist.sum(1, keepdim=True).clamp_min(1)
        h = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(1)   # nats, per slot
        out["usage"].append(float((hist > 0).double().mean(1).mean()))
        out["perplexity"].append(float(h.exp().mean()))
        out["entropy_bits"].append(float(h.mean() / math.log(2)))
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
        self.ssim.append(ssim(x, xrec).cpu())
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
    # Overrides of the tokenizer's own training-data config (read from its checkpoint), e.g.
    # data={root: /other/imagenet}; image_size/channels always follow the tokenizer's layout.
    data: dict = field(default_factory=dict)
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

    def validate(self):
        valid = [f.name for f in dataclasses.fields(DataConfig)]
        bad = [k for k in self.data if k not in valid]
        if bad:
            raise ConfigError(f"data: unknown keys {bad} (overrides of the tokenizer's training data "
                              f"config); valid keys: {valid}")
        if self.extractor not in ("domain", "inception", "none"):
            raise ConfigError(f"extractor must be domain, inception or none, got {self.extractor!r}")


def eval_data_config(tok, cfg: ReconEvalConfig, train_data: dict | None = None) -> DataConfig:
    """The data ``tok`` was trained on (its checkpoint's ``config.data``, or ``train_data``), with
    ``cfg.data`` on top, the layout's image size / channels, and ``limit = cfg.n``.

    Starting from the checkpoint rather than a default keeps a tokenizer trained on one dataset from
    being scored silently on another."""
    if train_data is None:
        ck = getattr(tok, "checkpoint_path", None)
        if ck is None:
            raise EvalError("the tokenizer has no checkpoint_path, so its training data is unknown: "
                            "load it with tokenizer.model.load_tokenizer or pass train_data=")
        from groupgen.checkpoint import load_meta

        train_data = (load_meta(ck).get("config") or {}).get("data")
        if not isinstance(train_data, dict):
            raise EvalError(f"{ck}/meta.json: no config.data (the tokenizer's training data config)")
    lay = tok.layout
    merged = {**train_data, **cfg.data, "limit": cfg.n}
    merged["image_size"] = lay.image_size or merged.get("image_size", DataConfig.image_size)
    merged["channels"] = lay.channels or merged.get("channels", DataConfig.channels)
    try:
        return from_dict(DataConfig, merged)
    except ConfigError as e:
        raise EvalError(f"tokenizer data config: {e}") from None


def check_domain_data(data: DataConfig, domain: DomainConfig) -> None:
    """The domain classifier only means something on the dataset it was trained on."""
    if data.name != domain.dataset:
        raise EvalError(f"extractor=domain: the domain classifier is trained on {domain.dataset!r} "
                        f"(domain.dataset) but the tokenizer is evaluated on {data.name!r} (data.name); "
                        f"set domain.dataset={data.name} (fmnist | digits) or use extractor=inception / none")


def evaluate_tokenizer(tok, cfg: ReconEvalConfig, log=None, train_data: dict | None = None) -> dict:
    """Reconstruction metrics of ``tok`` on ``cfg.split`` of its own training data (see
    ``eval_data_config``); a JSON-ready dict."""
    from groupgen.data import build_dataset, loader_batches

    t0 = time.perf_counter()
    dev = resolve_device(cfg.device)
    lay = tok.layout
    data = eval_data_config(tok, cfg, train_data)
    if cfg.extractor == "domain":   # before the encode loop, not after it
        check_domain_data(data, cfg.domain)
    ds = build_dataset(data, cfg.split)
    meter = ReconMeter(load_lpips(cfg.lpips_vgg_path, log) if cfg.lpips else None)
    native = NativeMeter(native_box(data))   # the dataset's own basis too (Fashion-MNIST: the 28x28 centre)
    ext = build_extractor(cfg.extractor, dev, cfg.inception_weights, cfg.domain, cfg.cache) \
        if cfg.extractor != "none" else None
    # features per batch, not images: 50k ImageNet images held in fp32 until the end were 78 GB
    codes, f_real, f_rec = [], [], []
    with torch.no_grad():
        for x, _ in loader_batches(ds, range(len(ds)), cfg.batch_size):
            x = x.to(dev)
            c = tok.encode(x)
            xr = tok.decode_codes(c).float().clamp(-1, 1)
            meter.update(x, xr)
            native.update(x, xr)
            codes.append(c.cpu())
            if ext is not None:
                for imgs, feats in ((x, f_real), (xr, f_rec)):
                    feats.append(ext(torch.from_numpy(to_uint8_nhwc(imgs)).permute(0, 3, 1, 2))[0].float().cpu())
    usage = codebook_usage(torch.cat(codes), lay.K, lay.per_position_codebook)
    out = {**meter.result(), **native.result(), **usage, "usage_mean": float(np.mean(usage["usage"])),
           "perplexity_mean": float(np.mean(usage["perplexity"])), "layout": lay.describe(),
           "data": to_dict(data), "split": cfg.split}
    if ext is not None:
        out["rfid"] = fid_from_features(torch.cat(f_rec), torch.cat(f_real))
        out["rfid_extractor"] = ext.name
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m eval.reconstruction", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", "--ckpt", dest="tokenizer", required=True,
                    help="tokenizer checkpoint (dir, root or run dir)")
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
