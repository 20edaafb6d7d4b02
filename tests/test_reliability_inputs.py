"""Reliability through the real CLIs: bad input fails with an error naming the file, key or value
(expected vs got) and leaves what was already written untouched; untrusted files (crafted pickles,
object arrays) are refused without being unpickled. The subprocess work runs once per session in
``_campaign.campaign``."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from _campaign import (SAMPLE_ARGS, TOK_ARGS, TOK_CFG, Payload, _arrays, case, got, last_row, latest_step, rows,
                       unchanged)
from groupgen.checkpoint import CheckpointError, load_tensors, resolve_checkpoint
from groupgen.config import load_config
from groupgen.data import DataConfig, DataError, build_dataset
from groupgen.tokens import TokenStore, TokenStoreError

# ====================================================================== bad input, clear errors
def test_cli_unknown_key_and_wrong_type_are_named_and_run_dir_untouched(campaign):
    for name, pat in [("tok_unknown_key", r"unknown config key 'train.stepz'.*'steps'"),
                      ("real_unknown_key", r"unknown config key 'train.stepz'.*'steps'"),
                      ("ar_unknown_key", r"unknown config key 'train.stepz'.*'steps'"),
                      ("tok_wrong_type", r"train.batch_size: expected an int, got 'eight'"),
                      ("ar_wrong_type", r"train.steps: expected an int, got 'many'"),
                      ("samp_unknown_key", r"unknown config key 'cfg_scal'.*'cfg_scale'")]:
        code, err = case(campaign, name)
        assert code != 0 and re.search(pat, err), (name, code, err[-1500:])
    for name in ("tok_unknown_key", "tok_wrong_type", "ar_unknown_key", "ar_wrong_type"):
        assert unchanged(campaign, name), name


def test_cli_inconsistent_sizes_are_named(campaign):
    code, err = case(campaign, "tok_latent_vs_groups")
    assert code != 0 and "model.embed_dim=6" in err and "G=4" in err, err[-1500:]
    code, err = case(campaign, "ar_dim_vs_heads")
    assert code != 0 and "dim 66 is not divisible by n_head 4" in err, err[-1500:]
    assert unchanged(campaign, "ar_dim_vs_heads")
    code, err = case(campaign, "tok_changed_config")
    assert code != 0 and "config differs" in err and "train.lr" in err, err[-1500:]


def test_rejected_tokenizer_config_leaves_existing_run_dir_untouched(campaign):
    assert unchanged(campaign, "tok_latent_vs_groups") and unchanged(campaign, "tok_changed_config")


def test_token_store_that_does_not_match_its_array_or_the_checkpoint(campaign):
    code, err = case(campaign, "ar_header_vs_array")
    assert code != 0 and re.search(r"codes.npy: shape \[64, 2, 16, 2\] does not match header \[70, 2, 16, 2\]", err)
    code, err = case(campaign, "ar_layout_vs_ckpt")
    assert code != 0 and re.search(r"K: checkpoint .* \(8, 8\) vs token store .* \(16, 8\)", err), err[-1500:]
    assert unchanged(campaign, "ar_layout_vs_ckpt")


def test_token_store_header_checks(tmp_path, store):
    def variant(name, edit_header=None, edit=None):
        d = Path(shutil.copytree(store, tmp_path / name))
        if edit_header:
            h = json.loads((d / "header.json").read_text())
            edit_header(h)
            (d / "header.json").write_text(json.dumps(h))
        if edit:
            edit(d)
        return d

    cases = [
        (variant("dtype", lambda h: h.update(dtype="uint16")), r"dtype uint8 vs header uint16"),
        (variant("nokey", lambda h: h.pop("num_classes")), r"missing key 'num_classes'"),
        (variant("incomplete", lambda h: h.update(complete=False)), r"incomplete"),
        (variant("layout", lambda h: h["layout"].update(L=9)), r"bad layout: grid layout 4x4 does not have L=9"),
        (variant("labels32", edit=lambda d: np.save(d / "labels.npy", np.zeros(64, np.int32))), r"expected int64 \[64\]"),
        (variant("range", edit=lambda d: np.save(d / "codes.npy", np.full((64, 2, 16, 2), 8, np.uint8))),
         r"group 0 holds index 8 >= K=8"),
        (variant("classes", lambda h: h.update(num_classes=2)), r"labels outside \[0, 2\)"),
    ]
    for d, pat in cases:
        with pytest.raises(TokenStoreError, match=pat):
            TokenStore(d)


def test_unreadable_token_arrays_name_the_file(tmp_path, store):
    d = Path(shutil.copytree(store, tmp_path / "trunc"))
    raw = (d / "codes.npy").read_bytes()
    (d / "codes.npy").write_bytes(raw[: len(raw) // 2])   # an interrupted copy
    with pytest.raises(TokenStoreError, match="codes.npy"):
        TokenStore(d)


def _nan_case(campaign, name, pat, run_name):
    code, err = case(campaign, name)
    m = re.search(pat, err)
    assert code != 0 and m, (name, err[-1500:])
    bad, run = int(m.group(1)), got(campaign, "batch")["dir"] / run_name
    assert bad >= 2 and latest_step(run) == bad - 1, (name, bad, latest_step(run))
    assert f"step_{bad - 1:08d}" in err                                  # the message names the kept one
    # the loss of step `bad` may be finite and logged; its update is what made the weights non-finite
    assert all(np.isfinite(r["loss"]) for r in rows(run)) and last_row(run) <= bad
    return run


def test_nan_loss_stops_keeps_last_good_checkpoint_and_says_where(campaign):
    _nan_case(campaign, "ar_nan", r"non-finite (?:loss|weights).* at step (\d+)", "a_nan")
    run = _nan_case(campaign, "tok_nan", r"non-finite tokenizer loss at step (\d+)", "t_nan")
    assert all(torch.isfinite(v).all() for v in load_tensors(run, "model").values())


def test_ar_last_good_checkpoint_after_nan_has_finite_weights(campaign):
    run = _nan_case(campaign, "ar_nan", r"non-finite (?:loss|weights).* at step (\d+)", "a_nan")
    for name in ("model", "ema"):
        bad = [k for k, v in load_tensors(run, name).items() if not torch.isfinite(v).all()]
        assert not bad, f"{resolve_checkpoint(run)}/{name}.safetensors: non-finite {bad[:4]}"


def test_missing_pretrained_weights_offline_say_what_to_provide(campaign):
    code, err = case(campaign, "tok_lpips_missing")
    assert code != 0 and "vgg16-397923af.pth" in err and "lpips_vgg_path" in err, err[-1500:]
    code, err = case(campaign, "eval_no_inception")
    assert code == 2 and "weights-inception-2015-12-05-6726825d.pth" in err and "GROUPGEN_INCEPTION_WEIGHTS" in err


def test_sampling_class_id_out_of_range_fails_before_any_work(campaign):
    code, err = case(campaign, "samp_class_range")
    assert code != 0 and "class id 7 out of range: the model has 3 classes" in err, err[-1500:]
    assert not (got(campaign, "batch")["dir"] / "s_range" / "shards").exists()


def _png(path, seed=0, size=32):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def test_imagefolder_truncated_and_corrupt_images_are_named(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "a" / "good.png")
    trunc = _png(root / "b" / "cut.png", 1)
    trunc.write_bytes(trunc.read_bytes()[:1500])
    junk = root / "b" / "junk.jpg"
    junk.write_bytes(b"\xff\xd8 not really a jpeg")
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=8, channels=3)
    ds = build_dataset(cfg, "train")
    assert ds[0][0].shape == (3, 8, 8)
    for i, f in ((1, trunc), (2, junk)):
        with pytest.raises(DataError, match=re.escape(str(f))):
            ds[i]
    skip = DataConfig(**{**cfg.__dict__, "skip_corrupt": True})
    with pytest.raises(DataError, match=r"class folders \['b'\] have no readable image left"):
        build_dataset(skip, "train")                     # dropping both of b's files would empty the class
    ok = _png(root / "b" / "ok.png", 2)
    ds = build_dataset(skip, "train")                    # unreadable files are dropped, never replaced
    assert [(f, y) for f, y in ds.files] == [(root / "a" / "good.png", 0), (ok, 1)]
    assert ds.skipped == [str(trunc), str(junk)] and ds[1][0].shape == (3, 8, 8)


def test_imagefolder_skip_corrupt_with_no_readable_image_is_a_clear_error(tmp_path):
    for i in range(2):
        (tmp_path / "a").mkdir(exist_ok=True)
        (tmp_path / "a" / f"{i}.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="no readable image among 2 files"):   # refused before any work
        build_dataset(DataConfig(name="imagefolder", root=str(tmp_path), skip_corrupt=True), "train")


def test_empty_missing_and_single_class_folders(tmp_path, campaign):
    def ds(root):
        return build_dataset(DataConfig(name="imagefolder", root=str(root), image_size=8), "train")

    with pytest.raises(DataError, match="is not a directory"):
        ds(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="no class sub-folders"):
        ds(tmp_path / "flat")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images with extensions"):
        ds(tmp_path / "empty")
    code, err = case(campaign, "tok_empty_folder")                    # and through the trainer CLI
    assert code != 0 and "no images with extensions" in err
    # one class is allowed (a class-conditional model with one real class + the null class)
    _png(tmp_path / "one" / "only" / "a.png")
    _png(tmp_path / "one" / "only" / "b.png", 2)
    one = ds(tmp_path / "one")
    assert one.num_classes == 1 and one.class_names == ["only"] and [one[i][1] for i in range(2)] == [0, 0]


# ============================================================================== untrusted files
def test_crafted_state_pt_never_runs_tokenizer_or_ar(campaign, tmp_path):
    from tokenizer.model import load_tokenizer
    from tokenizer.train import TokenizerTrainConfig, train

    run = Path(shutil.copytree(got(campaign, "tok_ref"), tmp_path / "tok"))
    marker = tmp_path / "pwned"
    torch.save({"opt": Payload(marker), "step": 8}, resolve_checkpoint(run) / "state.pt")
    load_tokenizer(run)                                                # inference never reads state.pt
    with pytest.raises(CheckpointError, match=r"state.pt: refused to load trainer state"):
        train(load_config(TokenizerTrainConfig, TOK_CFG, TOK_ARGS + ["train.steps=10"]), run)
    assert not marker.exists()
    code, err = case(campaign, "ar_state_payload")                     # AR resume through the CLI
    assert code != 0 and "refused to load trainer state" in err, err[-1500:]
    assert not (got(campaign, "batch")["dir"] / "pwned_state").exists()


def test_crafted_deepspeed_engine_file_never_runs(campaign):
    code, err = case(campaign, "ar_engine_payload")
    assert not (got(campaign, "batch")["dir"] / "pwned_engine").exists()
    assert code != 0 and "refused" in err


def test_inference_and_sampling_loads_read_no_pickles(campaign, tmp_path):
    from ar_model.model import load_ar
    from groupgen.checkpoint import checkpoint_hash

    run = Path(shutil.copytree(got(campaign, "ar_ref"), tmp_path / "ar"))
    ck, marker = resolve_checkpoint(run), tmp_path / "pwned"
    torch.save({"x": Payload(marker)}, ck / "state.pt")
    torch.save({"x": Payload(marker)}, ck / "engine" / "mp_rank_00_model_states.pt")
    model, meta = load_ar(run)
    checkpoint_hash(run)
    assert meta["kind"] == "ar" and not marker.exists()


def test_object_arrays_in_npz_are_refused(campaign, models, tmp_path):
    from sampling.sample import SamplingConfig, sample

    code, err = case(campaign, "eval_object_npz")                      # eval CLI
    assert code == 2 and "obj.npz" in err and "allow_pickle" in err, err[-1500:]
    assert not (got(campaign, "batch")["dir"] / "pwned_npz").exists()
    # a planted sampling shard: treated as not done, regenerated, never unpickled
    out = Path(shutil.copytree(got(campaign, "sampling")["out"], tmp_path / "samp"))
    want = _arrays(out / "samples.npz")
    marker = tmp_path / "pwned"
    with open(out / "shards" / "chunk_00003.npz", "wb") as f:
        np.savez(f, arr_0=np.array([Payload(marker), None], dtype=object), labels=np.array([Payload(marker)]))
    info = sample(load_config(SamplingConfig, None, SAMPLE_ARGS), models["ar"], out)
    assert not marker.exists() and info["rank0"]["chunks_done"] == [3]
    got_ = _arrays(out / "samples.npz")
    assert all(np.array_equal(want[k], got_[k]) for k in want)


def test_object_dtype_token_store_is_refused_without_unpickling(tmp_path, store):
    d = Path(shutil.copytree(store, tmp_path / "obj"))
    marker = tmp_path / "pwned"
    a = np.empty((64, 2, 16, 2), dtype=object)
    a[0, 0, 0, 0] = Payload(marker)
    np.save(d / "codes.npy", a, allow_pickle=True)
    with pytest.raises(ValueError):
        TokenStore(d)
    assert not marker.exists()
