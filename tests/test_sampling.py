"""Sampling: logits filters, CFG, per-group settings, seeds, sharding/resume, errors, output format.

Uses the real GPT (ar_model) and Tokenizer (tokenizer) at toy sizes: a 2x2 grid, G=2 groups of
K=16 codes, 8x8 grey images; the GPT's weights are randomised so logits are far from flat.
"""
import io
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from ar_model.model import GPT, ar_meta, gpt_config
from groupgen.checkpoint import checkpoint_hash, load_tensors, save_checkpoint
from groupgen.config import ConfigError, config_hash, load_config, to_dict
from groupgen.layout import LayoutError
from sampling.classes import ClassError, builtin_names, resolve_classes, sample_labels
from sampling.logits import (GroupPicker, GroupSettings, cfg_scale_at, draw, filter_logits, per_group,
                             sample_from_logits, top_p_mask)
from sampling.shards import write_npz
from sampling.sample import (SamplingConfig, SamplingError, generate_codes, kv_cache_dtype, load_models,
                             main, merge_shards, run_shard, sample)
from tokenizer.model import ModelConfig, Tokenizer
from tokenizer.quantize import QuantizerConfig

torch.set_num_threads(1)
CPU = torch.device("cpu")


def _tokenizer_ckpt(root: Path, K: int = 16, G: int = 2) -> Path:
    torch.manual_seed(0)
    mc = ModelConfig(arch="vqgan", image_size=8, channels=1, ch=8, ch_mult=[1, 2, 2], num_res_blocks=1,
                     attn=False, z_channels=8, embed_dim=8)
    qc = QuantizerConfig(kind="multigroup", codebook_size=K, groups=G)
    tok = Tokenizer(mc, qc).eval()
    meta = {"kind": "tokenizer", "config": {"model": to_dict(mc), "quantizer": to_dict(qc)},
            "layout": tok.layout.to_dict()}
    return save_checkpoint(root, 0, {"model": tok.state_dict()}, meta)


def _ar_ckpt(root: Path, tok_path: Path, head: str) -> Path:
    from tokenizer.model import load_tokenizer

    layout = load_tokenizer(tok_path).layout
    torch.manual_seed(1)
    cfg = gpt_config("micro", head=head, subtoken_layers=1, dropout=0.0)
    m = GPT(cfg, layout, 3)
    with torch.no_grad():
        for p in m.parameters():   # output heads start at zero: randomise so logits are peaked
            p.normal_(0, 0.3)
    meta = ar_meta(cfg, layout, 3, ["cat", "dog", "bird"], tokenizer=str(tok_path))
    return save_checkpoint(root, 0, {"model": m.state_dict()}, meta)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    tok = _tokenizer_ckpt(root / "tok")
    return {"tok": tok, "subtoken": _ar_ckpt(root / "ar_sub", tok, "subtoken"),
            "independent": _ar_ckpt(root / "ar_ind", tok, "independent"),
            "other_tok": _tokenizer_ckpt(root / "tok32", K=32)}


@pytest.fixture(scope="module")
def models(ckpts):
    return {h: load_models(ckpts[h])[0] for h in ("subtoken", "independent")}


def _codes(models, head, **kw):
    cfg = SamplingConfig(**{"per_class": 2, "batch_size": 6, **kw})
    m, plan = load_models(models[head], cfg=cfg)
    gen = torch.Generator().manual_seed(123)
    return generate_codes(m.model, torch.from_numpy(plan.labels), plan, cfg, gen, CPU), plan, m


def _teacher_logits(model, codes, labels):
    with torch.no_grad():
        return model(codes, labels)


# --- logits -------------------------------------------------------------------------------------
def test_top_p_keeps_smallest_set_with_mass_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    sorted_logits = probs.log()
    for p, keep in [(0.45, 1), (0.75, 2), (0.81, 3), (0.96, 4), (1.0, 4)]:
        dropped = top_p_mask(sorted_logits, p)[0]
        assert int((~dropped).sum()) == keep, (p, dropped)
        assert not dropped[:keep].any() and dropped[keep:].all()
    # Unsorted input through filter_logits: the kept indices are the nucleus, mapped back.
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    kept, idx = filter_logits(logits, GroupSettings(top_p=0.75))
    finite = idx[torch.isfinite(kept)]
    assert sorted(finite.tolist()) == [1, 3]


@pytest.mark.parametrize("kernel", [True, False], ids=["cpu-topk-kernel", "torch-topk"])
def test_top_k_top_p_sampling_distribution(kernel, cpu_kernel_path):
    cpu_kernel_path(kernel)
    kept, idx = filter_logits(torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]]), GroupSettings(top_k=3))
    assert sorted(idx[0].tolist()) == [1, 2, 3] and torch.equal(kept, torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])[:, idx[0]])
    if kernel:
        assert idx[0].tolist() == [1, 2, 3]       # the kernel keeps index order
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04])
    logits = probs.log().repeat(20000, 1)
    draws = sample_from_logits(logits, GroupSettings(top_k=3), g)
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert freq[3:].sum() == 0
    assert torch.allclose(freq[:3], probs[:3] / probs[:3].sum(), atol=0.015)
    draws = sample_from_logits(logits, GroupSettings(top_p=0.65), g)     # nucleus {0, 1}
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert freq[2:].sum() == 0 and abs(freq[0] - 0.4 / 0.7) < 0.015
    draws = sample_from_logits(logits, GroupSettings(temperature=0.5), g)  # p^2 renormalised
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert torch.allclose(freq, probs**2 / (probs**2).sum(), atol=0.015)


def test_top_k_1_and_temperature_0_are_argmax():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(3))
    am = logits.argmax(-1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_from_logits(logits, GroupSettings(top_k=1), g), am)
    assert torch.equal(sample_from_logits(logits, GroupSettings(temperature=0.0), g), am)
    assert torch.equal(sample_from_logits(logits, GroupSettings(top_p=1e-6), g), am)


def test_top_k_draws_in_index_order_on_every_path(cpu_kernel_path):
    """``draw`` spends one random number per kept column, so a seed gives the same tokens on every
    top-k path (CPU kernel, torch.topk on a GPU / without AVX-512) only if all keep index order."""
    from ar_model.cpu import kernels as cpu_kernels

    x = torch.randn(8, 4096, generator=torch.Generator().manual_seed(0))
    s = GroupSettings(top_k=500)
    keep = x.topk(500, dim=-1).indices.sort(dim=-1).values       # the k largest, in index order
    j = draw(x.gather(-1, keep), torch.Generator().manual_seed(1))
    ref = keep.gather(-1, j.unsqueeze(-1)).squeeze(-1)
    paths = ([True] if cpu_kernels.kernels() is not None else []) + [False]
    for kernel in paths:   # the kernel first: cpu_kernel_path(False) lasts for the rest of the test
        cpu_kernel_path(kernel)
        kept, idx = filter_logits(x, s)
        assert torch.equal(idx, keep) and torch.equal(kept, x.gather(-1, keep)), kernel
        assert torch.equal(sample_from_logits(x, s, torch.Generator().manual_seed(1)), ref), kernel


def test_picker_cfg_combination_same_index_both_halves():
    B, K, s = 5, 11, 3.0
    logits = torch.randn(2 * B, K, generator=torch.Generator().manual_seed(0))
    pk = GroupPicker([GroupSettings(temperature=0.0)], [s], L=4, schedule="constant", stop_after=-1,
                     guided=True, generator=None)
    idx = pk(0, logits)
    c, u = logits[:B], logits[B:]
    assert torch.equal(idx[:B], idx[B:])
    assert torch.equal(idx[:B], (u + s * (c - u)).argmax(-1))
    assert not torch.equal(idx[:B], c.argmax(-1))   # guidance changed something here


def test_cfg_schedules():
    assert cfg_scale_at(4.0, 0, 10, "constant", -1) == 4.0
    assert cfg_scale_at(4.0, 9, 10, "linear", -1) == 4.0
    assert cfg_scale_at(4.0, 4, 10, "linear", -1) == pytest.approx(1 + 3 * 5 / 10)
    assert cfg_scale_at(4.0, 3, 10, "constant", 3) == 4.0 and cfg_scale_at(4.0, 4, 10, "constant", 3) == 1.0
    with pytest.raises(ValueError, match="cfg_schedule"):
        cfg_scale_at(2.0, 0, 4, "cosine", -1)


def test_per_group_values():
    assert per_group(2.0, 3, "x") == [2.0, 2.0, 2.0]
    assert per_group([5], 2, "x") == [5, 5]
    with pytest.raises(ValueError, match="top_k.*G=2"):
        per_group([1, 2, 3], 2, "top_k")


# --- generation with the real model -------------------------------------------------------------
@pytest.mark.parametrize("head", ["subtoken", "independent"])
def test_greedy_and_guided_greedy_match_teacher_forcing(models, head):
    """The KV-cached loop picks argmax of the teacher-forced logits at every position and group,
    with guidance exactly argmax(u + s (c - u)) on both halves' shared sub-indices."""
    codes, plan, m = _codes(models, head, top_k=1)
    codes0, _, _ = _codes(models, head, temperature=0.0)
    assert torch.equal(codes, codes0)
    labels = torch.from_numpy(plan.labels)
    for g, lg in enumerate(_teacher_logits(m.model, codes, labels)):
        assert torch.equal(lg.argmax(-1), codes[..., g])
    s = 3.0
    gcodes, plan, _ = _codes(models, head, temperature=0.0, cfg_scale=s)
    assert plan.guided and not torch.equal(gcodes, codes)
    c = _teacher_logits(m.model, gcodes, labels)
    u = _teacher_logits(m.model, gcodes, torch.full_like(labels, plan.num_classes))
    for g in range(plan.layout.G):
        assert torch.equal((u[g] + s * (c[g] - u[g])).argmax(-1), gcodes[..., g])
    # cfg_stop_after=1: positions 0-1 guided, 2-3 plain conditional.
    scodes, plan, _ = _codes(models, head, temperature=0.0, cfg_scale=s, cfg_stop_after=1)
    c = _teacher_logits(m.model, scodes, labels)
    u = _teacher_logits(m.model, scodes, torch.full_like(labels, plan.num_classes))
    for g in range(plan.layout.G):
        assert torch.equal((u[g] + s * (c[g] - u[g])).argmax(-1)[:, :2], scodes[:, :2, g])
        assert torch.equal(c[g].argmax(-1)[:, 2:], scodes[:, 2:, g])


def test_per_group_settings_hit_the_right_group(models):
    codes, plan, m = _codes(models, "subtoken", top_k=[1, 0], per_class=6)
    tf = _teacher_logits(m.model, codes, torch.from_numpy(plan.labels))
    assert torch.equal(tf[0].argmax(-1), codes[..., 0])         # group 0 greedy
    assert not torch.equal(tf[1].argmax(-1), codes[..., 1])     # group 1 sampled
    codes, _, _ = _codes(models, "subtoken", top_k=[0, 1], per_class=6)
    tf = _teacher_logits(m.model, codes, torch.from_numpy(plan.labels))
    assert torch.equal(tf[1].argmax(-1), codes[..., 1])
    assert not torch.equal(tf[0].argmax(-1), codes[..., 0])


def test_cfg_scale_1_is_unguided_conditional_sampling(models):
    codes, plan, m = _codes(models, "subtoken", cfg_scale=1.0)
    assert not plan.guided
    # Reference: the plain conditional loop on the undoubled batch with the same generator.
    model, labels = m.model, torch.from_numpy(plan.labels)
    gen = torch.Generator().manual_seed(123)
    ref = []
    with torch.no_grad():
        model.init_cache(len(labels), CPU, torch.float32)
        h = model.prefill(labels)
        for pos in range(plan.layout.L):
            ct = model.sample_position(h, lambda g, lg: sample_from_logits(lg, GroupSettings(), gen))
            ref.append(ct)
            if pos + 1 < plan.layout.L:
                h = model.decode(ct, pos)
    assert torch.equal(codes, torch.stack(ref, 1))
    # A linear ramp towards scale 1 is unguided too.
    assert torch.equal(_codes(models, "subtoken", cfg_scale=1.0, cfg_schedule="linear")[0], codes)


def test_kv_cache_setting_sets_the_cache_dtype(models, monkeypatch):
    """``kv_cache`` picks the cache dtype apart from the compute precision; "auto" follows it."""
    f32, b16 = torch.float32, torch.bfloat16
    for prec, kv, want in [("fp32", "auto", f32), ("bf16", "auto", b16), ("fp32", "bf16", b16), ("bf16", "fp32", f32)]:
        assert kv_cache_dtype(SamplingConfig(precision=prec, kv_cache=kv)) == want
    with pytest.raises(ConfigError, match=r"kv_cache: expected one of \['auto', 'fp32', 'bf16'\], got 'fp16'"):
        load_config(SamplingConfig, overrides=["kv_cache=fp16"])
    seen = []
    init = GPT.init_cache
    monkeypatch.setattr(GPT, "init_cache", lambda self, b, d=None, dt=None: (seen.append(dt), init(self, b, d, dt))[1])
    exact, _, _ = _codes(models, "independent", temperature=0.0, cfg_scale=2.0)
    half, _, _ = _codes(models, "independent", temperature=0.0, cfg_scale=2.0, kv_cache="bf16")
    assert seen == [f32, b16]
    # one rounding of k/v: greedy picks on a random-weight model barely move
    assert half.shape == exact.shape and (half == exact).float().mean().item() > 0.9


def test_bf16_kv_cache_needs_bf16_compute_not_the_reverse(tmp_path, ckpts):
    """An fp32 cache under bf16 compute would hold bf16-valued keys and values at twice the memory."""
    with pytest.raises(ValueError, match="kv_cache=fp32 with precision=bf16.*kv_cache=auto or kv_cache=bf16"):
        load_config(SamplingConfig, overrides=["precision=bf16", "kv_cache=fp32"])
    with pytest.raises(ValueError, match="kv_cache=fp32 with precision=bf16"):   # built in Python too
        sample(SamplingConfig(precision="bf16", kv_cache="fp32"), ckpts["subtoken"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    load_config(SamplingConfig, overrides=["precision=bf16", "kv_cache=bf16"])
    load_config(SamplingConfig, overrides=["precision=fp32", "kv_cache=bf16"])


def test_fp32_sampling_of_a_bf16_checkpoint_computes_in_fp32(tmp_path, ckpts):
    """precision=fp32 casts bf16 weights up: the codes are those of an fp32 model holding the same
    (bf16-rounded) values."""
    sd = load_tensors(ckpts["subtoken"])
    meta = json.loads((ckpts["subtoken"] / "meta.json").read_text())
    b16 = save_checkpoint(tmp_path / "b16", 0, {"model": {k: v.bfloat16() for k, v in sd.items()}}, meta)
    f32 = save_checkpoint(tmp_path / "f32", 0, {"model": {k: v.bfloat16().float() for k, v in sd.items()}}, meta)
    cfg = SamplingConfig(per_class=2, batch_size=6, cfg_scale=2.0)
    got, ref = (load_models(ck, cfg=cfg) for ck in (b16, f32))
    assert {p.dtype for p in got[0].model.parameters()} == {torch.float32}
    codes = [generate_codes(m.model, torch.from_numpy(plan.labels), plan, cfg, torch.Generator().manual_seed(4), CPU)
             for m, plan in (got, ref)]
    assert torch.equal(*codes)
    m, _ = load_models(b16, cfg=SamplingConfig(precision="bf16"))   # and bf16 still keeps bf16
    assert {p.dtype for p in m.model.parameters()} == {torch.bfloat16}


def test_weights_ema_samples_the_ema_export(tmp_path, ckpts, models):
    sd = load_tensors(ckpts["independent"])
    meta = json.loads((ckpts["independent"] / "meta.json").read_text())
    ema = {k: v * 0.5 if v.is_floating_point() else v for k, v in sd.items()}
    ck = save_checkpoint(tmp_path / "ar", 0, {"model": sd, "ema": ema}, meta)
    cfg = load_config(SamplingConfig, overrides=["weights=ema", "per_class=1", "batch_size=3"])
    m, _ = load_models(ck, cfg=cfg)
    assert all(torch.equal(v, ema[k]) for k, v in m.model.state_dict().items() if k in ema)
    assert m.weights == "ema" and m.ckpt_hash == checkpoint_hash(ck, "ema") != checkpoint_hash(ck)
    out = tmp_path / "out"
    sample(cfg, m, out)
    with pytest.raises(SamplingError, match=r"weights.*ckpt_hash"):   # shards of other weights never mix
        run_shard(SamplingConfig(per_class=1, batch_size=3), ck, out)
    with pytest.raises(SamplingError, match="preloaded model holds .*'model' weights"):
        sample(cfg, models["independent"], tmp_path / "x")
    with pytest.raises(SamplingError, match=r"weights='ema' needs ema.safetensors.*train.ema.*\['model'\]"):
        sample(cfg, ckpts["independent"], tmp_path / "none")
    assert not (tmp_path / "none").exists()
    with pytest.raises(ConfigError, match="weights"):
        load_config(SamplingConfig, overrides=["weights=best"])


def _rewrite_fingerprint(out: Path, edit) -> None:
    """Rewrite DIR/shards/fingerprint.json as an older version of the sampler wrote it."""
    f = out / "shards" / "fingerprint.json"
    fp = json.loads(f.read_text())
    fp["config"] = edit(dict(fp["config"]))
    fp["key"] = config_hash({"c": fp["config"], "a": fp["ckpt_hash"], "t": fp["tokenizer_hash"]})
    f.write_text(json.dumps(fp))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_shards_resume_across_equal_cache_settings_and_older_folders(tmp_path, models, precision):
    m, out = models["independent"], tmp_path / "out"
    cfg = SamplingConfig(per_class=1, batch_size=3, precision=precision)
    assert run_shard(cfg, m, out)["chunks_done"] == [0]
    # "auto" and the precision's own dtype are one setting
    assert run_shard(SamplingConfig(per_class=1, batch_size=3, precision=precision, kv_cache=precision),
                     m, out)["chunks_skipped"] == [0]
    # a folder from before kv_cache / weights existed, and one that stored kv_cache="auto"
    for old in (lambda c: {k: v for k, v in c.items() if k not in ("kv_cache", "weights")},
                lambda c: dict(c, kv_cache="auto")):
        _rewrite_fingerprint(out, old)
        assert run_shard(cfg, m, out)["chunks_skipped"] == [0]
    if precision == "fp32":   # a bf16 cache under fp32 compute makes other samples
        with pytest.raises(SamplingError, match=r"differ: \['kv_cache'\]"):
            run_shard(SamplingConfig(per_class=1, batch_size=3, kv_cache="bf16"), m, out)


def test_sampling_runs_in_eval_mode_and_restores_the_mode(models):
    """A model left in training mode (dropout, class dropout) samples exactly as in eval mode."""
    cfg = SamplingConfig(per_class=2, batch_size=6)
    m, plan = load_models(models["independent"], cfg=cfg)
    labels = torch.from_numpy(plan.labels)
    ref = generate_codes(m.model, labels, plan, cfg, torch.Generator().manual_seed(5), CPU)
    drops = [d for d in m.model.modules() if isinstance(d, torch.nn.Dropout)]
    assert drops
    old_p = [d.p for d in drops]
    for d in drops:
        d.p = 0.5
    m.model.train()
    try:
        got = generate_codes(m.model, labels, plan, cfg, torch.Generator().manual_seed(5), CPU)
        assert m.model.training and torch.equal(got, ref)
    finally:
        m.model.eval()
        for d, p in zip(drops, old_p):
            d.p = p


# --- end to end: files, seeds, shards, resume --------------------------------------------------------
def _npz(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_sample_outputs_and_same_seed(tmp_path, models, ckpts):
    cfg = SamplingConfig(per_class=3, batch_size=4, cfg_scale=2.0, top_k=8, seed=7, grid_per_class=3)
    info = sample(cfg, ckpts["subtoken"], tmp_path / "a")      # from paths, as the CLI does
    z = _npz(tmp_path / "a" / "samples.npz")
    assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (9, 8, 8, 3)
    assert np.array_equal(z["arr_0"][..., 0], z["arr_0"][..., 2])    # grey replicated
    assert z["labels"].dtype == np.int64 and z["labels"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert z["codes"].shape == (9, 4, 2) and z["codes"].max() < 16
    from PIL import Image
    assert Image.open(tmp_path / "a" / "grid.png").size == (3 * 10 + 2, 3 * 10 + 2)
    js = json.loads((tmp_path / "a" / "sampling.json").read_text())
    assert js["ckpt_hash"] == info["ckpt_hash"] and len(js["ckpt_hash"]) == 16
    assert js["config"]["cfg_scale"] == 2.0 and js["num_samples"] == 9 and js["timings"]["images_per_s"] > 0
    # Same seed, preloaded models: identical; another seed: different.
    sample(cfg, models["subtoken"], tmp_path / "b")
    assert all(np.array_equal(v, _npz(tmp_path / "b" / "samples.npz")[k]) for k, v in z.items())
    cfg.seed = 8
    sample(cfg, models["subtoken"], tmp_path / "c")
    assert not np.array_equal(z["codes"], _npz(tmp_path / "c" / "samples.npz")["codes"])


def test_sharded_equals_single_and_resume(tmp_path, models):
    m = models["independent"]
    cfg = SamplingConfig(num_samples=10, classes="random", batch_size=3, cfg_scale=1.5, top_p=0.9, seed=3)
    single = tmp_path / "single"
    from ar_model.cpu.nn_ops import _PACKED
    sample(cfg, m, single, rank=0, world=1)
    assert not any(x in _PACKED for x in m.model.modules())   # packs kept across chunks, freed at the end
    ref = _npz(single / "samples.npz")
    sh = tmp_path / "sharded"
    r0 = run_shard(cfg, m, sh, rank=0, world=2)
    r1 = run_shard(cfg, m, sh, rank=1, world=2)
    assert r0["chunks_done"] == [0, 2] and r1["chunks_done"] == [1, 3]
    merge_shards(cfg, m, sh)
    got = _npz(sh / "samples.npz")
    assert set(got) == {"arr_0", "labels", "codes"}
    assert all(np.array_equal(ref[k], got[k]) for k in ref)
    # Resume: delete one chunk; only it is redone, and the result is unchanged.
    (sh / "shards" / "chunk_00002.npz").unlink()
    r0 = run_shard(cfg, m, sh, rank=0, world=2)
    assert r0["chunks_done"] == [2] and r0["chunks_skipped"] == [0]
    assert run_shard(cfg, m, sh, rank=1, world=2)["chunks_done"] == []
    merge_shards(cfg, m, sh)
    assert all(np.array_equal(ref[k], _npz(sh / "samples.npz")[k]) for k in ref)
    # A different setting must not silently mix with existing chunks.
    cfg.top_p = 0.8
    with pytest.raises(SamplingError, match="top_p"):
        run_shard(cfg, m, sh, rank=0, world=2)


def test_write_npz_streams_to_disk_and_reads_back(tmp_path):
    """The archive goes straight into the file (no in-memory copy of it) and is what np.savez makes."""
    a = np.arange(48 << 20, dtype=np.uint8).reshape(-1, 1024)   # 48 MiB
    lab = np.arange(len(a), dtype=np.int64)
    path = tmp_path / "x.npz"
    tracemalloc.start()
    try:
        write_npz(path, arr_0=a, labels=lab)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < a.nbytes // 2, f"peak {peak >> 20} MiB while writing a {a.nbytes >> 20} MiB array"
    buf = io.BytesIO()
    np.savez(buf, arr_0=a, labels=lab)
    assert path.read_bytes() == buf.getvalue()
    with np.load(path) as z:
        assert np.array_equal(z["arr_0"], a) and np.array_equal(z["labels"], lab)
    assert [p.name for p in tmp_path.iterdir()] == ["x.npz"]   # no temp file left


def test_merge_reports_missing_chunks(tmp_path, models):
    cfg = SamplingConfig(per_class=1, batch_size=1)
    run_shard(cfg, models["subtoken"], tmp_path, rank=0, world=2)
    with pytest.raises(SamplingError, match="chunk_00001"):
        merge_shards(cfg, models["subtoken"], tmp_path)
    cfg.wait_timeout_s = 0.0
    with pytest.raises(SamplingError, match="1 chunks still missing"):
        merge_shards(cfg, models["subtoken"], tmp_path, wait=True)


def test_cli(tmp_path, ckpts):
    out = tmp_path / "cli"
    assert main(["--ckpt", str(ckpts["independent"]), "--out", str(out), "classes=[dog, 0]", "per_class=2",
                 "top_k=[4,8]", "save_png=true", "batch_size=3"]) == 0
    z = _npz(out / "samples.npz")
    assert z["labels"].tolist() == [1, 1, 0, 0]
    assert sorted(p.name for p in (out / "png").iterdir()) == ["000000_1.png", "000001_1.png",
                                                               "000002_0.png", "000003_0.png"]


# --- errors before work -------------------------------------------------------------------------
@pytest.mark.parametrize("kw, err, msg", [
    ({"classes": [5]}, ClassError, "class id 5 out of range.*3 classes"),
    ({"classes": "dgo"}, ClassError, "unknown class name 'dgo'.*'dog'"),
    ({"top_k": [1, 2, 3]}, ValueError, "top_k.*G=2"),
    ({"top_p": 0.0}, ValueError, "top_p"),
    ({"num_samples": 0, "per_class": 0}, ClassError, "nothing to sample"),
    ({"classes": "cat", "class_names": "fmnist"}, ClassError, "10 names.*num_classes=3"),
])
def test_errors_raise_before_work(tmp_path, ckpts, kw, err, msg):
    out = tmp_path / "out"
    with pytest.raises(err, match=msg):
        sample(SamplingConfig(**kw), ckpts["subtoken"], out)
    assert not out.exists()


def test_layout_mismatch_raises_before_work(tmp_path, ckpts):
    out = tmp_path / "out"
    with pytest.raises(LayoutError, match=r"K: AR checkpoint .*\(16, 16\) vs tokenizer .*\(32, 32\)"):
        sample(SamplingConfig(), ckpts["subtoken"], out, tokenizer=ckpts["other_tok"])
    assert not out.exists()


# --- classes ------------------------------------------------------------------------------------
def test_class_lists_and_selection():
    inet = builtin_names("imagenet")
    from torchvision.models import ResNet50_Weights
    assert inet == ResNet50_Weights.IMAGENET1K_V1.meta["categories"]          # the library's list, not a copy
    assert len(inet) == len(set(inet)) == 1000
    assert resolve_classes("Cardigan,cardigan", inet, 1000) == [264, 474]   # the corgi, the sweater
    with pytest.raises(ClassError, match="ambiguous"):
        resolve_classes("CARDIGAN", inet, 1000)
    assert (inet[0], inet[207], inet[281], inet[417], inet[980], inet[999]) == (
        "tench", "golden retriever", "tabby", "balloon", "volcano", "toilet tissue")
    fm = builtin_names("fmnist")
    assert fm[0] == "T-shirt/top" and fm[9] == "Ankle boot" and len(fm) == 10
    assert resolve_classes("tench,Goldfish", inet, 1000) == [0, 1]
    assert resolve_classes([207, "3"], inet, 1000) == [207, 3]
    assert resolve_classes("crane bird", inet, 1000) == [134] and resolve_classes("crane", inet, 1000) == [517]
    with pytest.raises(ClassError, match="golden retriever"):
        resolve_classes("golden retreiver", inet, 1000)
    lab = sample_labels("balanced", 4, 10, 0, 0)
    assert lab.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    assert sample_labels([7, 2], 9, 0, 2, 0).tolist() == [7, 7, 2, 2]
    assert sample_labels([7, 2], 9, 3, 2, 0).tolist() == [7, 7, 2]   # num_samples wins
    r1, r2 = sample_labels("random", 1000, 500, 0, 5), sample_labels("random", 1000, 500, 0, 5)
    assert np.array_equal(r1, r2) and r1.min() >= 0 and r1.max() < 1000 and len(np.unique(r1)) > 300
    assert not np.array_equal(r1, sample_labels("random", 1000, 500, 0, 6))
