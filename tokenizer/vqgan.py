"""VQGAN conv encoder/decoder (taming / LlamaGen layout).

Encoder: conv_in -> per level ``num_res_blocks`` res blocks (+ attention at the lowest level) and a
stride-2 downsample between levels -> mid (res, attn, res) -> GroupNorm, swish, conv to z_channels.
Decoder mirrors it with ``num_res_blocks + 1`` blocks per level (as LlamaGen) and nearest upsampling.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .conv import Conv2d


def norm(ch: int) -> nn.GroupNorm:
    # 32 groups as in taming/LlamaGen (ch >= 128); tiny CPU models keep >= 4 channels per group
    g = min(32, max(1, ch // 4))
    while ch % g:
        g -= 1
    return nn.GroupNorm(g, ch, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = norm(cout), Conv2d(cout, cout, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.drop(swish(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the spatial positions (SDPA)."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = norm(ch)
        self.qkv = Conv2d(ch, 3 * ch, 1)
        self.proj = Conv2d(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        o = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(o.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad as taming: exact /2


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, in_channels: int, ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int,
                 attn: bool = True, dropout: float = 0.0):
        super().__init__()
        self.conv_in = Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch
        n = len(ch_mult)
        for i, m in enumerate(ch_mult):
            level = nn.Module()
            level.blocks = nn.ModuleList()
            level.attns = nn.ModuleList()
            cout = ch * m
            for _ in range(num_res_blocks):
                level.blocks.append(ResBlock(cin, cout, dropout))
                level.attns.append(AttnBlock(cout) if attn and i == n - 1 else nn.Identity())
                cin = cout
            level.downsample = Downsample(cin) if i < n - 1 else nn.Identity()
            self.down.append(level)
        self.mid = nn.Sequential(ResBlock(cin, cin, dropout), AttnBlock(cin) if attn else nn.Identity(),
                                 ResBlock(cin, cin, dropout))
        self.norm_out = norm(cin)
        self.conv_out = Conv2d(cin, z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(h))
            h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, out_channels: int, ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int,
                 attn: bool = True, dropout: float = 0.0):
        super().__init__()
        n = len(ch_mult)
        cin = ch * ch_mult[-1]
        self.conv_in = Conv2d(z_channels, cin, 3, padding=1)
        self.mid = nn.Sequential(ResBlock(cin, cin, dropout), AttnBlock(cin) if attn else nn.Identity(),
                                 ResBlock(cin, cin, dropout))
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(ch_mult))):
            level = nn.Module()
            level.blocks = nn.ModuleList()
            level.attns = nn.ModuleList()
            cout = ch * m
            for _ in range(num_res_blocks + 1):
                level.blocks.append(ResBlock(cin, cout, dropout))
                level.attns.append(AttnBlock(cout) if attn and i == n - 1 else nn.Identity())
                cin = cout
            level.upsample = Upsample(cin) if i > 0 else nn.Identity()
            self.up.append(level)
        self.norm_out = norm(cin)
        self.conv_out = Conv2d(cin, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.conv_out.weight

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in self.up:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(h))
            h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))
