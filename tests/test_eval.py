"""eval/: FID/IS/PR numerics, domain classifier, sample-file validation, weights errors (reconstruction
metrics and layout statistics: test_eval_tokenizer_metrics.py)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from eval import fidelity as fd
from eval.domain import (DomainConfig, DomainExtractor, class_conditional_accuracy, load_or_train,
                         register_with_torch_fidelity)
from eval.fidelity import EvalError
from eval.generation import GenEvalConfig, evaluate_samples
from eval.generation import main as gen_main

TINY = dict(train_limit=2000, test_limit=2000, epochs=1, width=8, hidden=32, batch_size=64, lr=5e-3)


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ------------------------------------------------------------------ FID / IS / PR numerics

def test_fid_matches_scipy_and_self_is_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 16))
    b = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
    ours = fd.fid_from_features(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    ref = scipy_fid(a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64))
    assert ref > 1.0
    assert abs(ours - ref) <= 1e-6 * max(1.0, abs(ref))
    self_fid = fd.fid_from_features(torch.from_numpy(a), torch.from_numpy(a))
    assert abs(self_fid) < 1e-6
    # statistics computed once and compared against themselves and from a cached-like dict
    s = fd.fid_stats(torch.from_numpy(b))
    assert abs(fd.fid_from_stats(s, {"mu": s["mu"].astype(np.float32), "sigma": s["sigma"]})) < 1e-5
    with pytest.raises(EvalError, match="dimension"):
        fd.fid_from_stats(s, fd.fid_stats(torch.randn(50, 8)))


def test_inception_score_matches_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(64, 5) * 2
    p = logits.double().softmax(1)
    q = p.mean(0, keepdim=True)
    hand = math.exp(float((p * (p.log() - q.log())).sum(1).mean()))
    m, s = fd.inception_score(logits, splits=1)
    assert abs(m - hand) < 1e-9 and s == 0.0
    # confident and uniformly spread over C classes -> IS = C
    confident = torch.eye(7).repeat(10, 1) * 100
    assert abs(fd.inception_score(confident, splits=1)[0] - 7.0) < 1e-6
    assert abs(fd.inception_score(torch.zeros(20, 7), splits=1)[0] - 1.0) < 1e-9


def test_precision_recall_sanity():
    torch.manual_seed(0)
    a = torch.randn(200, 8)
    same = fd.precision_recall(a, a.clone(), k=3)
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    far = fd.precision_recall(a + 100.0, a, k=3)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    # generated covers only half the real modes: precision high, recall ~half
    real = torch.cat([torch.randn(200, 2), torch.randn(200, 2) + 50])
    gen = torch.randn(200, 2)
    pr = fd.precision_recall(gen, real, k=3)
    assert pr["precision"] > 0.9 and 0.4 < pr["recall"] < 0.6
    with pytest.raises(EvalError, match="k=3"):
        fd.precision_recall(a[:3], a, k=3)


# ------------------------------------------------------------------ domain classifier

@pytest.fixture(scope="module")
def tiny_domain(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    cfg = DomainConfig(**TINY)
    net, info = load_or_train(cfg, cache)
    return cfg, cache, net, info


def test_domain_classifier_learns_and_class_accuracy_of_real_images(tiny_domain):
    cfg, cache, net, info = tiny_domain
    assert info["test_acc"] > 0.5, info  # chance is 0.1
    from groupgen.data import fmnist_arrays

    x, y = fmnist_arrays("test")
    x, y = x[: cfg.test_limit], y[: cfg.test_limit]
    u8 = np.repeat(np.pad(x, ((0, 0), (2, 2), (2, 2)))[..., None], 3, axis=-1)  # "pad" 28 -> 32, RGB
    ext = DomainExtractor(cfg, cache=cache)  # cached: loads, does not retrain
    assert ext.info["path"] == info["path"]
    feats, logits = fd.extract(ext, u8, 1000)
    assert feats.shape == (len(x), cfg.hidden) and logits.shape == (len(x), 10)
    assert abs(class_conditional_accuracy(logits, y) - info["test_acc"]) < 1e-3
    # grey 1-channel input at another size is accepted (resized to the classifier's 32)
    f2, _ = ext(torch.from_numpy(x[:4, None].copy()))
    assert f2.shape == (4, cfg.hidden)
    with pytest.raises(EvalError, match="labels"):
        class_conditional_accuracy(logits[:5], np.array([0, 1, 2, 3, 10]))


def test_domain_extractor_registered_with_torch_fidelity_gives_same_fid(tiny_domain):
    import torch_fidelity

    cfg, cache, net, info = tiny_domain
    register_with_torch_fidelity()
    from groupgen.data import fmnist_arrays

    x, _ = fmnist_arrays("test")
    a = np.repeat(x[:150, None], 3, axis=1)
    b = np.repeat(x[150:300, None], 3, axis=1)

    class DS(torch.utils.data.Dataset):
        def __init__(self, arr):
            self.arr = torch.from_numpy(arr)

        def __len__(self):
            return len(self.arr)

        def __getitem__(self, i):
            return self.arr[i]

    m = torch_fidelity.calculate_metrics(input1=DS(a), input2=DS(b), fid=True, isc=True, cuda=False,
                                         feature_extractor="groupgen-domain", batch_size=50, cache=False, save_cpu_ram=True,
                                         feature_extractor_weights_path=info["path"], verbose=False)
    ext = DomainExtractor(cfg, cache=cache)
    fa, la = fd.extract(ext, a.transpose(0, 2, 3, 1), 50)
    fb, _ = fd.extract(ext, b.transpose(0, 2, 3, 1), 50)
    assert abs(m["frechet_inception_distance"] - fd.fid_from_features(fa, fb)) < 1e-4
    assert abs(m["inception_score_mean"] - fd.inception_score(la)[0]) < 1e-4


def test_generation_eval_end_to_end_with_domain_extractor(tiny_domain, tmp_path, capsys):
    cfg, cache, net, info = tiny_domain
    from groupgen.data import fmnist_arrays

    x, y = fmnist_arrays("train")
    real = np.repeat(np.pad(x[:300], ((0, 0), (2, 2), (2, 2)))[..., None], 3, axis=-1)
    fd.save_samples_npz(tmp_path / "real.npz", real, y[:300])
    noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    fd.save_samples_npz(tmp_path / "noise.npz", noise)
    over = ["extractor=domain", f"cache={cache}", "ref_n=300", "isc_splits=2"] + \
        [f"domain.{k}={v}" for k, v in TINY.items()]
    out = gen_main(["--samples", str(tmp_path / "real.npz"), "--ref", "fmnist", "--out",
                    str(tmp_path / "m.json")] + over)
    assert json.loads((tmp_path / "m.json").read_text())["fid"] == out["fid"]
    assert out["num_samples"] == 300 and out["ref_n"] == 300 and out["comparable_to_papers"] is False
    assert out["class_acc"] > 0.5 and out["precision"] > 0.5 and out["recall"] > 0.5
    cfg2 = GenEvalConfig(extractor="domain", cache=cache, ref_n=300, isc_splits=2, domain=cfg)
    bad = evaluate_samples(noise, None, "fmnist", cfg2)
    assert bad["fid"] > 5 * out["fid"] and "class_acc" not in bad
    refs = list(Path(cache).glob("refstats/*.npz"))
    assert len(refs) == 1  # second evaluation reused the cached reference statistics


def test_equal_n_fid_floor_is_real_vs_real_at_the_samples_n(tiny_domain, tmp_path):
    """Issue 24: a sample FID at N is read against real train images scored the same way at the same N,
    over FLOOR_DRAWS seeded draws; small-N FID is biased upwards, so that floor exceeds the 10k one."""
    import dataclasses

    from eval.generation import FLOOR_DRAWS, fid_floor

    cfg, cache, net, info = tiny_domain
    g = GenEvalConfig(extractor="domain", cache=cache, isc_splits=2, domain=cfg)   # reference: all 10k test images
    fl = fid_floor("fmnist", 200, (32, 32), g, seed=7)
    assert fl["n"] == 200 and fl["draws"] == FLOOR_DRAWS == 5 and fl["seeds"] == [7, 8, 9, 10, 11]
    assert len(fl["fid"]) == 5 and fl["ref_n"] == 10000 and fl["split"] == "train"
    # draw i is the seeded subset (seed + i) of the train split, scored exactly as samples are
    real, _ = fd.dataset_images("fmnist", "train", (32, 32), 200, "pad", seed=8)
    assert len(real) == 200
    assert fl["fid"][1] == evaluate_samples(real, None, "fmnist", dataclasses.replace(g, pr=False))["fid"]
    f = np.asarray(fl["fid"])
    assert fl["fid_mean"] == pytest.approx(f.mean(), rel=1e-12) and fl["fid_std"] == pytest.approx(f.std(ddof=1))
    assert fl["fid_min"] == f.min() and fl["fid_max"] == f.max() and fl["fid_std"] > 0
    # deterministic for a seed, other draws for another seed
    assert fid_floor("fmnist", 200, (32, 32), g, seed=7)["fid"] == fl["fid"]
    assert fid_floor("fmnist", 200, (32, 32), g, draws=1, seed=100)["fid"][0] not in fl["fid"]
    # the 10k floor (all 10,000 of 60,000 train images' worth of statistics) sits far below every N=200 draw
    big = fid_floor("fmnist", 10000, (32, 32), g, draws=1)
    assert big["n"] == 10000 and fl["fid_min"] > 3 * big["fid_mean"], (fl, big)
    with pytest.raises(EvalError, match="another split"):
        fid_floor("fmnist:train", 200, (32, 32), g)
    (tmp_path / "imgs").mkdir()
    with pytest.raises(EvalError, match="not a dataset"):
        fid_floor(str(tmp_path / "imgs"), 200, (32, 32), g)


def _class_major_samples(per_class: int = 500, classes: int = 4):
    """Images whose pixel (0,0,0) is the class, written class after class (balanced sampling's
    order), and an extractor whose features are a class centre plus noise read from other pixels."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), per_class)
    imgs = rng.integers(0, 256, (len(labels), 4, 4, 3), dtype=np.uint8)
    imgs[:, 0, 0, 0] = labels

    class ClassCentres(fd.Extractor):
        name, feature_dim = "class-centres", 8

        def __call__(self, x):
            onehot = torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 8).float()
            noise = x[:, 1, 1:3].flatten(1).float() / 64 - 2   # 8 values, ~uniform in [-2, 2)
            return onehot * 20 + noise, onehot * 10

    return imgs, labels, ClassCentres(torch.device("cpu"))


@pytest.mark.parametrize("subset", ["num_samples", "pr_max"])
def test_generated_side_subsets_are_seeded_not_a_prefix(subset, monkeypatch):
    """A prefix of class-major samples holds only the first classes: recall and IS would halve."""
    import eval.generation as gen

    imgs, labels, ext = _class_major_samples()
    real_imgs, _, _ = _class_major_samples()
    rf, _ = fd.extract(ext, real_imgs, 500)
    ref = {**fd.fid_stats(rf), "pr_features": rf, "n": len(rf)}
    monkeypatch.setattr(gen, "build_extractor", lambda *a, **k: ext)
    monkeypatch.setattr(gen, "reference_stats", lambda *a, **k: ref)
    cfg = GenEvalConfig(isc_splits=1, **({"num_samples": 1000} if subset == "num_samples" else {"pr_max": 1000}))
    out = evaluate_samples(imgs, labels, "unused", cfg)
    assert out["num_samples"] == (1000 if subset == "num_samples" else 2000)
    assert out["recall"] > 0.9 and out["precision"] > 0.9   # the first 1000 cover 2 of 4 classes: recall ~0.5
    assert out["is"] > 3.8                                  # 4 confident, balanced classes (prefix: ~2)
    assert out["fid"] < 1.0                                 # prefix: ~200 (two class centres missing)
    # the subset is the documented seeded one, so runs stay comparable
    idx = fd.seeded_subset(2000, 1000, seed=gen.SAMPLES_SEED)
    assert np.array_equal(idx, fd.seeded_subset(2000, 1000, seed=gen.SAMPLES_SEED)) and len(set(labels[idx])) == 4


def test_domain_extractor_must_match_a_dataset_reference(tiny_domain, tmp_path):
    cfg, cache, net, info = tiny_domain   # trained on fmnist
    imgs, labels = fd.dataset_images("digits", "test", (32, 32), 100)
    e_cfg = GenEvalConfig(extractor="domain", cache=cache, ref_n=100, isc_splits=1, domain=cfg)
    for ref in ("digits", "digits:train"):
        with pytest.raises(EvalError, match=r"'digits' dataset.*trained on 'fmnist'.*domain\.dataset=digits"):
            evaluate_samples(imgs, labels, ref, e_cfg)
    from eval.generation import check_domain_ref

    check_domain_ref("fmnist:train", e_cfg)                    # same dataset: fine
    check_domain_ref(str(tmp_path / "ref.npz"), e_cfg)         # files and folders cannot be checked
    check_domain_ref("digits", GenEvalConfig(extractor="inception"))


# ------------------------------------------------------------------ inputs and weights

def test_npz_validation_errors(tmp_path):
    good = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(EvalError, match="does not exist"):
        fd.load_samples_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "nokey.npz", images=good)
    with pytest.raises(EvalError, match=r"no 'arr_0'.*images"):
        fd.load_samples_npz(tmp_path / "nokey.npz")
    np.savez(tmp_path / "float.npz", arr_0=good.astype(np.float32))
    with pytest.raises(EvalError, match="uint8.*float32"):
        fd.load_samples_npz(tmp_path / "float.npz")
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((4, 3, 8, 8), np.uint8))
    with pytest.raises(EvalError, match=r"\[N,H,W,3\].*\[4, 3, 8, 8\]"):
        fd.load_samples_npz(tmp_path / "nchw.npz")
    np.savez(tmp_path / "lab.npz", arr_0=good, labels=np.zeros(3, np.int64))
    with pytest.raises(EvalError, match=r"labels.*\[4\]"):
        fd.load_samples_npz(tmp_path / "lab.npz")
    np.savez(tmp_path / "obj.npz", arr_0=good, labels=np.array([{"a": 1}] * 4, dtype=object))
    with pytest.raises(EvalError, match="pickle"):
        fd.load_samples_npz(tmp_path / "obj.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(EvalError, match="not a readable"):
        fd.load_samples_npz(tmp_path / "junk.npz")
    np.savez(tmp_path / "grey.npz", arr_0=np.full((2, 8, 8), 7, np.uint8), labels=np.array([1, 2]))
    x, lab = fd.load_samples_npz(tmp_path / "grey.npz")
    assert x.shape == (2, 8, 8, 3) and (x == 7).all() and lab.tolist() == [1, 2]


def test_missing_inception_weights_error_says_how_to_provide(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.delenv("GROUPGEN_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(EvalError) as e:
        fd.build_extractor("inception", torch.device("cpu"))
    msg = str(e.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in msg and "https://github.com/toshas/torch-fidelity" in msg
    assert str(tmp_path / "th" / "hub" / "checkpoints") in msg and "GROUPGEN_INCEPTION_WEIGHTS" in msg
    with pytest.raises(EvalError, match="does not exist"):
        fd.resolve_inception_weights(str(tmp_path / "nope.pth"))
    f = tmp_path / "th" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"x")
    assert fd.resolve_inception_weights() == f  # torch-fidelity's cache location is found


def test_npz_single_hwc_image_is_refused(tmp_path):
    np.savez(tmp_path / "hwc.npz", arr_0=np.zeros((32, 32, 3), np.uint8))   # one RGB image, no batch axis
    with pytest.raises(EvalError, match=r"hwc\.npz.*\[32, 32, 3\].*one \[H,W,C\] image.*\[N,H,W,3\].*grey \[N,H,W\]"):
        fd.load_samples_npz(tmp_path / "hwc.npz")
    np.savez(tmp_path / "grey.npz", arr_0=np.zeros((5, 32, 32), np.uint8))   # a grey batch still loads
    assert fd.load_samples_npz(tmp_path / "grey.npz")[0].shape == (5, 32, 32, 3)


class _NotATensor:
    pass


def test_inception_weights_that_are_not_a_plain_state_dict_are_refused(tmp_path):
    f = tmp_path / "evil.pth"
    torch.save({"w": _NotATensor()}, f)   # needs pickle's full unpickler: torch-fidelity would run it
    with pytest.raises(EvalError, match=r"evil\.pth: not a plain state dict"):
        fd.build_extractor("inception", torch.device("cpu"), inception_weights=str(f))


def test_inception_extractor_with_synthetic_weights(tmp_path, monkeypatch):
    """The paper-comparable path end to end (weights check, hash in the name, NHWC -> NCHW, batching)
    on seeded random weights, as the real ones are not available offline."""
    import torch_fidelity.feature_extractor_inceptionv3 as fi

    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    with monkeypatch.context() as m:   # build the architecture without loading any weights
        m.setattr(torch.nn.Module, "load_state_dict", lambda self, *a, **k: None)
        shape = fi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                               feature_extractor_weights_path=str(empty)).state_dict()
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in shape.items():   # He-initialised convs, identity batch norms: activations stay O(1)
        if not v.is_floating_point():
            sd[k] = v
        elif v.dim() >= 2:
            sd[k] = torch.randn(v.shape, generator=g) * math.sqrt(2 / v[0].numel())
        else:
            sd[k] = torch.ones_like(v) if k.endswith(("running_var", ".weight")) else torch.zeros_like(v)
    weights = tmp_path / "weights-inception-synthetic.pth"
    torch.save(sd, weights)
    ext = fd.build_extractor("inception", torch.device("cpu"), inception_weights=str(weights))
    assert ext.name == f"inception-v3-compat-{fd.file_hash(weights)}" and ext.feature_dim == 2048
    imgs = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    feats, logits = fd.extract(ext, imgs, batch_size=1)
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008) and feats.dtype == torch.float32
    with torch.no_grad():   # torch-fidelity's network on the same images as NCHW uint8
        f_ref, l_ref = ext.net(torch.from_numpy(imgs).permute(0, 3, 1, 2))
    assert (feats[0] - feats[1]).abs().max() > 1e-3          # the features do depend on the image
    torch.testing.assert_close(feats, f_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, l_ref, rtol=1e-4, atol=1e-5)


def test_parse_ref():
    assert fd.parse_ref("fmnist", "test") == ("dataset", "fmnist", "test")
    assert fd.parse_ref("fmnist:train", "test") == ("dataset", "fmnist", "train")
    assert fd.parse_ref("ref.npz", "test")[0] == "npz"
    with pytest.raises(EvalError, match="not an .npz"):
        fd.parse_ref("imagenet", "test")


def test_reference_npz_forms_agree(tiny_domain, tmp_path):
    cfg, cache, net, info = tiny_domain
    ext = DomainExtractor(cfg, cache=cache)
    imgs, _ = fd.dataset_images("fmnist", "test", (32, 32), 200)
    fd.save_samples_npz(tmp_path / "ref_imgs.npz", imgs)
    a = fd.reference_stats(str(tmp_path / "ref_imgs.npz"), ext, (32, 32), cache=cache)
    b = fd.reference_stats("fmnist", ext, (32, 32), n=200, cache=cache)
    assert abs(fd.fid_from_stats(a, b)) < 1e-6 and a["n"] == b["n"] == 200
    np.savez(tmp_path / "ref_stats.npz", mu=a["mu"], sigma=a["sigma"])  # ADM-style statistics only
    c = fd.reference_stats(str(tmp_path / "ref_stats.npz"), ext, (32, 32), cache=cache)
    assert c["pr_features"] is None and np.array_equal(c["mu"], a["mu"])
    again = fd.reference_stats(str(tmp_path / "ref_imgs.npz"), ext, (32, 32), cache=cache)
    assert again["cached"] and np.array_equal(again["sigma"], a["sigma"])
    np.savez(tmp_path / "bad.npz", mu=np.zeros(2048), sigma=np.eye(2048)[:2])  # Inception stats, no images
    with pytest.raises(EvalError, match="mu'/'sigma' of dimension 32"):
        fd.reference_stats(str(tmp_path / "bad.npz"), ext, (32, 32), cache=cache)
