"""The Tokenizer: encoder -> quantizer -> decoder behind the API every later stage uses.

    tok = load_tokenizer(path, device="cpu")   # eval mode
    codes = tok.encode(x)                       # [B,C,H,W] in [-1,1] -> LongTensor [B,L,G]
    x = tok.decode_codes(codes)                 # -> [B,C,H,W]
    xrec, codes, losses = tok(x)                # training forward (losses from the quantizer)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from groupgen.checkpoint import CheckpointError, load_meta, load_tensors, resolve_checkpoint
from groupgen.config import ConfigError, from_dict
from groupgen.layout import TokenLayout

from .conv import Conv2d
from .quantize import QuantizerConfig, build_quantizer
from .unet import QGVAENet
from .vqgan import Decoder, Encoder


@dataclass
class ModelConfig:
    arch: str = "vqgan"                 # vqgan (conv VQGAN / MGVQ / PQ) | qgvae (U-Net, global tokens)
    image_size: int = 32
    channels: int = 1
    # vqgan
    ch: int = 32
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2])   # f = 2^(len-1)
    num_res_blocks: int = 1             # decoder uses num_res_blocks + 1 (LlamaGen)
    attn: bool = True                   # attention at the lowest resolution and in the mid block
    z_channels: int = 32                # encoder output channels
    embed_dim: int = 32                 # quantizer dim D (1x1 quant_conv z_channels -> D)
    grouped_quant_conv: bool = True     # groups = G for multi-group quantizers (MGVQ group isolation)
    dropout: float = 0.0
    # qgvae
    tokens: int = 64                    # C: tokens = encoder output channels
    down: int = 2                       # f: token features = (H/2^f)^2
    heads: int = 8                      # Conv1d projection heads, each owning tokens/heads tokens
    unet_ch: list[int] = field(default_factory=lambda: [32, 64, 128, 128])
    unet_blocks: int = 1
    fourier_freqs: int = 4

    def validate(self):
        if self.arch not in ("vqgan", "qgvae"):
            raise ConfigError(f"model.arch must be 'vqgan' or 'qgvae', got {self.arch!r}")
        if self.arch == "vqgan":
            f = 2 ** (len(self.ch_mult) - 1)
            if self.image_size % f:
                raise ConfigError(f"model.image_size {self.image_size} is not divisible by the downsampling "
                                  f"factor {f} of ch_mult {self.ch_mult}")
        else:
            if self.tokens % self.heads:
                raise ConfigError(f"model.tokens ({self.tokens}) must be divisible by model.heads ({self.heads})")
            if self.image_size % 2 ** (self.down + 1):
                raise ConfigError(f"model.image_size {self.image_size} must be divisible by 2^(down+1)")

    @property
    def factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1) if self.arch == "vqgan" else 2 ** self.down


class VQGANNet(nn.Module):
    """Conv encoder/decoder with 1x1 (optionally grouped) convs to and from the quantizer dim."""

    def __init__(self, cfg: ModelConfig, groups: int):
        super().__init__()
        for name in ("z_channels", "embed_dim"):
            if getattr(cfg, name) % groups:
                raise ConfigError(f"model.{name}={getattr(cfg, name)} is not divisible by the quantizer's G={groups} "
                                  f"groups (needed for grouped quant_conv); choose a multiple of {groups} or set "
                                  f"model.grouped_quant_conv=false")
        self.encoder = Encoder(cfg.channels, cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels, cfg.attn,
                               cfg.dropout)
        # grouped 1x1 convs keep the G sub-latents isolated between encoder and decoder (MGVQ)
        self.quant_conv = Conv2d(cfg.z_channels, cfg.embed_dim, 1, groups=groups)
        self.post_quant_conv = Conv2d(cfg.embed_dim, cfg.z_channels, 1, groups=groups)
        self.decoder = Decoder(cfg.channels, cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels, cfg.attn,
                               cfg.dropout)
        self.side = cfg.image_size // cfg.factor

    @property
    def last_layer(self) -> torch.Tensor:
        return self.decoder.last_layer

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Encoder features [B, z_channels, h, w] -> quantizer input [B, L, D] (raster order)."""
        return self.quant_conv(h).flatten(2).transpose(1, 2)

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.encoder(x))

    def decoder_modules(self) -> list[nn.Module]:
        return [self.post_quant_conv, self.decoder]

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        b, L, d = z.shape
        z = z.transpose(1, 2).reshape(b, d, self.side, self.side)
        return self.decoder(self.post_quant_conv(z))


def _split_groups(qcfg) -> int:
    """How many isolated sub-latents the quantizer splits D into (multigroup: G; others: 1). A
    residual quantizer also has G > 1 in its layout, but every depth sees the whole latent."""
    return qcfg.groups if qcfg.kind == "multigroup" else 1


class Tokenizer(nn.Module):
    def __init__(self, cfg: ModelConfig, qcfg: QuantizerConfig):
        super().__init__()
        cfg.validate()
        self.cfg, self.qcfg = cfg, qcfg
        if cfg.arch == "vqgan":
            g = _split_groups(qcfg)
            if cfg.embed_dim % g:
                raise ConfigError(f"model.embed_dim={cfg.embed_dim} (the latent split into groups) is not "
                                  f"divisible by quantizer.groups G={g}")
            self.quantizer = build_quantizer(qcfg, cfg.embed_dim)
            self.net = VQGANNet(cfg, g if cfg.grouped_quant_conv else 1)
            side = cfg.image_size // cfg.factor
            kind, L, h, w = "grid", side * side, side, side
        else:
            if qcfg.kind != "pertoken":
                raise ConfigError(f"model.arch 'qgvae' needs quantizer.kind 'pertoken', got {qcfg.kind!r}")
            if qcfg.num_tokens != cfg.tokens:
                raise ConfigError(f"quantizer.num_tokens={qcfg.num_tokens} != model.tokens={cfg.tokens} (the sequence "
                                  f"length C; set them equal)")
            self.quantizer = build_quantizer(qcfg, cfg.embed_dim)
            self.net = QGVAENet(cfg.image_size, cfg.channels, cfg.tokens, cfg.down, cfg.embed_dim, cfg.heads,
                                cfg.unet_ch, cfg.unet_blocks, cfg.fourier_freqs)
            kind, L, h, w = "seq", cfg.tokens, 0, 0
        self.layout = TokenLayout(kind=kind, L=L, K=tuple(self.quantizer.layout_K()), h=h, w=w,
                                  per_position_codebook=bool(getattr(self.quantizer, "per_position_codebook",
                                                                     False)),
                                  image_size=cfg.image_size, channels=cfg.channels)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight (VQGAN adaptive GAN weight)."""
        return self.net.last_layer

    def decoder_parameters(self) -> list[nn.Parameter]:
        """What maps quantized latents to pixels (not the codebooks): all that trains under
        ``train.decoder_only_after``."""
        return [p for m in self.net.decoder_modules() for p in m.parameters()]

    def _check_input(self, x: torch.Tensor) -> None:
        want = (self.cfg.channels, self.cfg.image_size, self.cfg.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"tokenizer expects images [B, {want[0]}, {want[1]}, {want[2]}], got {list(x.shape)}")

    def forward(self, x: torch.Tensor):
        self._check_input(x)
        z = self.net.encode_latent(x)
        z_q, codes, losses = self.quantizer.quantize(z)
        return self.net.decode_latent(z_q), codes, losses

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        _, codes, _ = self.quantizer.quantize(self.net.encode_latent(x))
        return codes.long()

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        self.layout.check_codes(codes)
        return self.net.decode_latent(self.quantizer.decode_codes(codes.long()))


def build_tokenizer(model_cfg, quantizer_cfg: QuantizerConfig | None = None) -> Tokenizer:
    """``build_tokenizer(train_cfg)`` (anything with .model and .quantizer) or ``(model_cfg, quantizer_cfg)``."""
    if quantizer_cfg is None:
        if not (hasattr(model_cfg, "model") and hasattr(model_cfg, "quantizer")):
            raise ConfigError("build_tokenizer needs (model_cfg, quantizer_cfg) or a config with .model and .quantizer")
        model_cfg, quantizer_cfg = model_cfg.model, model_cfg.quantizer
    return Tokenizer(model_cfg, quantizer_cfg)


def tokenizer_from_meta(meta: dict) -> Tokenizer:
    cfg = meta.get("config") or {}
    if "model" not in cfg or "quantizer" not in cfg:
        raise CheckpointError("tokenizer checkpoint meta.json: config lacks the 'model'/'quantizer' sections")
    return Tokenizer(from_dict(ModelConfig, cfg["model"]), from_dict(QuantizerConfig, cfg["quantizer"]))


def load_tokenizer(path, device="cpu") -> Tokenizer:
    """Rebuild a tokenizer from a checkpoint (dir, checkpoint root or run dir); eval mode."""
    ck = resolve_checkpoint(path)
    meta = load_meta(ck)
    if meta.get("kind") != "tokenizer":
        raise CheckpointError(f"{ck}: meta kind is {meta.get('kind')!r}, expected 'tokenizer'")
    tok = tokenizer_from_meta(meta)
    sd = load_tensors(ck, "model")
    missing, unexpected = tok.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ck}/model.safetensors does not match the model built from its config: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    if "layout" in meta:
        TokenLayout.from_dict(meta["layout"]).check_same(tok.layout, "checkpoint", "rebuilt model")
    tok.checkpoint_path = str(ck)
    return tok.to(device).eval()
