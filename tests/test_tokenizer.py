"""Stage-1 tokenizer: nets, losses, trainer (exact resume, NaN stop), evaluator, encoder."""
import math
import os

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("GROUPGEN_QUIET", "1")

from groupgen.checkpoint import latest_checkpoint, load_state, save_checkpoint  # noqa: E402
from groupgen.config import ConfigError, load_config, to_dict  # noqa: E402
from groupgen.data import DataConfig, build_dataset  # noqa: E402
from groupgen.runs import read_jsonl  # noqa: E402
from groupgen.tokens import TokenStore, TokenStoreError  # noqa: E402
from tokenizer import losses as L  # noqa: E402
from tokenizer.encode import EncodeConfig, encode  # noqa: E402
from tokenizer.model import ModelConfig, Tokenizer, build_tokenizer, load_tokenizer  # noqa: E402
from tokenizer.quantize import QuantizerConfig  # noqa: E402
from tokenizer.train import BatchOrder, TokenizerTrainConfig, train  # noqa: E402

S = 16  # tiny images: 16x16 grey, f2 -> 8x8 grid


def tiny_model(**kw):
    base = dict(image_size=S, channels=1, ch=8, ch_mult=[1, 2], num_res_blocks=1, attn=True, z_channels=8,
                embed_dim=8)
    base.update(kw)
    return ModelConfig(**base)


def mg(G=4, K=16, **kw):
    return QuantizerConfig(kind="multigroup", groups=G, codebook_size=K, l2_norm=True, **kw)


def tiny_qgvae(tokens=8, heads=2, D=4, K=16):
    return (ModelConfig(arch="qgvae", image_size=S, channels=1, tokens=tokens, heads=heads, down=1, embed_dim=D,
                        unet_ch=[8, 8, 8], fourier_freqs=2),
            QuantizerConfig(kind="pertoken", codebook_size=K, num_tokens=tokens))


def data_cfg(limit=64):
    return DataConfig(name="fmnist", image_size=S, channels=1, resize="resize", limit=limit)


def images(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, S, S, generator=g) * 2 - 1


def train_cfg(tmp_steps=6, **train_kw):
    cfg = TokenizerTrainConfig(data=data_cfg(64), model=tiny_model(), quantizer=mg(nested_mask=True),
                               loss=L.LossConfig(recon="charbonnier", disc_weight=0.1, disc_start=2, disc_ndf=8,
                                                 disc_layers=2))
    t = cfg.train
    t.steps, t.batch_size, t.lr, t.ckpt_every, t.log_every, t.sample_every, t.threads = tmp_steps, 8, 1e-3, 3, 1, 0, 1
    for k, v in train_kw.items():
        setattr(t, k, v)
    return cfg


def save_tok(tmp_path, tok_model_cfg, qcfg, name="tok"):
    """A random-init tokenizer written as a real checkpoint (as the trainer would)."""
    torch.manual_seed(0)
    cfg = TokenizerTrainConfig(data=data_cfg(40), model=tok_model_cfg, quantizer=qcfg)
    tok = build_tokenizer(cfg)
    meta = {"kind": "tokenizer", "config": to_dict(cfg), "layout": tok.layout.to_dict()}
    return save_checkpoint(tmp_path / name, 0, {"model": tok.state_dict()}, meta)


# ----------------------------------------------------------------------------- model

def test_straight_through_gradients_reach_encoder():
    torch.manual_seed(0)
    tok = Tokenizer(tiny_model(), mg())
    xrec, codes, losses = tok(images())
    # reconstruction loss only: its gradient can reach the encoder only through the straight-through path
    (xrec - images()).pow(2).mean().backward()
    for p in (tok.net.encoder.conv_in.weight, tok.net.quant_conv.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert codes.dtype == torch.long and codes.shape == (4, 64, 4)


@pytest.mark.parametrize("which", ["multigroup", "vq", "qgvae"])
def test_encode_decode_codes_bit_exact(which):
    torch.manual_seed(0)
    if which == "qgvae":
        tok = Tokenizer(*tiny_qgvae())
    elif which == "vq":
        tok = Tokenizer(tiny_model(), QuantizerConfig(kind="vq", codebook_size=32))
    else:
        tok = Tokenizer(tiny_model(), mg(nested_mask=True))
    tok.eval()
    x = images(3)
    with torch.no_grad():
        xrec, codes, _ = tok(x)
    c2 = tok.encode(x)
    assert torch.equal(codes, c2)
    tok.layout.check_codes(c2)
    with torch.no_grad():
        assert torch.equal(tok.decode_codes(c2), xrec)


def test_grouped_quant_conv_keeps_groups_isolated():
    torch.manual_seed(0)
    G, zc = 4, 8
    tok = Tokenizer(tiny_model(z_channels=zc, embed_dim=8), mg(G=G, K=64)).eval()
    x = images(2)
    with torch.no_grad():
        h = tok.net.encoder(x)
        base = tok.quantizer.quantize(tok.net.project(h))[1]
        for g in range(G):
            hp = h.clone()
            sl = slice(g * zc // G, (g + 1) * zc // G)
            hp[:, sl] += torch.randn_like(hp[:, sl]) * 5
            c = tok.quantizer.quantize(tok.net.project(hp))[1]
            changed = (c != base).any(dim=(0, 1))
            assert changed[g] and changed.sum() == 1, (g, changed)
        # decoder side: post_quant_conv output group g depends only on z_q group g
        zq = torch.randn(2, 8, 8, 8)
        out = tok.net.post_quant_conv(zq)
        zq2 = zq.clone()
        zq2[:, 2:4] += 1.0
        diff = (tok.net.post_quant_conv(zq2) - out).abs().amax(dim=(0, 2, 3))
        assert diff[2:4].min() > 0 and diff[:2].max() == 0 and diff[4:].max() == 0
    # control: an ungrouped quant_conv mixes groups
    tok2 = Tokenizer(tiny_model(grouped_quant_conv=False), mg(G=G, K=64)).eval()
    with torch.no_grad():
        h = tok2.net.encoder(x)
        base = tok2.quantizer.quantize(tok2.net.project(h))[1]
        hp = h.clone()
        hp[:, :2] += torch.randn_like(hp[:, :2]) * 5
        assert (tok2.quantizer.quantize(tok2.net.project(hp))[1] != base).any(dim=(0, 1)).sum() > 1


def test_qgvae_shapes_and_layout():
    torch.manual_seed(0)
    mcfg, qcfg = tiny_qgvae(tokens=8, heads=2, D=4, K=16)
    tok = Tokenizer(mcfg, qcfg)
    lay = tok.layout
    assert (lay.kind, lay.L, lay.K, lay.G, lay.per_position_codebook, lay.h, lay.w) == ("seq", 8, (16,), 1, True, 0, 0)
    x = images(3)
    z = tok.net.encode_latent(x)
    assert z.shape == (3, 8, 4)                          # C tokens of dim D
    assert tok.net.encoder(x).shape == (3, 8, S // 2, S // 2)   # C channels at H/2^f
    xrec, codes, losses = tok(x)
    assert xrec.shape == x.shape and codes.shape == (3, 8, 1) and "vq" in losses
    assert tok.quantizer.books.embed.shape[0] == 8       # one codebook per token
    with pytest.raises(ConfigError, match="num_tokens"):
        Tokenizer(mcfg, QuantizerConfig(kind="pertoken", codebook_size=16, num_tokens=6))
    with pytest.raises(ConfigError, match="heads"):
        ModelConfig(arch="qgvae", tokens=6, heads=4).validate()


def test_config_error_latent_not_divisible_by_groups(tmp_path):
    with pytest.raises(ConfigError, match="not divisible"):
        Tokenizer(tiny_model(embed_dim=6, z_channels=8), mg(G=4))
    with pytest.raises(ConfigError, match="z_channels=6"):
        Tokenizer(tiny_model(embed_dim=8, z_channels=6), mg(G=4))
    y = tmp_path / "c.yaml"
    y.write_text("data: {image_size: 16}\nmodel: {image_size: 16, embed_dim: 10}\n"
                 "quantizer: {kind: multigroup, groups: 4}\n")
    cfg = load_config(TokenizerTrainConfig, y)     # parses; the model build names the problem
    with pytest.raises(ConfigError, match="embed_dim=10"):
        build_tokenizer(cfg)
    with pytest.raises(ConfigError, match="model expects"):
        load_config(TokenizerTrainConfig, y, ["model.image_size=32"])


# ----------------------------------------------------------------------------- losses

def test_patchgan_hinge_losses_on_constructed_case():
    real = torch.tensor([2.0, 0.5])
    fake = torch.tensor([-2.0, 0.0])
    # 0.5 * (mean(relu(1 - [2, .5])) + mean(relu(1 + [-2, 0]))) = 0.5 * (0.25 + 0.5)
    assert L.hinge_d_loss(real, fake).item() == pytest.approx(0.375)
    assert L.hinge_d_loss(torch.tensor([3.0]), torch.tensor([-3.0])).item() == 0.0  # confident D: zero
    assert L.hinge_g_loss(fake).item() == pytest.approx(1.0)      # G wants D(fake) high: loss falls as it rises
    assert L.hinge_g_loss(fake + 1).item() < L.hinge_g_loss(fake).item()
    d = L.PatchDiscriminator(1, ndf=8, n_layers=2)
    assert d(images(2)).shape == (2, 1, 2, 2)
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    aw = L.adaptive_weight((3 * w).sum(), (w * torch.tensor([0.0, 1.0])).sum(), w)
    assert aw.item() == pytest.approx(np.sqrt(18) / (1 + 1e-4), rel=1e-5)
    cfg = L.LossConfig(disc_weight=0.5, disc_start=10)
    assert not L.gan_active(cfg, 9) and L.gan_active(cfg, 10)
    assert not L.gan_active(L.LossConfig(disc_weight=0.0), 100)


def test_recon_losses_and_lpips_missing_weights(tmp_path, monkeypatch):
    x, y = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5)
    p = L.recon_loss(x, y, L.LossConfig(recon="charbonnier", charbonnier_eps=1e-3))
    assert p["l2"].item() == pytest.approx(0.25) and p["charbonnier"].item() == pytest.approx(np.sqrt(0.25 + 1e-6))
    assert L.recon_loss(x, y, L.LossConfig(recon="l1"))["l1"].item() == pytest.approx(0.5)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "nohub"))
    assert not L.lpips_weights_available()
    with pytest.raises(L.LPIPSUnavailable, match="vgg16-397923af.pth"):
        L.build_lpips(L.LossConfig(perceptual_weight=1.0))
    with pytest.raises(L.LPIPSUnavailable, match="does not exist"):
        L.build_lpips(L.LossConfig(perceptual_weight=1.0, lpips_vgg_path=str(tmp_path / "none.pth")))
    assert L.build_lpips(L.LossConfig(perceptual_weight=0.0)) is None


@pytest.mark.slow
def test_lpips_random_plumbing_and_vgg_state_dict_loading(tmp_path):
    with pytest.warns(UserWarning, match="plumbing only"):
        lp = L.build_lpips(L.LossConfig(perceptual_weight=1.0, lpips_random=True))
    a = images(2)
    assert torch.allclose(lp(a, a), torch.zeros(2), atol=1e-6) and (lp(a, -a) > 0).all()
    # a torchvision-style VGG16 state dict (features.<i>.<param>) lands in LPIPS's trunk slices
    sd = {}
    for _, sl in lp.net.net.named_children():
        for idx, mod in sl.named_children():
            for pn, prm in mod.named_parameters(recurse=False):
                sd[f"features.{idx}.{pn}"] = torch.full_like(prm, 0.01 * int(idx))
    torch.save(sd, tmp_path / "vgg16.pth")
    lp2 = L.LPIPS(vgg_path=str(tmp_path / "vgg16.pth"))
    w = dict(lp2.net.net.named_parameters())
    assert torch.all(w["slice1.2.weight"] == 0.02) and torch.all(w["slice5.28.bias"] == 0.28)
    assert not any(p.requires_grad for p in lp2.parameters())


# ----------------------------------------------------------------------------- encode / token store

def _enc_cfg(**kw):
    base = dict(split="test", views=2, batch_size=8, chunk_size=16, threads=1, data={"limit": 40})
    base.update(kw)
    return EncodeConfig(**base)


def test_token_store_round_trip(tmp_path):
    ck = save_tok(tmp_path, tiny_model(), mg())
    out = encode(ck, tmp_path / "store", cfg=_enc_cfg())
    st = TokenStore(out)
    tok = load_tokenizer(ck)
    ds = build_dataset(data_cfg(40), "test")
    x, y = ds.batch(range(40))
    assert st.codes.shape == (40, 2, 64, 4) and st.codes.dtype == np.uint8
    assert np.array_equal(st.codes[:, 0], tok.encode(x).numpy())
    assert np.array_equal(st.codes[:, 1], tok.encode(x.flip(-1)).numpy())
    assert np.array_equal(st.labels, y.numpy())
    st.layout.check_same(tok.layout)
    from groupgen.checkpoint import checkpoint_hash
    assert st.header["tokenizer_hash"] == checkpoint_hash(ck)
    assert st.header["views"]["names"] == ["identity", "hflip"] and len(st.header["class_names"]) == 10
    # each group's largest code, kept by the writer: opening the store needs no scan of every code
    assert st.header["code_max"] == [int(v) for v in st.codes.reshape(-1, 4).max(0)]


def test_token_store_range_check_reads_the_header_and_scans_older_stores(tmp_path):
    import json
    from groupgen.tokens import TokenStoreError
    ck = save_tok(tmp_path, tiny_model(), mg())
    out = encode(ck, tmp_path / "store", cfg=_enc_cfg())
    hfile = out / "header.json"
    h = json.loads(hfile.read_text())
    K = h["layout"]["K"]
    hfile.write_text(json.dumps(dict(h, code_max=[K[0]] + h["code_max"][1:])))
    with pytest.raises(TokenStoreError, match=f"group 0 holds index {K[0]} >= K={K[0]}"):
        TokenStore(out)
    codes = np.load(out / "codes.npy", mmap_mode="r+")
    codes[3, 1, 5, 2] = K[2]
    codes.flush()
    del h["code_max"]                                          # a store written before the header kept it
    hfile.write_text(json.dumps(h))
    with pytest.raises(TokenStoreError, match=f"group 2 holds index {K[2]} >= K={K[2]}"):
        TokenStore(out)


def test_resumed_encode_equals_one_shot(tmp_path):
    ck = save_tok(tmp_path, *tiny_qgvae())
    one = TokenStore(encode(ck, tmp_path / "one", cfg=_enc_cfg(views=1)))
    part = tmp_path / "part"
    encode(ck, part, cfg=_enc_cfg(views=1, max_chunks=1))      # "interrupted" after one chunk
    with pytest.raises(TokenStoreError, match="incomplete"):
        TokenStore(part)
    done_before = sorted(os.listdir(part / "done"))
    encode(ck, part, cfg=_enc_cfg(views=1))                      # resumes: skips the finished chunk
    two = TokenStore(part)
    assert done_before == ["000000"] and len(os.listdir(part / "done")) == 3
    assert np.array_equal(one.codes[:], two.codes[:]) and np.array_equal(one.labels[:], two.labels[:])
    assert two.layout.kind == "seq" and two.codes.shape == (40, 1, 8, 1)


# ----------------------------------------------------------------------------- trainer

def _losses(run):
    return [(r["step"], r["loss"], r.get("d_loss")) for r in read_jsonl(run / "metrics.jsonl")]


def test_trainer_exact_resume(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ra = train(train_cfg(6), a)
    train(train_cfg(3), b)                      # "interrupted" at step 3 (checkpoint written)
    rb = train(train_cfg(6), b)                 # resumes from step 3
    la, lb = _losses(a), _losses(b)
    assert [s for s, _, _ in la] == [1, 2, 3, 4, 5, 6] and la == lb
    assert la[-1][2] is not None                # the GAN was on after disc_start, so the disc path resumed too
    assert ra["step"] == rb["step"] == 6
    for k in ("model", "disc"):
        from groupgen.checkpoint import load_tensors
        ta, tb = load_tensors(ra["checkpoint"], k), load_tensors(rb["checkpoint"], k)
        assert all(torch.equal(ta[n], tb[n]) for n in ta)
    tok = load_tokenizer(a)
    assert tok.layout.G == 4 and not tok.training
    with pytest.raises(Exception, match="config differs"):
        train(train_cfg(8, batch_size=4), b)


def test_cosine_schedule_sets_both_optimizers_each_step_and_resumes_exactly(tmp_path):
    from groupgen.runs import lr_multiplier

    a, b = tmp_path / "a", tmp_path / "b"
    kw = dict(schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)
    train(train_cfg(6, **kw), a)
    train(train_cfg(3, **kw), b)                # "interrupted" at step 3
    train(train_cfg(6, **kw), b)
    rows = read_jsonl(a / "metrics.jsonl")
    # the lr logged at step s is the one step s's update used: warmup 0.5, 1.0, then a cosine to 0.1 at step 6
    want = [1e-3 * lr_multiplier(s, 6, 2, "cosine", 0.1) for s in range(6)]
    assert [r["lr"] for r in rows] == pytest.approx(want, rel=1e-12)
    assert want[:2] == pytest.approx([5e-4, 1e-3]) and want[-1] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 4))))
    assert _losses(a) == _losses(b)             # the schedule is a function of the step: a resume follows it
    # the discriminator's optimizer follows the same multiplier (its state is saved with the last lr)
    st = load_state(latest_checkpoint(a / "checkpoints"))
    assert st["dopt"]["param_groups"][0]["lr"] == pytest.approx(want[-1])
    with pytest.raises(ConfigError, match="train.schedule"):
        train_cfg(6, schedule="linear").train.validate()


def test_trainer_resume_refuses_changed_optimizer_settings(tmp_path):
    # the optimizer state saved in the checkpoint holds these values: a resume would keep them silently
    cfg = train_cfg(2, ckpt_every=2)
    train(cfg, tmp_path / "r")
    config_before = (tmp_path / "r" / "config.yaml").read_text()
    for key, value in (("weight_decay", 0.05), ("disc_lr", 5e-4), ("disc_betas", (0.5, 0.9))):
        with pytest.raises(Exception, match=rf"config differs \(train.{key}: checkpoint .* vs now"):
            train(train_cfg(4, ckpt_every=2, **{key: value}), tmp_path / "r")
    assert (tmp_path / "r" / "config.yaml").read_text() == config_before


def test_trainer_nan_stops_and_keeps_last_good(tmp_path, monkeypatch):
    import tokenizer.train as T
    calls = {"n": 0}
    real = T.recon_loss

    def poisoned(x, xrec, cfg):
        calls["n"] += 1
        out = real(x, xrec, cfg)
        if calls["n"] == 3:
            out["l2"] = out["l2"] * float("nan")
        return out

    monkeypatch.setattr(T, "recon_loss", poisoned)
    cfg = train_cfg(6, ckpt_every=2)
    cfg.loss.disc_weight = 0.0
    with pytest.raises(FloatingPointError, match="step 3"):
        train(cfg, tmp_path / "r")
    assert latest_checkpoint(tmp_path / "r" / "checkpoints").name == "step_00000002"


def test_evaluate_and_recon_strip(tmp_path):
    cfg = train_cfg(2, sample_every=2)
    cfg.loss.disc_weight = 0.0
    res = train(cfg, tmp_path / "r")
    assert (tmp_path / "r" / "recon_00000002.png").is_file()
    from PIL import Image
    assert Image.open(tmp_path / "r" / "recon_00000002.png").size == (8 * S, 2 * S)
    # tokenizer evaluation is eval's (one owner); here on a real trained checkpoint
    from eval.reconstruction import ReconEvalConfig, evaluate_tokenizer

    ev = evaluate_tokenizer(load_tokenizer(res["checkpoint"]), ReconEvalConfig(n=24, batch_size=8, extractor="none",
                                                                                lpips=False))
    assert ev["images"] == 24 and 0 < ev["psnr"] < 60 and -1 <= ev["ssim"] <= 1 and ev["data"]["limit"] == 24
    assert ev["psnr_per_image"] > 0 and len(ev["usage"]) == 4 and all(0 < u <= 1 for u in ev["usage"])
    assert ev["usage_mean"] == pytest.approx(np.mean(ev["usage"]))


def test_batch_order_is_a_function_of_the_step():
    o = BatchOrder(20, 4, 0, 1, seed=3)
    epoch0 = torch.cat([o(s) for s in range(5)])
    assert sorted(epoch0.tolist()) == list(range(20))           # an epoch is a permutation
    assert torch.equal(BatchOrder(20, 4, 0, 1, seed=3)(7), o(7))  # fresh object, same batch
    r0, r1 = BatchOrder(20, 4, 0, 2, 3)(1), BatchOrder(20, 4, 1, 2, 3)(1)
    assert not set(r0.tolist()) & set(r1.tolist())               # ranks read disjoint slices


def test_trainer_sigterm_saves_then_exits(tmp_path, monkeypatch):
    import signal

    import tokenizer.train as T
    calls = {"n": 0}
    real = T.recon_loss

    def sigterm_at_step_2(x, xrec, cfg):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)   # as a scheduler would, mid-step
        return real(x, xrec, cfg)

    monkeypatch.setattr(T, "recon_loss", sigterm_at_step_2)
    cfg = train_cfg(50, ckpt_every=100)
    cfg.loss.disc_weight = 0.0
    before = signal.getsignal(signal.SIGTERM)
    res = train(cfg, tmp_path / "r")
    assert res["interrupted"] and res["step"] == 2
    assert latest_checkpoint(tmp_path / "r" / "checkpoints").name == "step_00000002"
    assert signal.getsignal(signal.SIGTERM) == before       # handler restored after train()


def test_ten_crop_encode_bounds_each_encoder_call_and_runs_in_the_training_precision(tmp_path, monkeypatch):
    """views=10 (ten-crop) encodes at most batch_size images per encoder call (one call of batch x 10
    at 256^2 in fp32 held tens of GB), gives the same codes as one call per batch, and runs under the
    tokenizer's training precision; views=10 with the default flip views names the fix."""
    import tokenizer.model as tm
    from groupgen.config import ConfigError
    ck = save_tok(tmp_path, tiny_model(), mg())
    calls, fp64 = [], [True]
    real = tm.Tokenizer.encode

    def counted(self, x):
        calls.append((len(x), torch.is_autocast_enabled("cpu")))
        # The chunked and the whole encode are compared in float64: in float32 the encoder's output depends on
        # the images per call (oneDNN's AVX2 kernels reduce in another order per batch size: up to 7e-7 at
        # batch 8 vs 80), which flips a code sitting within that of a tie (1 of 102,400 here on an AVX2 host).
        return real(self.double(), x.double()) if fp64[0] else real(self, x)

    monkeypatch.setattr(tm.Tokenizer, "encode", counted)
    out = encode(ck, tmp_path / "ten", cfg=_enc_cfg(view_kind="crops", views=10))
    assert calls and max(n for n, _ in calls) <= 8 and not any(a for _, a in calls)
    whole = encode(ck, tmp_path / "whole", cfg=_enc_cfg(view_kind="crops", views=10, views_per_call=10))
    assert np.array_equal(TokenStore(out).codes, TokenStore(whole).codes)
    calls.clear()
    fp64[0] = False
    encode(ck, tmp_path / "bf16", cfg=_enc_cfg(views=1, precision="bf16"))
    assert calls and all(a for _, a in calls)
    with pytest.raises(ConfigError, match="view_kind=crops views=10"):
        _enc_cfg(views=10).validate()


# ----------------------------------------------------------------------------- thread-count independence

@pytest.mark.parametrize("dim,precision", [(1, "fp32"), (2, "fp32"), (2, "bf16")])
def test_conv_weight_gradients_do_not_depend_on_the_thread_count(dim, precision):
    """oneDNN splits a conv's weight/bias-gradient reduction across threads; tokenizer.conv fixes the split.
    Same forward and data gradient as nn.Conv*d; weight/bias gradients equal its one-thread result, under
    bf16 autocast too (the trainer's precision=bf16)."""
    from groupgen.runs import autocast
    from tokenizer.conv import Conv1d, Conv2d

    torch.manual_seed(0)
    make, ref_make = (Conv2d, torch.nn.Conv2d) if dim == 2 else (Conv1d, torch.nn.Conv1d)
    shape = (32, 16, 32, 32) if dim == 2 else (32, 16, 1024)
    x0 = torch.randn(shape)
    conv, ref = make(16, 32, 3, padding=1), ref_make(16, 32, 3, padding=1)
    ref.load_state_dict(conv.state_dict())

    def grads(m, threads):
        n = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            m.zero_grad(set_to_none=True)
            x = x0.clone().requires_grad_(True)
            with autocast(torch.device("cpu"), precision):
                y = m(x)
            assert y.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
            (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            return y.detach(), x.grad, m.weight.grad, m.bias.grad
        finally:
            torch.set_num_threads(n)

    one, two = grads(conv, 1), grads(conv, 2)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    native1, native2 = grads(ref, 1), grads(ref, 2)
    assert all(torch.equal(a, b) for a, b in zip(one, native1))
    assert torch.equal(native1[1], native2[1])            # the data gradient never depended on threads
    assert all(t.dtype == torch.float32 for t in one[1:])  # gradients in the parameters' dtype
    with torch.no_grad():                                 # eval / encode: the library path
        assert torch.equal(conv(x0), ref(x0))


def _tiny_tokenizer_run(out, threads):
    import subprocess
    import sys

    from _env import REPO, child_env

    cmd = [sys.executable, "-m", "tokenizer.train", "--config", str(REPO / "configs/tokenizer/fmnist_mgvq_g4.yaml"),
           "--out", str(out), "train.steps=4", "train.log_every=1", f"train.threads={threads}",
           "train.batch_size=16", "data.limit=256", "model.ch=8", "train.eval_every=0", "train.sample_every=0",
           "train.ckpt_every=0"]
    env = child_env()
    env["OMP_NUM_THREADS"] = str(threads)   # the pools start with the run's own thread count
    return subprocess.Popen(cmd, cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_first_tokenizer_losses_are_bit_equal_with_1_and_2_threads(tmp_path):
    """Issue 24: the first backward's conv weight gradients depended on the thread split, and the
    nearest-code choice turned that rounding into another trajectory. Both runs busy at once."""
    procs = {t: _tiny_tokenizer_run(tmp_path / f"t{t}", t) for t in (1, 2)}
    for t, p in procs.items():
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    rows = {t: read_jsonl(tmp_path / f"t{t}" / "metrics.jsonl") for t in (1, 2)}
    assert [r["step"] for r in rows[1]] == [1, 2, 3, 4]
    for a, b in zip(rows[1], rows[2]):
        for k in ("loss", "grad_norm", "l2", "vq"):
            assert a[k] == b[k], (a["step"], k, a[k], b[k])


def test_trainer_resumes_a_checkpoint_that_predates_a_config_field_at_its_default(tmp_path):
    """A field added after a checkpoint was written (quantizer.revive_pick) counts at its default, which is
    the behaviour the checkpoint trained under; any other value is still refused."""
    import json

    train(train_cfg(2, ckpt_every=2), tmp_path / "r")
    meta_file = latest_checkpoint(tmp_path / "r" / "checkpoints") / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["config"]["quantizer"]["revive_pick"]               # as written before the field existed
    meta_file.write_text(json.dumps(meta))
    cfg = train_cfg(4, ckpt_every=2)
    cfg.quantizer.revive_pick = "d2"
    with pytest.raises(Exception, match=r"config differs \(quantizer.revive_pick: checkpoint 'uniform' vs now 'd2'"):
        train(cfg, tmp_path / "r")
    assert train(train_cfg(4, ckpt_every=2), tmp_path / "r")["step"] == 4
