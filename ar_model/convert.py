"""Convert released LlamaGen / MGVQ checkpoints into groupgen checkpoints (one-time, offline).

    python -m ar_model.convert --from llamagen-gpt --src c2i_L_256.pt --out ckpt/llamagen_L [key=value ...]
    python -m ar_model.convert --from llamagen-vq  --src vq_ds16_c2i.pt --out ckpt/vq16
    python -m ar_model.convert --from mgvq         --src mgvq_f16c32_g4.pt --out ckpt/mgvq   # explains the gap

Sources are pickles, read only with ``torch.load(weights_only=True)`` (see ``tokenizer.convert``);
wrappers ``{"model": ...}`` (LlamaGen/DDP), ``{"module": ...}`` (DeepSpeed), ``{"state_dict": ...}``,
FSDP ``consolidated.pth`` (a flat state dict) and ``module.``/``_orig_mod.`` prefixes are unwrapped.

LlamaGen GPT (c2i) -> groupgen GPT: the architecture is the same Llama block (fused wqkv,
interleaved 2D RoPE, SwiGLU, RMSNorm, zero-init output); only names differ and SwiGLU's ``w1``/``w3``
are fused into ``w13`` (gate rows first). ``n_layer``, ``dim``, vocab, ``num_classes`` (class table rows
- 1, the last row being the CFG null class), GQA heads and the SwiGLU width come from shapes;
``n_head`` from LlamaGen's registry by ``dim``; the token grid from ``image_size / downsample``
(not stored in the file). ``class_token_rope=zeros`` reproduces LlamaGen's zero rotary row for the
class token exactly (its logits match to fp32 rounding).
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from groupgen.checkpoint import checkpoint_hash, write_checkpoint_dir
from groupgen.config import load_config
from groupgen.layout import TokenLayout
from tokenizer.convert import (MGVQ_UNSUPPORTED, ConvertError, check_keys, convert_llamagen_vq, load_foreign,
                               mgvq_summary)

from .layers import ffn_hidden
from .model import GPT, GPTConfig, ar_meta

# LlamaGen's models by width: dim -> (n_head, name). c2i: B, L, XL, XXL, XXXL; 1B/3B/7B share the
# Llama widths (3B is also used for c2i at 3200).
LLAMAGEN_HEADS: dict[int, tuple[int, str]] = {
    768: (12, "GPT-B"), 1024: (16, "GPT-L"), 1280: (20, "GPT-XL"), 1536: (24, "GPT-XXL"),
    2560: (40, "GPT-XXXL"), 2048: (32, "GPT-1B"), 3200: (32, "GPT-3B"), 4096: (32, "GPT-7B"),
}


@dataclass
class ConvertConfig:
    weights: str = "auto"            # auto | ema | <top-level key> holding the state dict
    # llamagen-gpt
    image_size: int = 0              # 0: from a _256/_384/_512 suffix in the file name, else 256
    downsample: int = 16             # the VQ's factor (grid side = image_size / downsample)
    num_classes: int = 0             # 0: class-table rows - 1 (the last row is the null class)
    n_head: int = 0                  # 0: LlamaGen's registry by dim
    class_token_rope: str = "zeros"  # zeros = LlamaGen exactly; identity = groupgen's default
    dtype: str = "keep"              # keep | fp32 | bf16 | fp16
    tokenizer: str = ""              # converted tokenizer checkpoint to record (path + hash) in the AR meta
    # llamagen-vq
    l2_norm: bool = True             # LlamaGen VQ-16/VQ-8 released with codebook_l2_norm=True

    def validate(self):
        if self.class_token_rope not in ("zeros", "identity"):
            raise ConvertError(f"class_token_rope must be 'zeros' or 'identity', got {self.class_token_rope!r}")
        if self.dtype not in _DTYPES:
            raise ConvertError(f"dtype must be one of {list(_DTYPES)}, got {self.dtype!r}")


_DTYPES = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_GPT_IGNORED = re.compile(r"(layers\.\d+\.attention\.kv_cache\.[kv]_cache|freqs_cis|causal_mask)")


def _need(sd, key, what):
    if key not in sd:
        t2i = any(k.startswith("cls_embedding.cap_proj") for k in sd)
        hint = " (a t2i model? only c2i is supported)" if t2i else ""
        raise ConvertError(f"{what}: required key {key!r} is missing{hint}; keys look like {sorted(sd)[:6]}")
    return sd[key]


def infer_gpt_config(sd: dict[str, torch.Tensor], cfg: ConvertConfig, what: str = "LlamaGen GPT"
                     ) -> tuple[GPTConfig, int, int]:
    """(GPTConfig, vocab, num_classes) from a LlamaGen c2i Transformer state dict's shapes."""
    vocab, dim = _need(sd, "tok_embeddings.weight", what).shape
    rows = _need(sd, "cls_embedding.embedding_table.weight", what).shape[0]
    layers = sorted({int(m[1]) for k in sd if (m := re.fullmatch(r"layers\.(\d+)\..*", k))})
    if not layers or layers != list(range(len(layers))):
        raise ConvertError(f"{what}: layer indices {layers[:5]}... are not 0..n-1")
    n_head = cfg.n_head or LLAMAGEN_HEADS.get(dim, (0, ""))[0]
    if not n_head:
        raise ConvertError(f"{what}: dim {dim} is not a LlamaGen width {sorted(LLAMAGEN_HEADS)}; pass n_head=...")
    if dim % n_head:
        raise ConvertError(f"{what}: dim {dim} not divisible by n_head {n_head}")
    hd = dim // n_head
    qkv_rows = _need(sd, "layers.0.attention.wqkv.weight", what).shape[0]
    if (qkv_rows - dim) % (2 * hd):
        raise ConvertError(f"{what}: wqkv has {qkv_rows} rows, not dim {dim} + 2 * n_kv_head * head_dim {hd}")
    n_kv = (qkv_rows - dim) // (2 * hd)
    hidden = _need(sd, "layers.0.feed_forward.w1.weight", what).shape[0]
    # SwiGLU width = round_up(int(8*dim/3), multiple_of) in LlamaGen; find a multiple_of that gives it.
    multiple_of = next((m for m in (256, 128, 64, 32, 16, 8, 4, 2, 1) if ffn_hidden(dim, 1.0, m) == hidden), 0)
    ffn_mult = 1.0
    if not multiple_of:   # a custom ffn_dim_multiplier: reproduce the width exactly with multiple_of = 1
        base = int(8 * dim / 3)
        ffn_mult = next((x for x in (hidden / base, (hidden + 0.5) / base) if int(x * base) == hidden), 0.0)
        multiple_of = 1
        if not ffn_mult:
            raise ConvertError(f"{what}: cannot express SwiGLU width {hidden} for dim {dim}")
    num_classes = cfg.num_classes or rows - 1
    if rows != num_classes + 1:
        raise ConvertError(f"{what}: class table has {rows} rows but num_classes={num_classes}; groupgen needs "
                           f"num_classes + 1 rows (the last is the CFG null class; LlamaGen has it whenever "
                           f"class_dropout_prob > 0)")
    gcfg = GPTConfig(dim=dim, n_layer=len(layers), n_head=n_head, n_kv_head=None if n_kv == n_head else n_kv,
                     ffn_mult=ffn_mult, multiple_of=multiple_of, class_token_rope=cfg.class_token_rope,
                     token_dropout=0.1, resid_dropout=0.1, ffn_dropout=0.1, attn_dropout=0.0, class_dropout=0.1)
    return gcfg.validate(), vocab, num_classes


def _image_size(cfg: ConvertConfig, src: str) -> int:
    if cfg.image_size:
        return cfg.image_size
    m = re.search(r"_(256|384|512)(?:\D|$)", Path(src).name)
    return int(m[1]) if m else 256


def convert_llamagen_gpt(sd: dict[str, torch.Tensor], cfg: ConvertConfig | None = None, src: str = "",
                         extra_meta: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """LlamaGen c2i GPT state dict -> (groupgen GPT tensors, AR meta.json dict), checked against a
    GPT built from the inferred config (every name and shape)."""
    cfg = cfg or ConvertConfig()
    cfg.validate()
    what = f"LlamaGen GPT {src}".strip()
    gcfg, vocab, num_classes = infer_gpt_config(sd, cfg, what)
    size = _image_size(cfg, src)
    if size % cfg.downsample:
        raise ConvertError(f"{what}: image_size {size} not divisible by downsample {cfg.downsample}")
    side = size // cfg.downsample
    layout = TokenLayout("grid", side * side, (vocab,), side, side, image_size=size, channels=3)

    out, used, ignored = {}, set(), {k for k in sd if _GPT_IGNORED.fullmatch(k)}
    simple = {"tok_embeddings.weight": "tok_embed.weight", "cls_embedding.embedding_table.weight": "class_embed.weight",
              "norm.weight": "norm.weight", "output.weight": "heads.out.weight"}
    for a, b in simple.items():
        if a in sd:
            out[b] = sd[a]
            used.add(a)
    for i in range(gcfg.n_layer):
        p = f"layers.{i}."
        for a, b in (("attention.wqkv", "attention.wqkv"), ("attention.wo", "attention.wo"),
                     ("feed_forward.w2", "feed_forward.w2"), ("attention_norm", "attention_norm"),
                     ("ffn_norm", "ffn_norm")):
            if p + a + ".weight" in sd:
                out[p + b + ".weight"] = sd[p + a + ".weight"]
                used.add(p + a + ".weight")
        w1, w3 = sd.get(p + "feed_forward.w1.weight"), sd.get(p + "feed_forward.w3.weight")
        if w1 is not None and w3 is not None:   # silu(w1 x) * (w3 x): gate rows first in w13
            out[p + "feed_forward.w13.weight"] = torch.cat([w1, w3], 0)
            used.update({p + "feed_forward.w1.weight", p + "feed_forward.w3.weight"})
    with torch.device("meta"):
        model = GPT(gcfg, layout, num_classes)
    check_keys(used, sd, ignored, out, model.state_dict(), what)
    dt = _DTYPES[cfg.dtype]
    if dt is not None:
        out = {k: v.to(dt) for k, v in out.items()}
    tok_hash = checkpoint_hash(cfg.tokenizer) if cfg.tokenizer else None
    name = LLAMAGEN_HEADS.get(gcfg.dim, (0, "custom"))[1]
    meta = ar_meta(gcfg, layout, num_classes, tokenizer=cfg.tokenizer or None, tokenizer_hash=tok_hash,
                   converted_from={"format": "llamagen-gpt", "src": src, "llamagen_model": name, **(extra_meta or {})},
                   step=int((extra_meta or {}).get("steps") or 0))
    return out, meta


# ----------------------------------------------------------------------------- CLI
FORMATS = ("llamagen-gpt", "llamagen-vq", "mgvq")


def convert_file(fmt: str, src: str | Path, out: str | Path, cfg: ConvertConfig | None = None) -> Path:
    """Convert ``src`` (format ``fmt``) into the checkpoint directory ``out``; returns it."""
    cfg = cfg or ConvertConfig()
    cfg.validate()
    if fmt not in FORMATS:
        raise ConvertError(f"unknown source format {fmt!r}; choose from {list(FORMATS)}")
    sd, info = load_foreign(src, cfg.weights)
    extra = {"wrapper": info["wrapper"], **({"steps": info["steps"]} if "steps" in info else {})}
    if fmt == "llamagen-gpt":
        tensors, meta = convert_llamagen_gpt(sd, cfg, str(src), extra)
    elif fmt == "llamagen-vq":
        tensors, meta = convert_llamagen_vq(sd, cfg.image_size or 256, cfg.l2_norm, str(src), extra)
        if cfg.dtype != "keep":
            tensors = {k: v.to(_DTYPES[cfg.dtype]) for k, v in tensors.items()}
    else:
        s = mgvq_summary(sd)
        raise ConvertError(f"{src}: MGVQ tokenizer (G={s['groups']} x K={s['codes_per_group']}, group dim "
                           f"{s['group_dim']}, latent {s['latent']}, f={s['factor']}) cannot be converted. "
                           + MGVQ_UNSUPPORTED)
    return write_checkpoint_dir(out, {"model": tensors}, meta)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="fmt", required=True, choices=FORMATS)
    ap.add_argument("--src", required=True, help="third-party checkpoint file (.pt/.pth)")
    ap.add_argument("--out", required=True, help="groupgen checkpoint directory to write")
    ap.add_argument("--config", default=None, help="optional YAML with ConvertConfig fields")
    ap.add_argument("overrides", nargs="*", help="key=value ConvertConfig overrides")
    a = ap.parse_args(argv)
    cfg = load_config(ConvertConfig, a.config, a.overrides)
    try:
        path = convert_file(a.fmt, a.src, a.out, cfg)
    except ConvertError as e:
        print(f"convert: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
