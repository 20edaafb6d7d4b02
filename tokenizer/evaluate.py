"""Reconstruction metrics of a trained tokenizer on a dataset split.

    python -m tokenizer.evaluate --ckpt RUN_OR_CKPT [split=test max_images=2000 batch_size=64 ...]

PSNR twice: ``psnr`` from the dataset-mean MSE (as MGVQ reports it) and ``psnr_per_image`` (mean of
per-image PSNRs); SSIM (Gaussian window 11, sigma 1.5, on [0,1] images); LPIPS (VGG) when weights are
available offline, else skipped with a note; rFID through the eval package (``eval.reconstruction.rfid``)
when it is importable and ``rfid=true``; codebook usage / perplexity per group from the codes; and
the same on the dataset's native basis (``psnr_native``, ``psnr_native_per_image``, ``ssim_native``:
Fashion-MNIST's 28x28 centre, skimage's SSIM; ``tokenizer.native_metrics``).
Prints JSON and writes it to ``out`` (default: <checkpoint dir>/eval_<split>.json).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from groupgen.config import from_dict, load_config
from groupgen.data import DataConfig, build_dataset
from groupgen.runs import default_device, progress, set_threads

from .losses import LPIPS, lpips_weights_available
from .model import load_tokenizer
from .native_metrics import NativeMeter, native_box
from .train import get_batch, parse_cli, psnr_from_mse

DOMAIN_DATASETS = ("fmnist", "digits")   # the datasets eval.domain has a classifier for


@dataclass
class EvalConfig:
    split: str = "test"
    max_images: int = 0            # 0 = the whole split
    batch_size: int = 64
    lpips: bool = True             # computed when weights are available (never downloaded)
    lpips_vgg_path: str = ""
    rfid: bool = False             # needs the eval package (eval.fidelity / eval.reconstruction)
    rfid_extractor: str = "inception"   # inception | domain (see eval.fidelity.build_extractor)
    inception_weights: str = ""    # path to Inception weights (nothing is downloaded)
    device: str = "auto"
    threads: int = 0
    out: str = ""                  # JSON path; "" = <checkpoint>/eval_<split>.json
    data: dict = field(default_factory=dict)   # overrides of the training data config (e.g. data.limit)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-g * g / (2 * sigma * sigma))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def ssim(x: torch.Tensor, y: torch.Tensor, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM [B] of images in [0, 1] (Wang et al. 2004: K1 0.01, K2 0.03, valid windows,
    averaged over channels). The window shrinks to the image for images smaller than 11 px."""
    x, y = x.double(), y.double()
    size = min(size, x.shape[-1], x.shape[-2])
    c = x.shape[1]
    w = _gaussian_window(size, sigma).double().to(x.device)[None, None].expand(c, 1, -1, -1)
    f = lambda t: F.conv2d(t, w, groups=c)  # noqa: E731
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return m.mean(dim=(1, 2, 3)).float()


def code_usage(codes: torch.Tensor, K: tuple[int, ...], per_position: bool) -> dict:
    """Usage (fraction of codes used) and perplexity per group from all codes [N, L, G]; for
    per-position codebooks the numbers are means over positions."""
    out = {}
    for g, k in enumerate(K):
        cols = [codes[:, l, g] for l in range(codes.shape[1])] if per_position else [codes[:, :, g].reshape(-1)]
        us, ps = [], []
        for c in cols:
            cnt = torch.bincount(c, minlength=k).double()
            p = cnt / cnt.sum()
            nz = p[p > 0]
            us.append(float((cnt > 0).double().mean()))
            ps.append(math.exp(float(-(nz * nz.log()).sum())))
        out[f"usage/g{g}"], out[f"perplexity/g{g}"] = float(np.mean(us)), float(np.mean(ps))
    out["usage"] = float(np.mean([out[f"usage/g{g}"] for g in range(len(K))]))
    out["perplexity"] = float(np.mean([out[f"perplexity/g{g}"] for g in range(len(K))]))
    return out


def _rfid(real: list[torch.Tensor], fake: list[torch.Tensor], cfg: "EvalConfig", device,
          dataset: str) -> tuple[float | None, str]:
    """rFID via the eval package (imported lazily: stage 1 does not depend on it). The domain
    extractor is the classifier trained on ``dataset`` (the images' own), which exists for the
    small datasets only."""
    try:
        from eval.domain import DomainConfig
        from eval.fidelity import build_extractor
        from eval.reconstruction import rfid
    except Exception as e:  # noqa: BLE001
        return None, f"rFID skipped: eval package not importable ({type(e).__name__}: {e})"
    domain = None
    if cfg.rfid_extractor == "domain":
        if dataset not in DOMAIN_DATASETS:
            return None, (f"rFID skipped: a domain classifier exists for {list(DOMAIN_DATASETS)} only, the data "
                          f"is {dataset!r}; use rfid_extractor=inception")
        domain = DomainConfig(dataset=dataset)
    try:
        with torch.enable_grad():  # a domain extractor may train its classifier on first use
            ext = build_extractor(cfg.rfid_extractor, device, cfg.inception_weights, domain)
        return float(rfid(torch.cat(real), torch.cat(fake), ext, cfg.batch_size)), ""
    except Exception as e:  # noqa: BLE001  (e.g. no Inception weights offline)
        return None, f"rFID skipped: {type(e).__name__}: {e}"


@torch.no_grad()
def evaluate(ckpt: str | Path, cfg: EvalConfig | None = None) -> dict:
    cfg = cfg or EvalConfig()
    set_threads(cfg.threads or None)
    device = default_device() if cfg.device == "auto" else torch.device(cfg.device)
    tok = load_tokenizer(ckpt, device)
    from groupgen.checkpoint import load_meta
    train_cfg = load_meta(ckpt)["config"]
    data_cfg = from_dict(DataConfig, {**train_cfg["data"], **cfg.data})
    ds = build_dataset(data_cfg, cfg.split, train=False)
    n = min(len(ds), cfg.max_images) if cfg.max_images else len(ds)
    notes = []
    lp = None
    if cfg.lpips:
        if lpips_weights_available(cfg.lpips_vgg_path):
            lp = LPIPS(cfg.lpips_vgg_path).to(device)
        else:
            notes.append("LPIPS skipped: no VGG16 weights offline (put vgg16-397923af.pth in the torch hub "
                         "cache or pass lpips_vgg_path=...)")
    sse, npix, per_psnr, ssims, lps, all_codes, real, fake = 0.0, 0, [], [], [], [], [], []
    native = NativeMeter(native_box(data_cfg))
    for a in progress(range(0, n, cfg.batch_size), desc="evaluate"):
        x = get_batch(ds, range(a, min(n, a + cfg.batch_size))).to(device)
        codes = tok.encode(x)
        xr = tok.decode_codes(codes).float().clamp(-1, 1)
        d2 = (xr - x).pow(2).flatten(1)
        sse += float(d2.sum())
        npix += d2.numel()
        per_psnr += [psnr_from_mse(float(m)) for m in d2.mean(1)]
        ssims.append(ssim((x + 1) / 2, (xr + 1) / 2).cpu())
        native.update(x, xr)
        if lp is not None:
            lps.append(lp(x, xr).cpu())
        all_codes.append(codes.cpu())
        if cfg.rfid:
            real.append(x.cpu())
            fake.append(xr.cpu())
    codes = torch.cat(all_codes)
    res = {"checkpoint": str(getattr(tok, "checkpoint_path", ckpt)), "split": cfg.split, "images": n,
           "layout": tok.layout.describe(),
           "psnr": psnr_from_mse(sse / max(1, npix)), "psnr_per_image": float(np.mean(per_psnr)),
           "ssim": float(torch.cat(ssims).mean()),
           "lpips": float(torch.cat(lps).mean()) if lps else None,
           **native.result(), **code_usage(codes, tok.layout.K, tok.layout.per_position_codebook)}
    if cfg.rfid:
        res["rfid"], note = _rfid(real, fake, cfg, device, data_cfg.name)
        if note:
            notes.append(note)
    res["notes"] = notes
    out = Path(cfg.out) if cfg.out else Path(res["checkpoint"]) / f"eval_{cfg.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    res["json"] = str(out)
    return res


def main():
    args = parse_cli("Evaluate a tokenizer's reconstructions",
                     lambda ap: ap.add_argument("--ckpt", required=True, help="checkpoint, checkpoint root or run dir"))
    cfg = load_config(EvalConfig, args.config, args.overrides)
    print(json.dumps(evaluate(args.ckpt, cfg), indent=1))


if __name__ == "__main__":
    main()
