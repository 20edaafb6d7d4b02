"""Checkpoint import from LlamaGen / MGVQ: state dicts with their parameter names and shapes are built
here from scratch (no third-party code), converted, loaded into groupgen's models and run."""
import argparse
import pickle

import pytest
import torch
import torch.nn.functional as F

from ar_model.convert import ConvertConfig, _image_size, convert_file, convert_llamagen_gpt, main
from ar_model.model import load_ar
from groupgen.checkpoint import load_meta
from tokenizer.convert import (ConvertError, convert_llamagen_vq, convert_mgvq_quantizer, infer_vq_config,
                               load_foreign, unwrap)
from tokenizer.model import load_tokenizer
from tokenizer.quantize import build_quantizer

torch.set_num_threads(1)

DIM, NL, NH, VOCAB, NC, HIDDEN = 64, 2, 4, 64, 10, 192   # LlamaGen: round_up(int(8*64/3), 32) = 192


def llamagen_gpt_sd(n_kv=NH, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05   # noqa: E731
    hd = DIM // NH
    sd = {"tok_embeddings.weight": r(VOCAB, DIM), "cls_embedding.embedding_table.weight": r(NC + 1, DIM),
          "norm.weight": 1 + r(DIM), "output.weight": r(VOCAB, DIM)}
    for i in range(NL):
        p = f"layers.{i}."
        sd.update({p + "attention.wqkv.weight": r((NH + 2 * n_kv) * hd, DIM), p + "attention.wo.weight": r(DIM, DIM),
                   p + "feed_forward.w1.weight": r(HIDDEN, DIM), p + "feed_forward.w3.weight": r(HIDDEN, DIM),
                   p + "feed_forward.w2.weight": r(DIM, HIDDEN), p + "attention_norm.weight": 1 + r(DIM),
                   p + "ffn_norm.weight": 1 + r(DIM)})
    return sd


TINY = ConvertConfig(n_head=NH, image_size=64)    # 64 px / 16 = 4x4 grid


def _conv(sd, name, cin, cout, k, r):
    sd[name + ".weight"] = r(cout, cin, k, k)
    sd[name + ".bias"] = r(cout)


def _gn(sd, name, c, r):
    sd[name + ".weight"] = 1 + r(c)
    sd[name + ".bias"] = r(c)


def _res(sd, p, cin, cout, r):
    _gn(sd, p + ".norm1", cin, r)
    _conv(sd, p + ".conv1", cin, cout, 3, r)
    _gn(sd, p + ".norm2", cout, r)
    _conv(sd, p + ".conv2", cout, cout, 3, r)
    if cin != cout:
        _conv(sd, p + ".nin_shortcut", cin, cout, 1, r)


def _attn(sd, p, c, r):
    _gn(sd, p + ".norm", c, r)
    for n in ("q", "k", "v", "proj_out"):
        _conv(sd, f"{p}.{n}", c, c, 1, r)


def llamagen_vq_sd(ch=128, ch_mult=(1, 2), nrb=1, z=64, embed=8, K=64, seed=0):
    """LlamaGen VQModel names/shapes (encoder/decoder conv_blocks, mid, quant convs, codebook)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05   # noqa: E731
    sd, n = {}, len(ch_mult)
    _conv(sd, "encoder.conv_in", 3, ch, 3, r)
    cin = ch
    for i, m in enumerate(ch_mult):
        for j in range(nrb):
            _res(sd, f"encoder.conv_blocks.{i}.res.{j}", cin, ch * m, r)
            cin = ch * m
            if i == n - 1:
                _attn(sd, f"encoder.conv_blocks.{i}.attn.{j}", cin, r)
        if i < n - 1:
            _conv(sd, f"encoder.conv_blocks.{i}.downsample.conv", cin, cin, 3, r)
    for part in ("encoder", "decoder"):
        c = ch * ch_mult[-1]
        _res(sd, f"{part}.mid.0", c, c, r)
        _attn(sd, f"{part}.mid.1", c, r)
        _res(sd, f"{part}.mid.2", c, c, r)
    _gn(sd, "encoder.norm_out", cin, r)
    _conv(sd, "encoder.conv_out", cin, z, 3, r)
    cin = ch * ch_mult[-1]
    _conv(sd, "decoder.conv_in", z, cin, 3, r)
    for k, i in enumerate(reversed(range(n))):
        for j in range(nrb + 1):
            _res(sd, f"decoder.conv_blocks.{k}.res.{j}", cin, ch * ch_mult[i], r)
            cin = ch * ch_mult[i]
            if i == n - 1:
                _attn(sd, f"decoder.conv_blocks.{k}.attn.{j}", cin, r)
        if i != 0:
            _conv(sd, f"decoder.conv_blocks.{k}.upsample.conv", cin, cin, 3, r)
    _gn(sd, "decoder.norm_out", cin, r)
    _conv(sd, "decoder.conv_out", cin, 3, 3, r)
    _conv(sd, "quant_conv", z, embed, 1, r)
    _conv(sd, "post_quant_conv", embed, z, 1, r)
    sd["quantize.embedding.weight"] = F.normalize(torch.randn(K, embed, generator=g), dim=-1)
    sd["quantize.codebook_used"] = torch.zeros(65536)
    return sd


@pytest.fixture(scope="module")
def vq_sd():
    return llamagen_vq_sd()


# ----------------------------------------------------------------------------- GPT


def test_gpt_convert_load_forward_and_weights(tmp_path):
    sd = llamagen_gpt_sd()
    torch.save({"model": sd, "steps": 1234, "args": argparse.Namespace(gpt_model="GPT-tiny")}, tmp_path / "g.pt")
    out = convert_file("llamagen-gpt", tmp_path / "g.pt", tmp_path / "ck", TINY)
    model, meta = load_ar(out)
    cfg = model.cfg
    assert (cfg.dim, cfg.n_layer, cfg.n_head, cfg.kv_heads, cfg.class_token_rope) == (DIM, NL, NH, NH, "zeros")
    assert model.layers[0].feed_forward.hidden == HIDDEN
    assert model.num_classes == NC and model.layout.K == (VOCAB,) and (model.layout.h, model.layout.w) == (4, 4)
    assert meta["converted_from"]["steps"] == 1234 and meta["converted_from"]["wrapper"] == "model"
    assert meta["step"] == 1234
    # weights land where they should
    assert torch.equal(model.class_embed.weight, sd["cls_embedding.embedding_table.weight"])
    assert torch.equal(model.heads.out.weight, sd["output.weight"])
    # the class token's rotary row is LlamaGen's zeros, the others rotate
    assert model.rope_cos[0].abs().max() == 0 and model.rope_cos[1:].abs().min() > 0
    # SwiGLU gate order: feed_forward(x) == w2(silu(w1 x) * w3 x) with the source tensors
    x = torch.randn(3, DIM)
    ref = (F.silu(x @ sd["layers.1.feed_forward.w1.weight"].T) * (x @ sd["layers.1.feed_forward.w3.weight"].T)
           ) @ sd["layers.1.feed_forward.w2.weight"].T
    with torch.no_grad():
        torch.testing.assert_close(model.layers[1].feed_forward(x), ref, rtol=1e-5, atol=1e-6)
        codes = torch.randint(0, VOCAB, (2, 16, 1))
        logits = model(codes, torch.tensor([1, NC]))
    assert len(logits) == 1 and logits[0].shape == (2, 16, VOCAB) and torch.isfinite(logits[0]).all()


def test_gpt_gqa_and_registry():
    # GQA: kv heads from wqkv rows; dims with a LlamaGen registry entry need no n_head
    gcfg_sd = llamagen_gpt_sd(n_kv=2)
    tensors, meta = convert_llamagen_gpt(gcfg_sd, TINY)
    assert meta["model"]["n_kv_head"] == 2 and tensors["layers.0.attention.wqkv.weight"].shape[0] == 128
    with pytest.raises(ConvertError, match="not a LlamaGen width"):
        convert_llamagen_gpt(llamagen_gpt_sd(), ConvertConfig(image_size=64))
    assert _image_size(ConvertConfig(), "c2i_XXL_384.pt") == 384
    assert _image_size(ConvertConfig(), "consolidated.pth") == 256
    assert _image_size(ConvertConfig(image_size=512), "c2i_XXL_384.pt") == 512


def test_gpt_key_errors_list_every_problem():
    sd = llamagen_gpt_sd()
    sd["layers.0.attention.extra.weight"] = torch.zeros(3)
    del sd["layers.1.ffn_norm.weight"]
    sd["output.weight"] = torch.zeros(VOCAB + 1, DIM)
    with pytest.raises(ConvertError) as e:
        convert_llamagen_gpt(sd, TINY)
    msg = str(e.value)
    assert "layers.0.attention.extra.weight" in msg and "layers.1.ffn_norm.weight" in msg
    assert "heads.out.weight" in msg and "[65, 64]" in msg
    # no null-class row -> explicit error
    sd = llamagen_gpt_sd()
    with pytest.raises(ConvertError, match="null class"):
        convert_llamagen_gpt(sd, ConvertConfig(n_head=NH, image_size=64, num_classes=NC + 1))
    with pytest.raises(ConvertError, match="tok_embeddings.weight"):
        convert_llamagen_gpt({"foo": torch.zeros(1)}, TINY)


def test_wrappers_and_prefixes_unwrap_to_the_same_weights(tmp_path):
    sd = llamagen_gpt_sd()
    want, _ = convert_llamagen_gpt(sd, TINY)
    variants = {"plain (FSDP consolidated.pth)": sd, "ddp": {"model": sd}, "deepspeed": {"module": sd},
                "lightning": {"state_dict": sd}, "ddp-prefix": {f"module.{k}": v for k, v in sd.items()},
                "compiled": {"model": {f"_orig_mod.{k}": v for k, v in sd.items()}},
                "ema": {"model": {k: v * 0 for k, v in sd.items()}, "ema": sd}}
    for name, obj in variants.items():
        torch.save(obj, tmp_path / "x.pt")
        got, info = load_foreign(tmp_path / "x.pt", "ema" if name == "ema" else "auto")
        tensors, _ = convert_llamagen_gpt(got, TINY)
        assert tensors.keys() == want.keys(), name
        assert all(torch.equal(tensors[k], want[k]) for k in want), name
    with pytest.raises(ConvertError, match="non-tensor entries"):
        unwrap({"model": sd, "optimizer": {"state": {}}, "steps": 3}, "optimizer")
    with pytest.raises(ConvertError, match="no weights under key 'ema'"):
        unwrap({"model": sd}, "ema")


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):   # unpickling would create a file: proof that code ran
        return (open, (self.path, "w"))


def test_weights_only_refuses_a_crafted_pickle(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": llamagen_gpt_sd(), "x": _Evil(str(marker))}, tmp_path / "evil.pt")
    with open(tmp_path / "evil_plain.pkl", "wb") as f:
        pickle.dump({"model": _Evil(str(marker))}, f, protocol=2)
    for name in ("evil.pt", "evil_plain.pkl"):
        with pytest.raises(ConvertError, match="weights_only=True"):
            load_foreign(tmp_path / name)
    assert not marker.exists()
    assert main(["--from", "llamagen-gpt", "--src", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists() and not marker.exists()


def test_cli_gpt(tmp_path, capsys):
    torch.save(llamagen_gpt_sd(), tmp_path / "consolidated.pth")
    rc = main(["--from", "llamagen-gpt", "--src", str(tmp_path / "consolidated.pth"), "--out", str(tmp_path / "ck"),
               "n_head=4", "image_size=128", "class_token_rope=identity", "dtype=bf16"])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    model, meta = load_ar(tmp_path / "ck")
    assert model.layout.L == 64 and model.cfg.class_token_rope == "identity"
    assert model.class_embed.weight.dtype == torch.bfloat16 and meta["converted_from"]["wrapper"] is None


# ----------------------------------------------------------------------------- VQ


def test_vq_convert_load_encode_decode(tmp_path, vq_sd):
    torch.save({"model": vq_sd, "steps": 5, "args": argparse.Namespace(vq_model="VQ-x")}, tmp_path / "vq.pt")
    assert main(["--from", "llamagen-vq", "--src", str(tmp_path / "vq.pt"), "--out", str(tmp_path / "ck"),
                 "image_size=8"]) == 0
    tok = load_tokenizer(tmp_path / "ck")
    meta = load_meta(tmp_path / "ck")
    c = meta["config"]
    assert (c["model"]["ch"], c["model"]["ch_mult"], c["model"]["num_res_blocks"]) == (128, [1, 2], 1)
    assert (c["model"]["z_channels"], c["model"]["embed_dim"], c["quantizer"]["codebook_size"]) == (64, 8, 64)
    assert c["quantizer"]["l2_norm"] and c["data"]["image_size"] == 8
    assert tok.layout.K == (64,) and (tok.layout.h, tok.layout.w) == (4, 4)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    codes = tok.encode(x)
    assert codes.shape == (2, 16, 1) and 0 <= codes.min() and codes.max() < 64
    with torch.no_grad():
        img = tok.decode_codes(codes)
    assert img.shape == (2, 3, 8, 8) and torch.isfinite(img).all()
    # decoding a code uses the (normalised) source codebook row through post_quant_conv
    emb = F.normalize(vq_sd["quantize.embedding.weight"], dim=-1)
    z = tok.quantizer.decode_codes(codes)
    torch.testing.assert_close(z, emb[codes[..., 0]])


def test_vq_attention_mapping_matches_llamagen_semantics(vq_sd):
    """mid-block attention: x + proj_out(softmax(q^T k / sqrt(C)) v) with the source q/k/v convs."""
    tensors, meta = convert_llamagen_vq(vq_sd, image_size=8)
    tok = load_from(tensors, meta)
    att = tok.net.encoder.mid[1]
    c = 256
    x = torch.randn(1, c, 2, 2)
    h = F.group_norm(x, 32, vq_sd["encoder.mid.1.norm.weight"], vq_sd["encoder.mid.1.norm.bias"], 1e-6)
    q, k, v = (F.conv2d(h, vq_sd[f"encoder.mid.1.{n}.weight"], vq_sd[f"encoder.mid.1.{n}.bias"]).flatten(2)
               for n in "qkv")
    w = torch.softmax(q.transpose(1, 2) @ k / c ** 0.5, dim=-1)        # [b, hw_q, hw_k]
    o = (v @ w.transpose(1, 2)).view(1, c, 2, 2)
    ref = x + F.conv2d(o, vq_sd["encoder.mid.1.proj_out.weight"], vq_sd["encoder.mid.1.proj_out.bias"])
    with torch.no_grad():
        torch.testing.assert_close(att(x), ref, rtol=1e-4, atol=1e-5)


def load_from(tensors, meta):
    from tokenizer.model import tokenizer_from_meta
    tok = tokenizer_from_meta(meta)
    tok.load_state_dict(tensors, strict=True)
    return tok.eval()


def test_vq_key_and_shape_errors(vq_sd):
    sd = dict(vq_sd)
    sd["encoder.conv_blocks.1.attn.0.extra.weight"] = torch.zeros(1)
    del sd["decoder.conv_blocks.0.attn.1.k.bias"]
    with pytest.raises(ConvertError) as e:
        convert_llamagen_vq(sd, image_size=8)
    msg = str(e.value)
    assert "encoder.conv_blocks.1.attn.0.extra.weight" in msg and "net.decoder.up.0.attns.1.qkv.bias" in msg
    with pytest.raises(ConvertError, match="not divisible"):
        convert_llamagen_vq(vq_sd, image_size=9)
    # widths below 128 would get fewer than LlamaGen's 32 GroupNorm groups in groupgen
    small = {k: v for k, v in vq_sd.items()}
    small["encoder.conv_in.weight"] = torch.zeros(32, 3, 3, 3)
    small["encoder.conv_blocks.0.res.0.conv1.weight"] = torch.zeros(32, 32, 3, 3)
    small["encoder.conv_blocks.1.res.0.conv1.weight"] = torch.zeros(64, 32, 3, 3)
    small["decoder.conv_blocks.0.res.0.conv1.weight"] = torch.zeros(64, 64, 3, 3)
    small["decoder.conv_blocks.1.res.0.conv1.weight"] = torch.zeros(32, 64, 3, 3)
    with pytest.raises(ConvertError, match="GroupNorm"):
        infer_vq_config(small, image_size=8)


# ----------------------------------------------------------------------------- MGVQ


def test_mgvq_quantizer_part_and_cli_explains_gap(tmp_path):
    G, K, d = 4, 16, 8
    g = torch.Generator().manual_seed(0)
    sd = {"quantize.embedding.weight": torch.randn(G * K, d, generator=g),
          "quantize.codebook_used": torch.zeros(G, 65536), "quantize.embed_prob": torch.zeros(G, K),
          "quant_conv.weight": torch.randn(32, 32 // G, 1, 1, generator=g), "quant_conv.bias": torch.zeros(32),
          "post_quant_conv.weight": torch.randn(32, 32 // G, 1, 1, generator=g),
          "post_quant_conv.bias": torch.zeros(32),
          "encoder.stages.4.op_list.0.main.conv.weight": torch.zeros(1)}
    tensors, qcfg = convert_mgvq_quantizer(sd)
    assert (qcfg.groups, qcfg.codebook_size, qcfg.l2_norm) == (G, K, True)
    q = build_quantizer(qcfg, G * d)
    q.load_state_dict({"books.embed": tensors["quantizer.books.embed"]}, strict=False)
    codes = torch.tensor([[[3, 0, 15, 7]]])
    z = q.decode_codes(codes)[0, 0]
    # MGVQ: group i's codebook is rows i*K..(i+1)*K of the embedding, l2-normalised, concatenated over groups
    want = torch.cat([F.normalize(sd["quantize.embedding.weight"][i * K + int(c)], dim=0)
                      for i, c in enumerate(codes[0, 0])])
    torch.testing.assert_close(z, want)
    torch.save({"state_dict": sd}, tmp_path / "mgvq.pt")
    assert main(["--from", "mgvq", "--src", str(tmp_path / "mgvq.pt"), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_converted_pair_loads_for_sampling(tmp_path, vq_sd):
    """A converted GPT naming a converted VQ passes the sampler's layout/hash checks and decodes."""
    from sampling.sample import load_models

    torch.save({"model": vq_sd}, tmp_path / "vq.pt")
    vq = convert_file("llamagen-vq", tmp_path / "vq.pt", tmp_path / "vq", ConvertConfig(image_size=8))
    torch.save({"model": llamagen_gpt_sd()}, tmp_path / "gpt.pt")
    gpt = convert_file("llamagen-gpt", tmp_path / "gpt.pt", tmp_path / "gpt",
                       ConvertConfig(n_head=NH, image_size=8, downsample=2, tokenizer=str(vq)))
    models, _ = load_models(gpt)
    assert models.tokenizer_hash == load_meta(gpt)["tokenizer_hash"]
    m = models.model
    m.init_cache(2)
    h = m.prefill(torch.tensor([0, NC]))
    codes = m.sample_position(h, lambda g, lg: lg.argmax(-1))
    assert codes.shape == (2, 1) and codes.max() < VOCAB
    with torch.no_grad():
        img = models.tokenizer.decode_codes(codes[:, None].expand(2, 16, 1).contiguous())
    assert img.shape == (2, 3, 8, 8)
