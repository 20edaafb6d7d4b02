"""Token-layout statistics of a token store: entropy, codebook usage, compressibility.

    python -m eval.layout_stats --tokens DIR [--out J.json] [key=value ...]

* per-position entropy H(code[l, g]) in bits over images (plug-in estimate: biased low when N is not
  much larger than K), summarised per group, and per-group entropy of the code marginal over positions;
* codebook usage / perplexity per group (means over positions for per-position codebooks, whose
  pooled figures are reported as ``marginal_usage`` / ``marginal_perplexity``);
* compressibility: every (group, code) pair becomes one private-use unicode character, each image one
  "sentence" of L*G characters (raster order, group inner); a SentencePiece model (BPE or unigram,
  vocabulary = symbols seen + ``spm_extra_vocab``) is trained on ``spm_train_images`` images and
  the tokens per image after merging are measured on held-out images, against L*G raw tokens.
  Fewer tokens means more redundancy a generator could exploit (or must model).
"""
from __future__ import annotations

import argparse
import io
import math
import sys
from dataclasses import dataclass

import numpy as np

from groupgen.config import ConfigError, load_config, to_dict
from groupgen.tokens import TokenStore, TokenStoreError

from .fidelity import EvalError, emit_json

# Supplementary private-use planes 15 and 16: untouched by normalisation, never whitespace.
_PUA_BLOCKS = ((0xF0000, 0xFFFFD), (0x100000, 0x10FFFD))


@dataclass
class LayoutStatsConfig:
    views: str = "first"            # first | all (augmented views count as extra images)
    max_images: int = 0             # statistics over the first N images (0 = all)
    full: bool = False              # also print the [L][G] per-position entropy table
    spm: bool = True
    spm_model_type: str = "bpe"     # bpe | unigram
    spm_extra_vocab: int = 1024     # merged pieces on top of the raw symbols
    spm_train_images: int = 2000
    spm_eval_images: int = 1000     # held out after the training images (reuses them if the store is small)
    seed: int = 0


def store_codes(store: TokenStore, views: str = "first", max_images: int = 0) -> np.ndarray:
    """[M, L, G] int64 from a store (view 0, or all views flattened into images)."""
    c = store.codes[: max_images or len(store)]
    c = c[:, 0] if views == "first" else c.reshape(-1, *c.shape[2:])
    return np.asarray(c, dtype=np.int64)


def entropy_bits(counts: np.ndarray, axis: int = -1) -> np.ndarray:
    counts = np.asarray(counts, np.float64)
    tot = counts.sum(axis=axis, keepdims=True)
    p = np.divide(counts, tot, out=np.zeros_like(counts), where=tot > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(p > 0, -p * np.log2(p), 0.0)
    return t.sum(axis=axis)


def position_entropy(codes: np.ndarray, K: tuple[int, ...]) -> np.ndarray:
    """[L, G] entropy (bits) of each position's code over the images in ``codes`` [M, L, G]."""
    m, L, G = codes.shape
    kmax = max(K)
    out = np.zeros((L, G))
    for g in range(G):
        flat = (np.arange(L)[None, :] * kmax + codes[:, :, g]).ravel()
        hist = np.bincount(flat, minlength=L * kmax).reshape(L, kmax)
        out[:, g] = entropy_bits(hist)
    return out


def group_stats(codes: np.ndarray, K: tuple[int, ...], per_position: bool = False) -> dict:
    """Per group: entropy of the code marginal over positions, codebook usage and perplexity
    (``eval.reconstruction.codebook_usage``).

    With a shared codebook, usage / perplexity are those of the pooled histogram. With one codebook
    per position (QG-VAE) code i at two positions are different vectors, so ``usage`` /
    ``perplexity`` are means over positions of each position's own codebook (a model emitting one
    code per position uses 1/K of each), and the pooled figures stay only as ``marginal_*``."""
    from .reconstruction import codebook_usage

    pooled = codebook_usage(codes, K)
    out = {"group_entropy_bits": pooled["entropy_bits"], "max_bits": [math.log2(k) for k in K],
           "codebooks": "per_position" if per_position else "shared"}
    if not per_position:
        return {**out, "usage": pooled["usage"], "perplexity": pooled["perplexity"]}
    own = codebook_usage(codes, K, per_position=True)
    return {**out, "usage": own["usage"], "perplexity": own["perplexity"],
            "marginal_usage": pooled["usage"], "marginal_perplexity": pooled["perplexity"]}


def codes_to_text(codes: np.ndarray, K: tuple[int, ...]) -> list[str]:
    """One string per image: character = private-use code point of (g, code)."""
    offs = np.concatenate([[0], np.cumsum(K)[:-1]]).astype(np.int64)
    ids = codes.reshape(len(codes), -1, len(K)) + offs
    total = int(sum(K))
    cap = sum(b - a + 1 for a, b in _PUA_BLOCKS)
    if total > cap:
        raise EvalError(f"sum(K)={total} symbols exceed the {cap} private-use characters available")
    n0 = _PUA_BLOCKS[0][1] - _PUA_BLOCKS[0][0] + 1
    cps = np.where(ids < n0, ids + _PUA_BLOCKS[0][0], ids - n0 + _PUA_BLOCKS[1][0]).reshape(len(codes), -1)
    return ["".join(map(chr, row)) for row in cps.tolist()]


def spm_compression(codes: np.ndarray, K: tuple[int, ...], cfg: LayoutStatsConfig) -> dict:
    import sentencepiece as spm

    m = len(codes)
    n_tr = min(cfg.spm_train_images, m)
    held_out = m > n_tr
    ev = codes[n_tr: n_tr + cfg.spm_eval_images] if held_out else codes[: cfg.spm_eval_images]
    train_txt = codes_to_text(codes[:n_tr], K)
    symbols = len(set("".join(train_txt)))
    vocab = symbols + cfg.spm_extra_vocab + 1  # +1: <unk>
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(train_txt), model_writer=buf, model_type=cfg.spm_model_type, vocab_size=vocab,
        hard_vocab_limit=False, character_coverage=1.0, normalization_rule_name="identity",
        add_dummy_prefix=False, remove_extra_whitespaces=False, split_by_unicode_script=False,
        split_by_number=False, split_digits=False, max_sentencepiece_length=16,
        max_sentence_length=1 << 20, input_sentence_size=0, shuffle_input_sentence=False,
        num_threads=1, bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    ev_txt = codes_to_text(ev, K)
    lens = np.array([len(sp.encode(t)) for t in ev_txt], np.float64)
    raw = codes.shape[1] * codes.shape[2]
    unk = sum(sp.encode(t).count(0) for t in ev_txt[:100])
    return {"spm_model_type": cfg.spm_model_type, "spm_vocab": int(sp.get_piece_size()), "raw_symbols": symbols,
            "raw_tokens_per_image": raw, "tokens_per_image": float(lens.mean()),
            "tokens_per_image_std": float(lens.std()), "compression_ratio": float(raw / lens.mean()),
            "train_images": n_tr, "eval_images": len(ev), "held_out": held_out, "unk_in_first_100": int(unk)}


def layout_stats(store: TokenStore, cfg: LayoutStatsConfig) -> dict:
    lay = store.layout
    codes = store_codes(store, cfg.views, cfg.max_images)
    if len(codes) == 0:
        raise EvalError(f"{store.root}: no images to analyse")
    pe = position_entropy(codes, lay.K)
    out = {"store": str(store.root), "layout": lay.describe(), "images": len(codes), "L": lay.L, "G": lay.G,
           "K": list(lay.K),
           "position_entropy_bits_mean": pe.mean(0).tolist(), "position_entropy_bits_min": pe.min(0).tolist(),
           "position_entropy_bits_max": pe.max(0).tolist(),
           "sum_position_entropy_bits": float(pe.sum()), "layout_bits_per_image": lay.bits_per_image,
           **group_stats(codes, lay.K, lay.per_position_codebook)}
    if cfg.full:
        out["position_entropy_bits"] = pe.round(4).tolist()
    if cfg.spm:
        out.update(spm_compression(codes, lay.K, cfg))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m eval.layout_stats", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", required=True, help="token store directory")
    ap.add_argument("--out", default=None)
    ap.add_argument("--config", default=None)
    ap.add_argument("overrides", nargs="*", help="key=value (LayoutStatsConfig keys)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(LayoutStatsConfig, args.config, args.overrides)
        out = {**layout_stats(TokenStore(args.tokens), cfg), "config": to_dict(cfg)}
    except (EvalError, ConfigError, TokenStoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    emit_json(out, args.out)
    return out


if __name__ == "__main__":
    main()
