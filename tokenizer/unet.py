"""QG-VAE's U-Net pair: images <-> C global tokens.

Encoder U-Net (image + Fourier (x, y) features in) maps to ``C`` channels at ``H/2^f``; the
``[B, C, H'W']`` map is read channel-wise, so each of the ``C`` channels becomes one token whose
``H'W'`` values are its features; kernel-1 Conv1d projections (``heads`` of them, each owning
``C/heads`` tokens) map ``H'W' -> D``. The decoder mirrors this. Residual blocks (GroupNorm + SiLU +
3x3 convs, 1x1 skip), bilinear resampling, no attention, channels kept <= 128.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .conv import Conv1d, Conv2d
from .vqgan import ResBlock, norm, swish


def fourier_features(h: int, w: int, freqs: int, device, dtype=torch.float32) -> torch.Tensor:
    """[1, 4*freqs, h, w]: sin/cos of 2^k * pi * (x, y) with x, y in [-1, 1] (pixel centres)."""
    if freqs <= 0:
        return torch.zeros(1, 0, h, w, device=device, dtype=dtype)
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 - 1
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    scales = (2.0 ** torch.arange(freqs, device=device, dtype=torch.float32)) * math.pi
    feats = []
    for c in (xx, yy):
        arg = c[None] * scales[:, None, None]
        feats += [arg.sin(), arg.cos()]
    return torch.cat(feats, 0)[None].to(dtype)


class UNet(nn.Module):
    """Goes from absolute level ``lin`` down to ``lbottom`` and back up to ``lout`` (level l has
    resolution res/2^l and ``chs[l]`` channels), concatenating skips where the down path had them."""

    def __init__(self, in_ch: int, out_ch: int, chs: list[int], lin: int, lbottom: int, lout: int,
                 blocks: int = 1, freqs: int = 4):
        super().__init__()
        if not (lbottom >= lin and lbottom >= lout and len(chs) > lbottom):
            raise ValueError(f"UNet levels in={lin} bottom={lbottom} out={lout} need {lbottom + 1} channel "
                             f"entries, got chs={chs}")
        self.lin, self.lbottom, self.lout, self.freqs = lin, lbottom, lout, freqs
        self.conv_in = Conv2d(in_ch + 4 * freqs, chs[lin], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.down_change = nn.ModuleList()
        for lv in range(lin, lbottom):
            self.down_blocks.append(nn.Sequential(*[ResBlock(chs[lv], chs[lv]) for _ in range(blocks)]))
            self.down_change.append(ResBlock(chs[lv], chs[lv + 1]))
        self.mid = nn.Sequential(*[ResBlock(chs[lbottom], chs[lbottom]) for _ in range(blocks)])
        self.up_change = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for lv in range(lbottom - 1, lout - 1, -1):
            skip = chs[lv] if lv >= lin else 0
            self.up_change.append(ResBlock(chs[lv + 1] + skip, chs[lv]))
            self.up_blocks.append(nn.Sequential(*[ResBlock(chs[lv], chs[lv]) for _ in range(blocks)]))
        self.norm_out = norm(chs[lout])
        self.conv_out = Conv2d(chs[lout], out_ch, 3, padding=1)

    def forward(self, x):
        ff = fourier_features(x.shape[-2], x.shape[-1], self.freqs, x.device, x.dtype).expand(x.shape[0], -1, -1, -1)
        h = self.conv_in(torch.cat([x, ff], 1))
        skips = {}
        for i, lv in enumerate(range(self.lin, self.lbottom)):
            h = self.down_blocks[i](h)
            skips[lv] = h
            h = self.down_change[i](F.interpolate(h, scale_factor=0.5, mode="bilinear", align_corners=False))
        h = self.mid(h)
        for i, lv in enumerate(range(self.lbottom - 1, self.lout - 1, -1)):
            h = F.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=False)
            if lv in skips:
                h = torch.cat([h, skips[lv]], 1)
            h = self.up_blocks[i](self.up_change[i](h))
        return self.conv_out(swish(self.norm_out(h)))


class HeadProjection(nn.Module):
    """``heads`` kernel-1 Conv1d(fin -> fout), head i owning tokens [i*C/heads, (i+1)*C/heads)."""

    def __init__(self, tokens: int, heads: int, fin: int, fout: int):
        super().__init__()
        if tokens % heads:
            raise ValueError(f"QG-VAE: tokens ({tokens}) must be divisible by heads ({heads})")
        self.heads = heads
        self.proj = nn.ModuleList(Conv1d(fin, fout, 1) for _ in range(heads))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # [B, C, fin] -> [B, C, fout]
        parts = t.transpose(1, 2).chunk(self.heads, dim=2)  # each [B, fin, C/heads]
        return torch.cat([p(x) for p, x in zip(self.proj, parts)], 2).transpose(1, 2)


class QGVAENet(nn.Module):
    """Images [B, ch, H, W] <-> token latents [B, C, D]."""

    def __init__(self, image_size: int, channels: int, tokens: int, down: int, dim: int, heads: int,
                 chs: list[int], blocks: int = 1, freqs: int = 4):
        super().__init__()
        if image_size % (2 ** (down + 1)):
            raise ValueError(f"QG-VAE: image_size {image_size} must be divisible by 2^(down+1) = {2 ** (down + 1)}")
        if len(chs) < down + 2:
            raise ValueError(f"QG-VAE: unet_ch needs {down + 2} entries for down={down}, got {chs}")
        if max(chs) > 128:
            raise ValueError(f"QG-VAE: U-Net channels are kept <= 128, got {chs}")
        self.tokens, self.side = tokens, image_size // 2 ** down
        feat = self.side * self.side
        self.encoder = UNet(channels, tokens, chs, 0, down + 1, down, blocks, freqs)
        self.proj_in = HeadProjection(tokens, heads, feat, dim)
        self.proj_out = HeadProjection(tokens, heads, dim, feat)
        self.decoder = UNet(tokens, channels, chs, down, down + 1, 0, blocks, freqs)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)                       # [B, C, H', W']
        return self.proj_in(h.flatten(2))         # each channel a token: [B, C, H'W'] -> [B, C, D]

    def decoder_modules(self) -> list[nn.Module]:
        return [self.proj_out, self.decoder]

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        h = self.proj_out(z)                      # [B, C, H'W']
        return self.decoder(h.reshape(h.shape[0], self.tokens, self.side, self.side))
