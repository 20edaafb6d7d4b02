"""Import third-party tokenizer weights: LlamaGen VQ-16 / VQ-8 (and what MGVQ's release allows).

Third-party ``.pt``/``.pth`` files are pickles, so they are read once with
``torch.load(weights_only=True)`` (which refuses anything but tensors and plain containers; the
only class allowed besides is ``argparse.Namespace``, which LlamaGen stores under ``"args"``) and
written as a groupgen checkpoint (safetensors + meta.json) that ``load_tokenizer`` reads.

    sd, info = load_foreign(path)                      # unwrapped state dict + {"wrapper", "steps"}
    tensors, meta = convert_llamagen_vq(sd, image_size=256)
    write_checkpoint_dir(out, {"model": tensors}, meta)

Config is inferred from shapes: ``ch``/``channels`` from ``encoder.conv_in``, ``ch_mult`` from each
level's first res block, ``num_res_blocks`` from level 0, ``z_channels`` from ``encoder.conv_out``,
``embed_dim`` from ``quant_conv``, the codebook size from ``quantize.embedding``. What shapes cannot
say (``image_size``, ``l2_norm``) comes from arguments with LlamaGen's defaults.
"""
from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

import torch

from groupgen.config import to_dict
from groupgen.data import DataConfig

from .model import ModelConfig, Tokenizer
from .quantize import QuantizerConfig
from .vqgan import norm as groupgen_norm


class ConvertError(ValueError):
    """A foreign checkpoint that cannot be converted (names the file/keys/shapes involved)."""


# ----------------------------------------------------------------------------- loading

# Keys under which training scripts nest the weights: DDP/LlamaGen ("model"), DeepSpeed
# ("module"), Lightning/MGVQ ("state_dict"); "ema" only on request.
WRAPPERS = ("model", "module", "state_dict")
# Prefixes added by wrappers around the module itself (DDP, torch.compile, FSDP, checkpointing).
_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def load_foreign(path: str | Path, weights: str = "auto") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a third-party checkpoint safely and return ``(state_dict, info)``.

    ``weights``: ``auto`` (the first of ``model``/``module``/``state_dict`` present, else the file
    itself when it is a flat tensor dict), ``ema`` or any explicit top-level key.
    """
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:       # legacy (non-zip) files cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses code-carrying pickles: report, never retry unsafely
        raise ConvertError(f"{path}: refused to load with torch.load(weights_only=True) "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                           "groupgen never unpickles arbitrary objects") from None
    return unwrap(obj, weights, str(path))


def unwrap(obj, weights: str = "auto", where: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict]:
    """Find the weights in a loaded checkpoint object and strip wrapper prefixes from the keys."""
    if not isinstance(obj, dict):
        raise ConvertError(f"{where}: expected a dict, got {type(obj).__name__}")
    info = {"wrapper": None}
    for k in ("steps", "step", "epoch"):
        if isinstance(obj.get(k), int):
            info["steps"] = obj[k]
            break
    if weights == "auto":
        found = [k for k in WRAPPERS if isinstance(obj.get(k), dict)]
        if found:
            info["wrapper"] = found[0]
            obj = obj[found[0]]
    else:
        if not isinstance(obj.get(weights), dict):
            have = sorted(k for k, v in obj.items() if isinstance(v, dict))
            raise ConvertError(f"{where}: no weights under key {weights!r}; dict-valued keys: {have}")
        info["wrapper"] = weights
        obj = obj[weights]
    bad = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ConvertError(f"{where}: not a state dict (wrapper {info['wrapper']!r}); non-tensor entries "
                           f"{bad[:8]}; pass weights=<key> naming the entry that holds the weights")
    sd = {}
    for k, v in obj.items():
        name = k
        for p in _PREFIXES:      # prefixes may nest (DDP around a compiled module)
            name = name.replace(p, "")
        if name in sd:
            raise ConvertError(f"{where}: keys {k!r} and another collapse to {name!r} after removing wrapper prefixes")
        sd[name] = v
    return sd, info


def check_keys(used: set[str], sd: dict, ignored: set[str], got: dict, want: dict, what: str) -> None:
    """Raise ConvertError listing source keys nothing consumed, target keys nothing produced and
    shape mismatches (everything at once, so one run shows the whole problem)."""
    unknown = sorted(set(sd) - used - ignored)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    shapes = [f"{k}: converted {list(got[k].shape)} vs model {list(want[k].shape)}"
              for k in sorted(set(got) & set(want)) if got[k].shape != want[k].shape]
    if unknown or missing or extra or shapes:
        parts = []
        if unknown:
            parts.append(f"{len(unknown)} unknown source keys {unknown[:12]}")
        if missing:
            parts.append(f"{len(missing)} model keys not provided {missing[:12]}")
        if extra:
            parts.append(f"{len(extra)} converted keys the model lacks {extra[:12]}")
        if shapes:
            parts.append(f"shape mismatches {shapes[:8]}")
        raise ConvertError(f"{what}: " + "; ".join(parts))


# ----------------------------------------------------------------------------- LlamaGen VQ

_RES = r"(norm1|conv1|norm2|conv2|nin_shortcut)"
_ATT = r"(norm|q|k|v|proj_out)"
_PARAM = r"(weight|bias)"
_VQ_IGNORED = re.compile(r"quantize\.(codebook_used|embed_prob)")   # usage statistics, not weights


def _stage(part: str) -> str:
    return "down" if part == "encoder" else "up"


def _res_name(part: str) -> str:
    return "skip" if part == "nin_shortcut" else part


def map_vq_keys(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], set[str], set[str]]:
    """LlamaGen VQModel names -> groupgen Tokenizer names for the conv nets and 1x1 convs.
    Returns (tensors, consumed source keys, ignored source keys). The codebook is left to the caller."""
    out, used, ignored = {}, set(), set()
    attn = defaultdict(dict)     # groupgen attention prefix -> {"q.weight": t, ...}
    rules = [
        (rf"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.{_PARAM}", lambda m: f"net.{m[1]}.{m[2]}.{m[3]}"),
        (rf"(encoder|decoder)\.conv_blocks\.(\d+)\.res\.(\d+)\.{_RES}\.{_PARAM}",
         lambda m: f"net.{m[1]}.{_stage(m[1])}.{m[2]}.blocks.{m[3]}.{_res_name(m[4])}.{m[5]}"),
        (rf"(encoder|decoder)\.conv_blocks\.(\d+)\.(downsample|upsample)\.conv\.{_PARAM}",
         lambda m: f"net.{m[1]}.{_stage(m[1])}.{m[2]}.{m[3]}.conv.{m[4]}"),
        (rf"(encoder|decoder)\.mid\.([02])\.{_RES}\.{_PARAM}",
         lambda m: f"net.{m[1]}.mid.{m[2]}.{_res_name(m[3])}.{m[4]}"),
        (rf"(quant_conv|post_quant_conv)\.{_PARAM}", lambda m: f"net.{m[1]}.{m[2]}"),
    ]
    att_rules = [
        (rf"(encoder|decoder)\.conv_blocks\.(\d+)\.attn\.(\d+)\.{_ATT}\.{_PARAM}",
         lambda m: (f"net.{m[1]}.{_stage(m[1])}.{m[2]}.attns.{m[3]}", m[4], m[5])),
        (rf"(encoder|decoder)\.mid\.1\.{_ATT}\.{_PARAM}", lambda m: (f"net.{m[1]}.mid.1", m[2], m[3])),
    ]
    for k, v in sd.items():
        if _VQ_IGNORED.fullmatch(k):
            ignored.add(k)
            continue
        for pat, fn in rules:
            m = re.fullmatch(pat, k)
            if m:
                out[fn(m)] = v
                used.add(k)
                break
        else:
            for pat, fn in att_rules:
                m = re.fullmatch(pat, k)
                if m:
                    prefix, part, param = fn(m)
                    attn[prefix][f"{part}.{param}"] = v
                    used.add(k)
                    break
    # groupgen's AttnBlock fuses q, k, v into one 1x1 conv (rows in that order); same SDPA scale 1/sqrt(C).
    for prefix, parts in attn.items():
        for param in ("weight", "bias"):
            qkv = [parts.get(f"{n}.{param}") for n in "qkv"]
            if all(t is not None for t in qkv):
                out[f"{prefix}.qkv.{param}"] = torch.cat(qkv, 0)
            for src, dst in (("norm", "norm"), ("proj_out", "proj")):
                if f"{src}.{param}" in parts:
                    out[f"{prefix}.{dst}.{param}"] = parts[f"{src}.{param}"]
    return out, used, ignored


def _shape(sd, key, what) -> torch.Size:
    if key not in sd:
        raise ConvertError(f"{what}: required key {key!r} is missing (is this a LlamaGen VQ checkpoint?); "
                           f"keys look like {sorted(sd)[:6]}")
    return sd[key].shape


def infer_vq_config(sd: dict[str, torch.Tensor], image_size: int = 256, l2_norm: bool = True,
                    what: str = "LlamaGen VQ") -> tuple[ModelConfig, QuantizerConfig]:
    """groupgen tokenizer configs matching a LlamaGen VQModel state dict's shapes."""
    ch, channels = _shape(sd, "encoder.conv_in.weight", what)[:2]
    lv = re.compile(r"encoder\.conv_blocks\.(\d+)\.res\.0\.conv1\.weight")
    levels = sorted({int(m[1]) for k in sd if (m := lv.fullmatch(k))})
    if levels != list(range(len(levels))) or not levels:
        raise ConvertError(f"{what}: encoder levels {levels} are not 0..n-1")
    ch_mult = []
    for i in levels:
        c = sd[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0]
        if c % ch:
            raise ConvertError(f"{what}: level {i} width {c} is not a multiple of ch={ch}")
        ch_mult.append(c // ch)
    nrb = len({m[1] for k in sd if (m := re.fullmatch(r"encoder\.conv_blocks\.0\.res\.(\d+)\.conv1\.weight", k))})
    dec_nrb = len({m[1] for k in sd if (m := re.fullmatch(r"decoder\.conv_blocks\.0\.res\.(\d+)\.conv1\.weight", k))})
    if dec_nrb != nrb + 1:
        raise ConvertError(f"{what}: decoder has {dec_nrb} res blocks per level, groupgen's decoder has "
                           f"encoder's {nrb} + 1 (LlamaGen's layout)")
    dec_mult = []
    for j in range(len(levels)):
        key = f"decoder.conv_blocks.{j}.res.0.conv1.weight"
        dec_mult.append(_shape(sd, key, what)[0] // ch)
    if dec_mult[::-1] != ch_mult:
        raise ConvertError(f"{what}: decoder ch_mult {dec_mult[::-1]} differs from encoder {ch_mult}; groupgen "
                           "ties them")
    z_channels = _shape(sd, "encoder.conv_out.weight", what)[0]
    qc = _shape(sd, "quant_conv.weight", what)
    embed_dim, per_group_in = qc[0], qc[1]
    groups = z_channels // per_group_in
    K, d = _shape(sd, "quantize.embedding.weight", what)
    attn = "encoder.mid.1.q.weight" in sd
    f = 2 ** (len(ch_mult) - 1)
    if image_size % f:
        raise ConvertError(f"{what}: image_size {image_size} is not divisible by the downsampling factor {f}")
    widths = {int(ch) * m for m in ch_mult}
    odd = sorted(c for c in widths if groupgen_norm(c).num_groups != 32)
    if odd:
        raise ConvertError(f"{what}: LlamaGen uses GroupNorm(32) everywhere but groupgen's norm() uses fewer "
                           f"groups for widths {odd} (< 128 channels); outputs would differ")
    mcfg = ModelConfig(arch="vqgan", image_size=image_size, channels=int(channels), ch=int(ch), ch_mult=ch_mult,
                       num_res_blocks=nrb, attn=attn, z_channels=int(z_channels), embed_dim=int(embed_dim),
                       grouped_quant_conv=groups > 1)
    if groups == 1:
        if d != embed_dim:
            raise ConvertError(f"{what}: codebook dim {d} != quant_conv output {embed_dim}")
        qcfg = QuantizerConfig(kind="vq", codebook_size=int(K), l2_norm=l2_norm, beta=0.25)
    else:
        if K % groups or d * groups != embed_dim:
            raise ConvertError(f"{what}: codebook {list((K, d))} does not split into {groups} groups of "
                               f"dim {embed_dim // groups}")
        qcfg = QuantizerConfig(kind="multigroup", groups=groups, codebook_size=int(K // groups), l2_norm=l2_norm,
                               beta=0.25)
    mcfg.validate()
    qcfg.validate(mcfg.embed_dim)
    return mcfg, qcfg


def convert_llamagen_vq(sd: dict[str, torch.Tensor], image_size: int = 256, l2_norm: bool = True,
                        src: str = "", extra_meta: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """A LlamaGen VQModel state dict -> (groupgen tensors, tokenizer meta.json dict). The result
    is checked against a freshly built Tokenizer (names and shapes), so it loads strictly."""
    what = f"LlamaGen VQ {src}".strip()
    mcfg, qcfg = infer_vq_config(sd, image_size, l2_norm, what)
    out, used, ignored = map_vq_keys(sd)
    emb = sd["quantize.embedding.weight"]
    G = qcfg.groups if qcfg.kind == "multigroup" else 1
    out["quantizer.books.embed"] = emb.reshape(G, emb.shape[0] // G, emb.shape[1])   # group g: rows g*K..(g+1)*K
    used.add("quantize.embedding.weight")
    with torch.device("meta"):
        tok = Tokenizer(mcfg, qcfg)
    check_keys(used, sd, ignored, out, tok.state_dict(), what)
    data = DataConfig(name="imagefolder", image_size=image_size, channels=mcfg.channels)
    meta = {"kind": "tokenizer", "config": {"data": to_dict(data), "model": to_dict(mcfg), "quantizer": to_dict(qcfg)},
            "layout": tok.layout.to_dict(),
            "converted_from": {"format": "llamagen-vq", "src": src, **(extra_meta or {})}}
    return out, meta


# ----------------------------------------------------------------------------- MGVQ

MGVQ_UNSUPPORTED = (
    "MGVQ's released tokenizers (huggingface mkjia/MGVQ, mgvq_f{8,16,32}c32_g{4,8}.pt, weights under "
    "'state_dict') use a DC-AE / EfficientViT encoder-decoder (efficientvit/models/tokenizer/mgvq.py): "
    "pixel-unshuffle downsampling with channel-averaging shortcuts, pixel-shuffle upsampling with "
    "channel-duplicating shortcuts, ResBlocks with BatchNorm / TritonRMSNorm2d, EfficientViT GLUMBConv + "
    "LiteMLA linear-attention blocks at the low resolutions, width_list e.g. [128,256,512,512,1024] and "
    "depth_list [0,4,8,2,2] (decoder [0,5,10,2,2]). groupgen's tokenizer only has the LlamaGen/taming conv "
    "VQGAN, so those encoder/decoder weights have no counterpart; only the quantizer maps (see "
    "convert_mgvq_quantizer). Needed: a DC-AE net in tokenizer/ (ModelConfig.arch='dcae') with those blocks."
)


def mgvq_summary(sd: dict[str, torch.Tensor]) -> dict:
    """What a released MGVQ checkpoint holds: groups G, codes per group, group dim, latent width,
    downsampling factor (from the encoder's stage count) and encoder/decoder key families."""
    emb = sd.get("quantize.embedding.weight")
    qc = sd.get("quant_conv.weight")
    if emb is None or qc is None:
        raise ConvertError("MGVQ: 'quantize.embedding.weight' / 'quant_conv.weight' missing; not an MGVQ tokenizer")
    latent, per_group = qc.shape[0], qc.shape[1]
    G = latent // per_group
    stages = {int(m[1]) for k in sd if (m := re.fullmatch(r"encoder\.stages\.(\d+)\..*", k))}
    fam = sorted({".".join(k.split(".")[:3]) for k in sd if k.startswith(("encoder.", "decoder."))})
    return {"groups": G, "codes_per_group": emb.shape[0] // G, "group_dim": emb.shape[1], "latent": latent,
            "factor": 2 ** (max(stages)) if stages else None, "net_key_families": fam}


def convert_mgvq_quantizer(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], QuantizerConfig]:
    """The part of an MGVQ tokenizer groupgen can host: its codebook (``quantize.embedding.weight``
    ``[G*K, d]``, group g owning rows ``g*K..(g+1)*K``, l2-normalised lookup) as a multigroup
    quantizer ``books.embed [G, K, d]``, and its grouped 1x1 ``quant_conv``/``post_quant_conv``
    (latent 32 -> 32, groups=G) under groupgen's ``net.`` names."""
    s = mgvq_summary(sd)
    G, K, d = s["groups"], s["codes_per_group"], s["group_dim"]
    if G * d != s["latent"]:
        raise ConvertError(f"MGVQ: G={G} groups x dim {d} != latent {s['latent']}")
    out = {"quantizer.books.embed": sd["quantize.embedding.weight"].reshape(G, K, d)}
    for name in ("quant_conv", "post_quant_conv"):
        for p in ("weight", "bias"):
            key = f"{name}.{p}"
            if key not in sd:
                raise ConvertError(f"MGVQ: missing {key!r}")
            out[f"net.{key}"] = sd[key]
    return out, QuantizerConfig(kind="multigroup", groups=G, codebook_size=K, l2_norm=True, beta=0.25)
