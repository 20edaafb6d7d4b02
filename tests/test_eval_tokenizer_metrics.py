"""eval/: reconstruction metrics (PSNR, SSIM, code usage, rFID), evaluating a tokenizer checkpoint, and the
layout statistics of a token store."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from eval.fidelity import EvalError
from eval.layout_stats import LayoutStatsConfig, layout_stats
from eval.reconstruction import codebook_usage, psnr, ssim
from groupgen.layout import TokenLayout
from groupgen.tokens import TokenStore, TokenStoreWriter


class Stub:  # a 4-level pixel quantiser: one token per pixel, G = 1, K = 4
    layout = TokenLayout("grid", 32 * 32, (4,), h=32, w=32, image_size=32, channels=1)

    def encode(self, x):
        return ((x + 1) / 2 * 3).round().long().clamp(0, 3).reshape(len(x), -1, 1)

    def decode_codes(self, c):
        return (c.float() / 3 * 2 - 1).reshape(len(c), 1, 32, 32)


# ------------------------------------------------------------------ reconstruction metrics

def test_psnr_ssim_usage_hand_values():
    x = torch.zeros(2, 1, 16, 16, dtype=torch.float64)
    y = x.clone()
    y[0] += 0.1
    y[1] += 0.2
    r = psnr(x, y)  # range 2 ([-1,1])
    mse = (0.01 + 0.04) / 2
    assert abs(r["psnr"] - 10 * math.log10(4 / mse)) < 1e-9
    per = (10 * math.log10(4 / 0.01) + 10 * math.log10(4 / 0.04)) / 2
    assert abs(r["psnr_per_image"] - per) < 1e-9 and r["psnr_per_image"] > r["psnr"]
    a = torch.rand(3, 3, 20, 20) * 2 - 1
    assert torch.allclose(ssim(a, a), torch.ones(3, dtype=torch.float64))
    assert (ssim(a, a + 0.3 * torch.randn_like(a)) < 0.9).all()
    # constant images: SSIM reduces to the luminance term (2ab + c1) / (a^2 + b^2 + c1) of the pixel
    # values on [0, 1] (data range 1, c1 = 0.01^2); on [-1, 1] it would be negative for 0.2 vs -0.3
    a0, b0 = 0.2, -0.3
    s = ssim(torch.full((1, 1, 12, 12), a0, dtype=torch.float64), torch.full((1, 1, 12, 12), b0, dtype=torch.float64))
    a, b, c1 = (a0 + 1) / 2, (b0 + 1) / 2, 0.01 ** 2
    assert abs(float(s) - (2 * a * b + c1) / (a ** 2 + b ** 2 + c1)) < 1e-9 and float(s) > 0.8
    u = codebook_usage(torch.tensor([[[0, 1]], [[1, 1]], [[2, 1]], [[3, 1]]]), (8, 2))
    assert u["usage"] == [0.5, 0.5]
    assert abs(u["perplexity"][0] - 4) < 1e-9 and abs(u["perplexity"][1] - 1) < 1e-9
    assert abs(u["entropy_bits"][0] - 2) < 1e-9


def test_per_position_codebook_usage_is_counted_per_position(tmp_path):
    """QG-VAE collapse: every position always emits one code (a different one per position). Pooled
    over positions that looks like full usage; per position it is 1/K of each codebook."""
    K, L = 64, 64
    codes = torch.arange(L).repeat(100, 1)[..., None]   # [N, L, G=1]
    u = codebook_usage(codes, (K,), per_position=True)
    assert u["usage"] == [1 / K] and u["perplexity"] == [1.0] and u["entropy_bits"] == [0.0]
    assert codebook_usage(codes, (K,))["usage"] == [1.0]          # the shared-codebook reading (pooled)
    with pytest.raises(EvalError, match=r"\[N, L, G\].*\[6400, 1\]"):
        codebook_usage(codes.reshape(-1, 1), (K,), per_position=True)

    from eval.reconstruction import ReconEvalConfig, evaluate_tokenizer

    class Collapsed:   # a per-position tokenizer that emits code l at position l for every image
        layout = TokenLayout("seq", L, (K,), image_size=32, channels=1, per_position_codebook=True)

        def encode(self, x):
            return torch.arange(L).repeat(len(x), 1)[..., None]

        def decode_codes(self, c):
            return torch.zeros(len(c), 1, 32, 32)

    out = evaluate_tokenizer(Collapsed(), ReconEvalConfig(n=16, extractor="none", lpips=False),
                             train_data={"name": "fmnist"})
    assert out["usage"] == [1 / K] and out["perplexity"] == [1.0]

    # layout statistics of the same codes in a token store
    st = _store(tmp_path / "qg", Collapsed.layout, codes[:, None].numpy())
    r = layout_stats(st, LayoutStatsConfig(spm=False))
    assert r["codebooks"] == "per_position" and r["usage"] == [1 / K] and r["perplexity"] == [1.0]
    assert r["marginal_usage"] == [1.0] and r["marginal_perplexity"] == [pytest.approx(K)]


def _fake_tokenizer_checkpoint(path: Path, data: dict) -> Path:
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"kind": "tokenizer", "config": {"data": data}}))
    return path


def test_evaluate_tokenizer_uses_the_checkpoints_training_data(tmp_path):
    from eval.reconstruction import ReconEvalConfig, evaluate_tokenizer
    from groupgen.config import ConfigError, load_config
    from groupgen.data import DataConfig, build_dataset

    class Identity:   # records what it was evaluated on
        layout = TokenLayout("grid", 32 * 32, (256,), h=32, w=32, image_size=32, channels=1)

        def __init__(self, ck):
            self.checkpoint_path, self.seen = str(ck), []

        def encode(self, x):
            self.seen.append(x.clone())
            return ((x + 1) * 127.5).round().long().clamp(0, 255).reshape(len(x), -1, 1)

        def decode_codes(self, c):
            return (c.float() / 127.5 - 1).reshape(len(c), 1, 32, 32)

    ck = _fake_tokenizer_checkpoint(tmp_path / "tok", {"name": "digits", "image_size": 32, "channels": 1,
                                                        "resize": "resize", "limit": 5})
    tok = Identity(ck)
    out = evaluate_tokenizer(tok, ReconEvalConfig(n=40, batch_size=16, extractor="none", lpips=False))
    digits = build_dataset(DataConfig(name="digits", image_size=32, limit=40), "test").images
    assert torch.equal(torch.cat(tok.seen), digits)   # not Fashion-MNIST, and n (not the ckpt's limit) images
    assert out["data"]["name"] == "digits" and out["images"] == 40 and out["psnr"] > 40
    # rFID with a domain classifier of another dataset is refused before any image is encoded
    tok.seen.clear()
    with pytest.raises(EvalError, match="trained on 'fmnist'.*evaluated on 'digits'"):
        evaluate_tokenizer(tok, ReconEvalConfig(n=40, extractor="domain", lpips=False))
    assert tok.seen == []

    tok2 = Identity(ck)   # an explicit override on top of the checkpoint's config
    evaluate_tokenizer(tok2, load_config(ReconEvalConfig, None, ["n=8", "extractor=none", "lpips=false",
                                                                 "data={name: fmnist}"]))
    fm = build_dataset(DataConfig(name="fmnist", image_size=32, resize="resize", limit=8), "test").images
    assert torch.equal(torch.cat(tok2.seen), fm)

    with pytest.raises(EvalError, match=r"trained on 'fmnist' \(domain\.dataset\).*evaluated on 'digits'"):
        evaluate_tokenizer(Identity(ck), ReconEvalConfig(n=8, extractor="domain", lpips=False))
    with pytest.raises(EvalError, match="checkpoint_path"):
        evaluate_tokenizer(Identity.__new__(Identity), ReconEvalConfig(n=8, extractor="none", lpips=False))
    with pytest.raises(ConfigError, match=r"data: unknown keys \['nmae'\]"):
        load_config(ReconEvalConfig, None, ["data={nmae: digits}"])


# ------------------------------------------------------------------ layout statistics

def _store(path, layout, codes, labels=None):
    n = len(codes)
    w = TokenStoreWriter(path, layout, n, codes.shape[1], 2, chunk_size=n)
    w.write_chunk(0, codes, np.zeros(n, np.int64) if labels is None else labels)
    w.finalize()
    return TokenStore(path)


def test_layout_stats_entropy_matches_hand_values(tmp_path):
    lay = TokenLayout("seq", 2, (4, 2))
    # 8 images; pos 0 g0 cycles 0..3 (2 bits), pos 1 g0 constant 3 (0 bits); g1: pos 0 alternates
    # 0/1 (1 bit), pos 1 = 1 except one image (H(1/8) bits)
    codes = np.zeros((8, 1, 2, 2), np.int64)
    codes[:, 0, 0, 0] = np.arange(8) % 4
    codes[:, 0, 1, 0] = 3
    codes[:, 0, 0, 1] = np.arange(8) % 2
    codes[:, 0, 1, 1] = 1
    codes[0, 0, 1, 1] = 0
    st = _store(tmp_path / "s", lay, codes)
    r = layout_stats(st, LayoutStatsConfig(spm=False, full=True))
    h18 = -(1 / 8) * math.log2(1 / 8) - (7 / 8) * math.log2(7 / 8)
    np.testing.assert_allclose(r["position_entropy_bits"], [[2.0, 1.0], [0.0, round(h18, 4)]], atol=1e-4)
    np.testing.assert_allclose(r["position_entropy_bits_mean"], [1.0, (1 + h18) / 2], atol=1e-12)
    # group 0 marginal over both positions: codes 0,1,2 x2 each and 3 x10 of 16
    p = np.array([2, 2, 2, 10]) / 16
    assert abs(r["group_entropy_bits"][0] - float(-(p * np.log2(p)).sum())) < 1e-12
    assert r["usage"] == [1.0, 1.0] and r["images"] == 8


def test_sentencepiece_compresses_repetitive_store(tmp_path):
    lay = TokenLayout("grid", 16, (16, 16), h=4, w=4)
    rng = np.random.default_rng(0)
    protos = rng.integers(0, 16, size=(4, 1, 16, 2))
    rep = protos[rng.integers(0, 4, 300)]
    rand = rng.integers(0, 16, size=(300, 1, 16, 2))
    cfg = LayoutStatsConfig(spm_train_images=200, spm_eval_images=100, spm_extra_vocab=128)
    r_rep = layout_stats(_store(tmp_path / "rep", lay, rep), cfg)
    r_rand = layout_stats(_store(tmp_path / "rand", lay, rand), cfg)
    assert r_rep["raw_tokens_per_image"] == 32 and r_rep["held_out"]
    assert r_rep["tokens_per_image"] < 8 < r_rand["tokens_per_image"]
    assert r_rep["compression_ratio"] > 4 and r_rep["unk_in_first_100"] == 0
    assert r_rep["sum_position_entropy_bits"] <= 32 * 2 + 1e-9 < r_rand["sum_position_entropy_bits"]  # 4 prototypes: <= 2 bits per (l, g)


def test_evaluate_tokenizer_with_a_stub_tokenizer():
    from eval.reconstruction import ReconEvalConfig, evaluate_tokenizer

    out = evaluate_tokenizer(Stub(), ReconEvalConfig(n=64, batch_size=32, extractor="none", lpips=False),
                             train_data={"name": "fmnist"})
    assert out["images"] == 64 and out["usage"] == [1.0] and 1 < out["perplexity"][0] <= 4
    # uniform 4-level quantisation of [-1,1]: error at most 1/3 per pixel -> PSNR >= 10 log10(4 / (1/9))
    assert out["psnr"] > 10 * math.log10(36) and 0 < out["ssim"] <= 1


def test_reconstruction_fid_streams_features_and_equals_the_whole_set_fid(monkeypatch):
    """rFID from features gathered batch by batch equals the FID of the whole image sets, and no
    image outlives its batch (50k ImageNet images in host fp32 were 78 GB)."""
    import eval.reconstruction as rec
    from eval.fidelity import Extractor

    class Pixels(Extractor):   # features: 8 pooled pixel means
        name = "pixels"

        def __call__(self, x):
            f = torch.nn.functional.adaptive_avg_pool2d(x.float()[:, :1], (2, 4)).flatten(1)
            return f, f

    monkeypatch.setattr(rec, "build_extractor", lambda *a, **k: Pixels(torch.device("cpu")))
    monkeypatch.setattr(rec, "check_domain_data", lambda *a, **k: None)
    held = []
    real_update = rec.ReconMeter.update
    monkeypatch.setattr(rec.ReconMeter, "update", lambda self, x, xr: held.append(len(x)) or real_update(self, x, xr))
    out = rec.evaluate_tokenizer(Stub(), rec.ReconEvalConfig(n=96, batch_size=32, extractor="domain", lpips=False),
                                 train_data={"name": "fmnist"})
    from groupgen.data import DataConfig, build_dataset
    ds = build_dataset(DataConfig(name="fmnist", limit=0), "test")
    x = torch.stack([ds[i][0] for i in range(96)])
    whole = rec.rfid(x, Stub().decode_codes(Stub().encode(x)), Pixels(torch.device("cpu")), 1000)
    assert held == [32, 32, 32]
    assert out["rfid"] == pytest.approx(whole, rel=1e-9, abs=1e-12)
