"""Foundation: config mechanism, atomic checkpoints, layout contract, token store, datasets."""
import json
import os
import pickle
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from groupgen import checkpoint as ck
from groupgen.config import ConfigError, config_hash, load_config, to_dict, with_defaults
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


def test_with_defaults_fills_only_the_fields_a_saved_config_predates():
    saved = to_dict(load_config(Outer, None, ["train.lr=3e-3"]))
    del saved["train"]["steps"], saved["flag"]      # written before these fields existed
    filled = with_defaults(saved, to_dict(Outer()))
    assert filled == to_dict(load_config(Outer, None, ["train.lr=3e-3"]))   # kept values stay, missing = default
    assert filled["train"]["lr"] == 3e-3 and filled["train"]["steps"] == Inner().steps
    assert with_defaults(None, to_dict(Outer())) is None and with_defaults(5, {}) == 5


def test_a_field_added_later_keeps_the_hashes_of_stages_cached_before_it():
    """A stage's cache key is the hash of its config: a field added at its default (the old behaviour) must
    not change it, or every cached stage of a long comparison retrains (it did: a new quantizer field sent
    the verdict run back to its first tokenizer). At any other value it is hashed like any field."""
    from groupgen.config import added_field

    @dataclass
    class Inner2(Inner):                            # Inner with two fields added later
        schedule: list[int] = added_field(default_factory=list)
        iters: int = added_field(default=5)

    @dataclass
    class Outer2(Outer):
        train: Inner2 = field(default_factory=Inner2)

    old = to_dict(Outer())                          # the config as it was before the two fields existed
    new = Outer2()
    assert config_hash(new) == config_hash(old) == config_hash(Outer())
    assert config_hash({"cfg": new, "up": "abc"}) == config_hash({"cfg": old, "up": "abc"})   # inside a key
    for changed in (Outer2(train=Inner2(iters=6)), Outer2(train=Inner2(schedule=[3]))):
        assert config_hash(changed) != config_hash(old)
    assert config_hash(Outer2(flag=True)) == config_hash(Outer(flag=True)) != config_hash(old)
    assert to_dict(new)["train"]["iters"] == 5      # saved configs still carry every field


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


def test_config_override_into_empty_yaml_section(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: hello\ntrain:\n#  steps: 5\n")  # every key commented out: the section loads as None
    cfg = load_config(Outer, p, ["train.steps=7"])
    assert cfg.train.steps == 7 and cfg.train.lr == 1e-4
    assert load_config(Outer, p).train == Inner()
    p.write_text("train: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: config section 'train': expected a mapping, got int 3"):
        load_config(Outer, p, ["train.steps=7"])


def test_config_string_override_is_taken_as_written():
    # YAML would read 0123 as octal 83 and 1_000 as 1000; a str field keeps the text
    assert load_config(Outer, None, ["name=0123"]).name == "0123"
    assert load_config(Outer, None, ["name=1_000"]).name == "1_000"
    assert load_config(Outer, None, ["name=true"]).name == "true"
    assert load_config(Outer, None, ['name="a b"']).name == "a b"
    assert load_config(Outer, None, ["train.steps=1_000"]).train.steps == 1000  # non-str fields: YAML


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


def test_save_removes_temp_dirs_left_by_a_killed_save(tmp_path):
    ck.save_checkpoint(tmp_path, 1, _tensors(1), {"k": 1})
    stale = tmp_path / ".tmp-step_00000002-abc123"  # what SIGKILL inside write_checkpoint_dir leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"torn")
    ck.save_checkpoint(tmp_path, 2, _tensors(2), {"k": 2})
    assert not stale.exists() and ck.latest_checkpoint(tmp_path).name == "step_00000002"
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".tmp")]


def _dying_writes(monkeypatch):
    """Every file opened for writing from now on takes half of what it is given, then the disk is full."""
    import io

    real_open = io.open

    class Half:
        def __init__(self, f):
            self.f = f

        def write(self, s):
            self.f.write(s[: len(s) // 2])
            self.f.flush()
            raise OSError(28, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __getattr__(self, k):
            return getattr(self.f, k)

    def dying_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return Half(f) if "w" in mode else f

    monkeypatch.setattr(io, "open", dying_open)


def test_metrics_truncate_after_is_atomic(tmp_path, monkeypatch):
    from groupgen.runs import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    for s in (10, 20, 30):
        log.write(step=s, loss=1.0 / s)
    before = log.path.read_text()
    _dying_writes(monkeypatch)
    with pytest.raises(OSError, match="No space"):
        log.truncate_after(20)
    monkeypatch.undo()
    assert log.path.read_text() == before  # a failed rewrite keeps every row, torn nothing
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    log.truncate_after(20)
    assert [json.loads(ln)["step"] for ln in log.path.read_text().splitlines()] == [10, 20]


def test_rng_state_restores_numpy_cached_gaussian(tmp_path):
    np.random.seed(0)
    np.random.standard_normal()  # draws a pair: the second is cached for the next call
    ck.save_checkpoint(tmp_path, 1, _tensors(1), {"k": 1}, {"rng": ck.rng_state()})
    want = np.random.standard_normal(3)
    np.random.standard_normal(5)
    ck.set_rng_state(ck.load_state(tmp_path)["rng"])  # through state.pt, read with weights_only=True
    assert np.array_equal(np.random.standard_normal(3), want)


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


def test_token_store_header_mismatch_names_each_differing_key(tmp_path):
    lay = TokenLayout(kind="grid", L=4, K=(16,), h=2, w=2)
    TokenStoreWriter(tmp_path / "s", lay, 10, 1, 10, meta={"tokenizer_hash": "aaa"})
    with pytest.raises(TokenStoreError) as e:
        TokenStoreWriter(tmp_path / "s", lay, 12, 1, 10, meta={"tokenizer_hash": "bbb"})
    msg = str(e.value)
    assert "N: existing 10 vs new 12" in msg and "tokenizer_hash: existing 'aaa' vs new 'bbb'" in msg
    assert "num_classes" not in msg and "layout" not in msg  # keys that agree are not listed


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


def _image_tree(root, splits, classes, per_class):
    from PIL import Image

    for sp in splits:
        for c in classes:
            d = root / sp / c if sp else root / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (12, 12)).save(d / f"{i:03d}.png")


def test_imagefolder_split_folders(tmp_path):
    _image_tree(tmp_path / "inet", ("train", "val"), ("n01", "n02"), 2)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path / "inet"), image_size=8, channels=3)
    ds = build_dataset(cfg, "test")  # ImageNet has no test folder: its labelled held-out split is val
    assert ds.class_names == ["n01", "n02"] and all(f.parts[-3] == "val" for f, _ in ds.files)
    _image_tree(tmp_path / "tv", ("train", "test"), ("a",), 1)
    with pytest.raises(DataError, match=r"no 'val' split folder; it has split folders \['train', 'test'\]"):
        build_dataset(DataConfig(name="imagefolder", root=str(tmp_path / "tv"), image_size=8), "val")
    _image_tree(tmp_path / "flat", ("",), ("a", "b"), 1)  # no split folders: every split reads the classes
    assert build_dataset(DataConfig(name="imagefolder", root=str(tmp_path / "flat"), image_size=8),
                         "test").class_names == ["a", "b"]


def test_imagefolder_limit_spans_the_classes(tmp_path):
    _image_tree(tmp_path, ("val",), [f"c{i}" for i in range(5)], 4)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=8, channels=3, limit=7)
    ds = build_dataset(cfg, "val")
    labels = [c for _, c in ds.files]
    assert len(labels) == 7 and set(labels) == set(range(5)) and labels == sorted(labels)
    assert ds.files == build_dataset(cfg, "val").files  # seeded: the same subset every time
    assert len({f for f, _ in ds.files}) == 7


def test_atomic_writes_respect_the_umask(tmp_path):
    """Files written atomically get the mode a plain open() gives (0666 less the umask), not
    mkstemp's 0600: on a shared filesystem others must be able to read metrics and headers."""
    import os
    import stat
    from groupgen.checkpoint import atomic_copyfile, atomic_write_text
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        atomic_copyfile(tmp_path / "a.json", tmp_path / "b.json")
        ckdir = ck.save_checkpoint(tmp_path / "ck", 1, {"model": {"w": torch.zeros(2)}}, {"kind": "x"})
        os.umask(0o077)
        atomic_write_text(tmp_path / "c.json", "{}")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(tmp_path / p).st_mode)  # noqa: E731
    assert mode("a.json") == mode("b.json") == 0o644 and mode("c.json") == 0o600
    assert stat.S_IMODE(os.stat(ckdir).st_mode) == 0o755
