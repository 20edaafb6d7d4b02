"""Foundation: config mechanism, atomic checkpoints, layout contract, token store, datasets."""
import json
import os
import pickle
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from groupgen import checkpoint as ck
from groupgen.config import ConfigError, config_hash, load_config
from groupgen.data import DataConfig, DataError, build_dataset, fmnist_arrays
from groupgen.layout import LayoutError, TokenLayout
from groupgen.tokens import TokenStore, TokenStoreError, TokenStoreWriter


@dataclass
class Inner:
    lr: float = 1e-4
    steps: int = 10
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class Outer:
    name: str = "x"
    train: Inner = field(default_factory=Inner)
    groups: list[int] = field(default_factory=lambda: [1, 2])
    flag: bool = False


def test_config_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: hello\ntrain:\n  steps: 5\n")
    cfg = load_config(Outer, p, ["train.lr=3e-3", "flag=true", "groups=[4,5]", "train.betas=[0.5,0.6]"])
    assert cfg.name == "hello" and cfg.train.steps == 5 and cfg.train.lr == 3e-3
    assert cfg.flag is True and cfg.groups == [4, 5] and cfg.train.betas == (0.5, 0.6)
    assert config_hash(cfg) == config_hash(load_config(Outer, p, ["train.lr=0.003", "flag=1", "groups=[4,5]",
                                                                  "train.betas=[0.5,0.6]"]))


def test_config_unknown_key_names_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"train.stepz.*'steps'"):
        load_config(Outer, None, ["train.stepz=3"])
    p = tmp_path / "c.yaml"
    p.write_text("trian:\n  steps: 5\n")
    with pytest.raises(ConfigError, match=r"c.yaml.*'trian'.*'train'"):
        load_config(Outer, p)


def test_config_bad_type_names_key():
    with pytest.raises(ConfigError, match=r"train.steps: expected an int, got 'many'"):
        load_config(Outer, None, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"flag: expected a bool"):
        load_config(Outer, None, ["flag=maybe"])


def _tensors(v):
    return {"model": {"w": torch.full((3, 4), float(v)), "b": torch.arange(3.0) + v}}


def test_checkpoint_roundtrip_and_latest(tmp_path):
    for s in (1, 2, 3, 4):
        ck.save_checkpoint(tmp_path, s, _tensors(s), {"config": {"a": s}}, {"opt": torch.tensor([s])}, keep_last=2)
    p = ck.latest_checkpoint(tmp_path)
    assert p.name == "step_00000004"
    assert sorted(x.name for x in tmp_path.glob("step_*")) == ["step_00000003", "step_00000004"]
    assert torch.equal(ck.load_tensors(tmp_path)["w"], torch.full((3, 4), 4.0))
    assert ck.load_meta(tmp_path)["step"] == 4 and ck.load_state(tmp_path)["opt"].item() == 4


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    ck.save_checkpoint(tmp_path, 1, _tensors(1), {"k": 1})
    calls = {"n": 0}
    real = ck.save_file

    def dying_save(sd, path):  # a crash (or a full disk) half-way through the second write
        calls["n"] += 1
        real(sd, path)
        with open(path, "r+b") as f:
            f.truncate(10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "save_file", dying_save)
    with pytest.raises(OSError):
        ck.save_checkpoint(tmp_path, 2, _tensors(2), {"k": 2})
    monkeypatch.setattr(ck, "save_file", real)
    assert calls["n"] == 1
    p = ck.latest_checkpoint(tmp_path)
    assert p.name == "step_00000001"
    assert torch.equal(ck.load_tensors(p)["w"], torch.full((3, 4), 1.0))
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".tmp")]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/groupgen_pwned",))


def test_crafted_pickle_state_is_refused(tmp_path):
    p = ck.save_checkpoint(tmp_path, 1, _tensors(1), {"k": 1}, {"x": torch.zeros(1)})
    with open(p / "state.pt", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    if os.path.exists("/tmp/groupgen_pwned"):
        os.unlink("/tmp/groupgen_pwned")
    with pytest.raises(ck.CheckpointError, match="refused"):
        ck.load_state(p)
    assert not os.path.exists("/tmp/groupgen_pwned")


def test_layout_checks():
    lay = TokenLayout(kind="grid", L=16, K=(8, 8, 4), h=4, w=4)
    assert lay.G == 3 and lay.code_dtype() == np.uint8
    assert TokenLayout.from_dict(lay.to_dict()) == lay
    assert TokenLayout(kind="seq", L=4, K=(70000,)).code_dtype() == np.uint32
    with pytest.raises(LayoutError, match="group 2 has indices in"):
        lay.check_codes(torch.full((2, 16, 3), 5))
    with pytest.raises(LayoutError, match=r"expected shape \[\.\.\., L=16, G=3\]"):
        lay.check_codes(torch.zeros(2, 16, 2, dtype=torch.long))
    with pytest.raises(LayoutError, match="K: expected"):
        lay.check_same(TokenLayout(kind="grid", L=16, K=(8, 8, 8), h=4, w=4))
    with pytest.raises(LayoutError, match="does not have L"):
        TokenLayout(kind="grid", L=15, K=(8,), h=4, w=4)


def test_token_store_roundtrip_resume_and_validation(tmp_path):
    lay = TokenLayout(kind="grid", L=4, K=(300, 5), h=2, w=2)
    rng = np.random.default_rng(0)
    codes = np.stack([rng.integers(0, 300, (10, 2, 4)), rng.integers(0, 5, (10, 2, 4))], -1)
    labels = rng.integers(0, 3, 10)
    w = TokenStoreWriter(tmp_path / "s", lay, 10, 2, 3, chunk_size=4)
    w.write_chunk(0, codes[0:4], labels[0:4])
    with pytest.raises(TokenStoreError, match="incomplete"):
        TokenStore(tmp_path / "s", require_complete=True)
    w2 = TokenStoreWriter(tmp_path / "s", lay, 10, 2, 3, chunk_size=4)  # resume: chunk 0 is kept
    assert w2.pending_chunks() == [1, 2]
    for c in w2.pending_chunks():
        a, b = w2.chunk_range(c)
        w2.write_chunk(c, codes[a:b], labels[a:b])
    w2.finalize()
    st = TokenStore(tmp_path / "s")
    assert st.codes.dtype == np.uint16 and np.array_equal(st.codes, codes) and np.array_equal(st.labels, labels)
    h = json.loads((tmp_path / "s" / "header.json").read_text())
    h["N"] = 11
    (tmp_path / "s" / "header.json").write_text(json.dumps(h))
    with pytest.raises(TokenStoreError, match="does not match header"):
        TokenStore(tmp_path / "s")
    with pytest.raises(LayoutError, match="group 1"):
        w2.write_chunk(0, np.full((4, 2, 4, 2), 7), labels[:4])


def test_fmnist_real_files():
    xtr, ytr = fmnist_arrays("train")
    xte, yte = fmnist_arrays("test")
    assert xtr.shape == (60000, 28, 28) and xte.shape == (10000, 28, 28)
    assert set(np.unique(ytr)) == set(range(10)) and np.bincount(yte).tolist() == [1000] * 10
    ds = build_dataset(DataConfig(name="fmnist", image_size=32, channels=3, limit=100), "test")
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.min() == -1.0 and x.max() <= 1.0 and ds.num_classes == 10
    assert torch.all(x[:, :2, :] == -1.0)  # the 2-pixel pad border is black


def test_fmnist_missing_names_install_command(tmp_path):
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        fmnist_arrays("train", root=str(tmp_path))


def test_imagefolder_modes_and_corrupt_file(tmp_path):
    from PIL import Image

    for c, mode in (("a", "L"), ("b", "CMYK"), ("c", "RGBA")):
        (tmp_path / c).mkdir()
        Image.new(mode, (40, 30)).save(tmp_path / c / "x.png" if mode != "CMYK" else tmp_path / c / "x.jpg")
    (tmp_path / "c" / "bad.jpg").write_bytes(b"not an image")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=16, channels=3)
    ds = build_dataset(cfg, "train", train=False)
    assert ds.class_names == ["a", "b", "c"] and len(ds) == 4
    assert ds[0][0].shape == (3, 16, 16) and ds[1][0].shape == (3, 16, 16)
    bad = [i for i, (f, _) in enumerate(ds.files) if f.name == "bad.jpg"][0]
    with pytest.raises(DataError, match="bad.jpg"):
        ds[bad]
    cfg.skip_corrupt = True
    ds = build_dataset(cfg, "train", train=True)
    x, _ = ds[bad]
    assert x.shape == (3, 16, 16) and ds.skipped and ds.skipped[0].endswith("bad.jpg")
