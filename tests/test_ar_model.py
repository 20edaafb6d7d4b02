"""Stage-2 GPT: KV-cache decoding == full forward, heads, class dropout, losses, RoPE, presets, I/O."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ar_model import GPT, GPT_PRESETS, GPTConfig, ar_meta, gpt_config, load_ar, param_groups
from ar_model.layers import Dropout, Linear, apply_rope, rope_angles_2d
from groupgen.checkpoint import CheckpointError, save_checkpoint
from groupgen.config import load_config
from groupgen.layout import LayoutError, TokenLayout

torch.set_num_threads(1)

GRID = TokenLayout("grid", 16, (16, 16, 16, 16), 4, 4)
SEQ = TokenLayout("seq", 8, (32,), per_position_codebook=True)
NC = 10


def make(layout, seed=0, randomize=True, **kw):
    """A micro model in eval mode; ``randomize`` replaces the zero-init heads by random weights."""
    torch.manual_seed(seed)
    kw.setdefault("dropout", 0.0)
    kw.setdefault("class_dropout", 0.0)
    m = GPT(gpt_config("micro", **kw), layout, NC)
    if randomize:
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "norm" not in name:
                    p.normal_(0, 0.1)
    return m.eval()


def data(layout, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    codes = torch.stack([torch.randint(0, k, (B, layout.L), generator=g) for k in layout.K], -1)
    labels = torch.randint(0, NC + 1, (B,), generator=g)
    return codes, labels


def cached_logits(m, codes, labels):
    """Per-position per-group logits from prefill/decode (one position at a time)."""
    B, L, G = codes.shape
    m.init_cache(B)
    h = m.prefill(labels)
    out = []
    for pos in range(L):
        out.append(m.head_logits(h, codes[:, pos]))
        h = m.decode(codes[:, pos], pos)   # the last call (pos = L-1) fills the cache's final slot
    return [torch.stack([o[g] for o in out], 1) for g in range(G)]


@pytest.mark.parametrize("layout", [GRID, SEQ], ids=["grid", "seq"])
@pytest.mark.parametrize("head", ["independent", "subtoken"])
@pytest.mark.parametrize("combine", ["sum", "concat"])
def test_kv_cache_matches_full_forward(layout, head, combine):
    m = make(layout, head=head, input_combine=combine)
    codes, labels = data(layout)
    with torch.no_grad():
        full = m(codes, labels)
        inc = cached_logits(m, codes, labels)
    assert [f.shape for f in full] == [(3, layout.L, k) for k in layout.K]
    for f, i in zip(full, inc):
        assert (f - i).abs().max().item() < 1e-5
    # causality: the last position's codes are only a target (and, for the subtoken head, the
    # teacher-forced context of its own later groups): no earlier logit and no group-0 logit moves
    c2 = codes.clone()
    c2[:, -1] = (c2[:, -1] + 1) % torch.tensor(layout.K)
    with torch.no_grad():
        moved = m(c2, labels)
    assert all(torch.equal(a[:, :-1], b[:, :-1]) for a, b in zip(full, moved))
    assert torch.equal(full[0], moved[0])


@pytest.mark.parametrize("extra", [dict(n_kv_head=2), dict(class_token_rope="zeros"),
                                   dict(head="subtoken", subtoken_dim=32, subtoken_layers=1)])
def test_kv_cache_variants(extra):
    m = make(GRID, **extra)
    codes, labels = data(GRID)
    with torch.no_grad():
        for f, i in zip(m(codes, labels), cached_logits(m, codes, labels)):
            assert (f - i).abs().max().item() < 1e-5


def test_class_token_rope_zeros_table():
    ident, zeros = make(GRID), make(GRID, class_token_rope="zeros")
    assert torch.all(ident.rope_cos[0] == 1) and torch.all(ident.rope_sin[0] == 0)
    assert torch.all(zeros.rope_cos[0] == 0) and torch.all(zeros.rope_sin[0] == 0)
    assert torch.equal(ident.rope_cos[1:], zeros.rope_cos[1:])


@pytest.mark.parametrize("head", ["independent", "subtoken"])
def test_sample_position_greedy_equals_chained_argmax(head):
    m = make(GRID, head=head)
    _, labels = data(GRID, B=5)
    with torch.no_grad():
        m.init_cache(5)
        h = m.prefill(labels)
        for pos in range(3):
            seen = []

            def pick(g, logits):
                seen.append(g)
                return logits.argmax(-1)

            got = m.sample_position(h, pick)
            assert seen == [0, 1, 2, 3] and got.shape == (5, 4) and got.dtype == torch.long
            ref = torch.zeros(5, 4, dtype=torch.long)
            for g in range(4):   # chain the argmax through teacher-forced head_logits
                ref[:, g] = m.head_logits(h, ref)[g].argmax(-1)
            assert torch.equal(got, ref)
            h = m.decode(got, pos)


def test_subtoken_head_is_chain_rule_independent_is_not():
    codes, labels = data(GRID)
    for head, depends in (("subtoken", True), ("independent", False)):
        m = make(GRID, head=head)
        c2 = codes.clone()
        c2[..., 0] = (c2[..., 0] + 1) % 16      # change group 0 everywhere
        with torch.no_grad():
            h = torch.randn(3, 64)
            a, b = m.head_logits(h, codes[:, 0]), m.head_logits(h, c2[:, 0])
        assert torch.equal(a[0], b[0])                       # group 0 never sees its own code
        assert (not torch.equal(a[1], b[1])) == depends      # group 1 conditions on group 0 iff subtoken


def test_class_dropout_rate_and_eval():
    m = make(GRID, class_dropout=0.1)
    labels = torch.randint(0, NC, (100_000,))
    m.train()
    torch.manual_seed(0)
    dropped = m.drop_labels(labels) == NC
    assert abs(dropped.float().mean().item() - 0.1) < 0.02
    kept = m.drop_labels(labels)
    assert torch.equal(kept[kept != NC], labels[kept != NC])  # the rest untouched
    m.eval()
    assert torch.equal(m._labels(labels), labels)            # never dropped in eval mode
    # the training forward really uses the dropped labels: p=1 equals the null class in eval
    m1 = make(GRID, class_dropout=1.0)
    codes, labels = data(GRID)
    labels = labels.clamp(max=NC - 1)
    with torch.no_grad():
        ref = m1(codes, torch.full_like(labels, NC))
        m1.train()
        got = m1(codes, labels)
        m1.eval()
        cond = m1(codes, labels)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert not torch.equal(ref[0], cond[0])


def test_per_group_loss_is_cross_entropy():
    lay = TokenLayout("grid", 4, (5, 3), 2, 2)
    m = make(lay)
    codes, labels = data(lay, B=2)
    with torch.no_grad():
        loss, per = m.loss(codes, labels)
        logits = m(codes, labels)
    for g, lg in enumerate(logits):
        lg = lg.double()
        nll = [torch.logsumexp(lg[b, t], 0) - lg[b, t, codes[b, t, g]] for b in range(2) for t in range(4)]
        assert abs(per[g].item() - (sum(nll) / len(nll)).item()) < 1e-5
    assert abs(loss.item() - per.mean().item()) < 1e-6


@pytest.mark.parametrize("head", ["independent", "subtoken"])
def test_zero_init_heads_give_uniform_loss(head):
    lay = TokenLayout("grid", 16, (16, 8, 4, 32), 4, 4)
    m = GPT(gpt_config("micro", head=head), lay, NC).train()   # dropout on: still uniform
    codes, labels = data(lay)
    loss, per = m.loss(codes, labels)
    assert torch.allclose(per, torch.tensor([math.log(k) for k in lay.K]), atol=1e-6)
    assert abs(loss.item() - sum(math.log(k) for k in lay.K) / 4) < 1e-6


def test_training_steps_reduce_loss():
    m = GPT(gpt_config("micro", head="subtoken"), GRID, NC).train()
    codes, labels = data(GRID, B=4)
    opt = torch.optim.AdamW(param_groups(m, 0.05), lr=3e-3)
    first = None
    for _ in range(15):
        loss, _ = m.loss(codes, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first - 0.3


def test_layout_and_input_errors():
    m = make(GRID)
    codes, labels = data(GRID)
    with pytest.raises(LayoutError, match="G=4"):
        m(codes[..., :3], labels)
    with pytest.raises(LayoutError, match="L=16"):
        m(codes[:, :8], labels)
    bad = codes.clone()
    bad[0, 0, 2] = 16
    with pytest.raises(LayoutError, match="group 2"):
        m(bad, labels)
    with pytest.raises(LayoutError, match="integer"):
        m(codes.float(), labels)
    with pytest.raises(ValueError, match="labels"):
        m(codes, torch.full_like(labels, NC + 1))
    m.init_cache(3)
    h = m.prefill(labels)
    with pytest.raises(LayoutError, match="G=4"):
        m.decode(codes[:, 0, :2], 0)
    with pytest.raises(RuntimeError, match="fed first"):
        m.decode(codes[:, 2], 2)
    with pytest.raises(ValueError, match="shape"):
        m.sample_position(h, lambda g, lg: lg.argmax(-1)[:1])
    # n_head 32 -> head_dim 2: even but not divisible by 4 -> no 2D RoPE
    with pytest.raises(ValueError, match="2D RoPE"):
        GPT(gpt_config("micro", n_head=32), GRID, NC)


def test_2d_rope_rows_and_columns():
    hd, h, w = 16, 4, 4
    ang = rope_angles_2d(h, w, hd, 10000.0)
    q = hd // 4   # pairs per half
    for p in range(h * w):
        r, c = divmod(p, w)
        assert torch.allclose(ang[p, :q], r * ang[w, :q])      # first half: row (position w = row 1)
        assert torch.allclose(ang[p, q:], c * ang[1, q:])      # second half: column
    # rotating a vector: same row -> first half identical; same column -> second half identical
    x = torch.randn(1, 1, 1, hd).expand(1, h * w, 1, hd)
    y = apply_rope(x, ang.cos().float(), ang.sin().float())[0, :, 0]
    assert torch.allclose(y[1, : hd // 2], y[2, : hd // 2]) and not torch.allclose(y[1, hd // 2:], y[2, hd // 2:])
    assert torch.allclose(y[1, hd // 2:], y[w + 1, hd // 2:]) and not torch.allclose(y[1, : hd // 2], y[w + 1, : hd // 2])
    assert torch.allclose(y.norm(dim=-1), x[0, :, 0].norm(dim=-1))
    # relative: <R(p1) a, R(p2) b> depends only on (dr, dc)
    a, b = torch.randn(hd), torch.randn(hd)
    ra = apply_rope(a.expand(1, h * w, 1, hd), ang.cos().float(), ang.sin().float())[0, :, 0]
    rb = apply_rope(b.expand(1, h * w, 1, hd), ang.cos().float(), ang.sin().float())[0, :, 0]
    assert torch.allclose(ra[0] @ rb[w + 1], ra[w + 2] @ rb[2 * w + 3], atol=1e-5)
    assert not torch.allclose(ra[0] @ rb[w + 1], ra[0] @ rb[2], atol=1e-3)


def _rope_pairs(x, cos, sin):
    """Reference rotation of interleaved pairs, written out."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_equals_pair_rotation_values_and_grads(dtype):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 5, 7, 8, generator=g)            # [B, T, heads, hd]; rotate a strided slice
    ang = torch.randn(5, 4, generator=g)
    cos, sin = ang.cos(), ang.sin()
    base = qkv.to(dtype).clone().requires_grad_()
    y = apply_rope(base[:, :, 1:5], cos, sin)
    assert y.dtype == dtype and y.shape == (2, 5, 4, 8)
    ref_base = qkv.clone().requires_grad_()
    ref = _rope_pairs(ref_base[:, :, 1:5], cos, sin)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert (y.float() - ref).abs().max().item() < tol
    w = torch.randn(2, 5, 4, 8, generator=g)
    (y.float() * w).sum().backward()
    (ref * w).sum().backward()
    assert (base.grad.float() - ref_base.grad).abs().max().item() < tol
    assert torch.all(base.grad[:, :, [0, 5, 6]] == 0)      # outside the slice: untouched


@pytest.mark.parametrize("preset,expected", [("B", 111e6), ("L", 343e6), ("XL", 775e6), ("XXL", 1.4e9),
                                             ("3B", 3.1e9)])
def test_preset_param_counts(preset, expected):
    lay = TokenLayout("grid", 256, (16384,), 16, 16)
    with torch.device("meta"):
        m = GPT(gpt_config(preset), lay, 1000)
    assert abs(m.num_params() / expected - 1) < 0.02, m.num_params()


def test_config_presets_and_yaml_overrides(tmp_path):
    assert set(GPT_PRESETS) >= {"micro", "tiny", "small", "B", "L", "XL", "XXL", "3B"}
    c = gpt_config("B", dropout=0.0)
    assert (c.n_layer, c.dim, c.n_head, c.token_dropout, c.resid_dropout, c.ffn_dropout) == (12, 768, 12, 0, 0, 0)
    with pytest.raises(ValueError, match="unknown GPT preset"):
        gpt_config("nope")
    with pytest.raises(ValueError, match="n_kv_head"):
        gpt_config("micro", n_kv_head=3)
    with pytest.raises(ValueError, match="head"):
        GPTConfig(head="mlp").validate()
    f = tmp_path / "m.yaml"
    f.write_text("dim: 64\nn_head: 4\nhead: subtoken\n")
    c = load_config(GPTConfig, f, ["n_kv_head=2", "class_token_rope=zeros"])
    assert (c.dim, c.head, c.n_kv_head, c.class_token_rope) == (64, "subtoken", 2, "zeros")


def test_param_groups():
    m = make(SEQ, head="subtoken", input_combine="concat")
    groups = param_groups(m, 0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    decay = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert id(m.tok_embed.weight) in decay and id(m.class_embed.weight) in decay and id(m.pos_embed) in decay
    assert id(m.norm.weight) not in decay and id(m.layers[0].attention_norm.weight) not in decay


@pytest.mark.parametrize("layout,kw", [(GRID, dict(head="subtoken")), (SEQ, dict(input_combine="concat"))])
def test_checkpoint_round_trip(tmp_path, layout, kw):
    m = make(layout, **kw)
    assert (m.pos_embed is not None) == layout.per_position_codebook
    meta = ar_meta(m.cfg, layout, NC, class_names=[str(i) for i in range(NC)], tokenizer="tok/ckpt",
                   tokenizer_hash="abc")
    save_checkpoint(tmp_path / "ckpts", 7, {"model": m.state_dict()}, meta)
    m2, meta2 = load_ar(tmp_path / "ckpts")
    assert meta2["kind"] == "ar" and meta2["tokenizer_hash"] == "abc" and meta2["num_classes"] == NC
    assert not m2.training and m2.layout == layout and m2.cfg == m.cfg
    codes, labels = data(layout)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(m(codes, labels), m2(codes, labels)))
    save_checkpoint(tmp_path / "tok", 1, {"model": m.state_dict()}, dict(meta, kind="tokenizer"))
    with pytest.raises(CheckpointError, match="expected 'ar'"):
        load_ar(tmp_path / "tok")


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu_kernel", "sdpa"])
def test_bf16_kv_cache_under_fp32_equals_a_forward_with_bf16_keys_and_values(monkeypatch, cpu_kernel_path,
                                                                             count_taken, kernels):
    """An fp32 model over a bf16 cache (sampling's ``kv_cache=bf16``) rounds each key and value once,
    when it is written, and computes everything else in fp32: the cache holds exactly the bf16
    rounding of the keys and values decoding computed, and decoding equals the full forward fed
    those cached keys and values.

    The reference takes the cache's own k/v, not a bf16 rounding of the forward's: the decode step's
    GEMMs (groupgen's kernel, MKL's packed GEMM) and the forward's sum in other orders, so their fp32
    keys differ by ~1e-7, and a key within that of a bf16 rounding boundary rounds to the neighbouring
    bf16 value, a 4e-4 change in the logits. Which keys straddle a boundary depends on the CPU's GEMM
    (MKL takes other kernels on AMD than on Intel), so only this reference is the same on every CPU."""
    from ar_model.cpu import kernels as cpu_kernels
    from ar_model.layers import Attention
    cpu_kernel_path(kernels)
    calls = count_taken(cpu_kernels, ["attention"])
    m = make(GRID)   # the independent head: the subtoken head's own attention has no cache
    codes, labels = data(GRID)
    qkv = Attention._qkv
    written = {}   # attention module -> the fp32 k/v of each decode step, in order

    def record(self, x, cos, sin):
        q, k, v = qkv(self, x, cos, sin)
        written.setdefault(self, []).append((k, v))
        return q, k, v

    with torch.no_grad():
        exact = m(codes, labels)
        B, L, G = codes.shape
        m.init_cache(B, dtype=torch.bfloat16)
        assert m._kv[0][0].dtype == torch.bfloat16
        monkeypatch.setattr(Attention, "_qkv", record)
        h = m.prefill(labels)
        out = []
        for pos in range(L):
            out.append(m.head_logits(h, codes[:, pos]))
            assert h.dtype == torch.float32
            h = m.decode(codes[:, pos], pos)
        inc = [torch.stack([o[g] for o in out], 1) for g in range(G)]
        assert (calls["attention"] > 0) == kernels
        cache = {layer.attention: kv for layer, kv in zip(m.layers, m._kv)}
        assert set(written) == set(cache)
        for attn, steps in written.items():   # each key and value rounded once, when written
            for c, i in ((cache[attn][0], 0), (cache[attn][1], 1)):
                fp32 = torch.cat([s[i] for s in steps], 2)
                assert fp32.dtype == torch.float32
                assert torch.equal(c[:, :, : fp32.shape[2]], fp32.bfloat16())

        def cached_kv(self, x, cos, sin):
            q, k, v = qkv(self, x, cos, sin)
            kc, vc = cache[self]
            T = k.shape[2]
            return q, kc[:, :, :T].float(), vc[:, :, :T].float()

        monkeypatch.setattr(Attention, "_qkv", cached_kv)
        rounded = m(codes, labels)
    for i, r, e in zip(inc, rounded, exact):
        assert (i - r).abs().max().item() < 1e-5            # fp32 agreement with the forward over the cache
        assert 1e-5 < (i - e).abs().max().item() < 0.02     # the rounding is real, and small


def test_bf16_autocast_decoding_close_to_fp32():
    m = make(GRID, head="subtoken")
    codes, labels = data(GRID)
    with torch.no_grad():
        ref = m(codes, labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m.init_cache(3, dtype=torch.bfloat16)
            h = m.prefill(labels)
            got = m.head_logits(h, codes[:, 0])
            h = m.decode(codes[:, 0], 0)
            got1 = m.head_logits(h, codes[:, 1])
    for g in range(4):
        for lg, pos in ((got, 0), (got1, 1)):
            err = (lg[g].float() - ref[g][:, pos]).abs().max().item()
            assert err < 0.05 * ref[g][:, pos].abs().max().item() + 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_packed_decode_path_equals_f_linear(bias, dtype):
    from ar_model.cpu.nn_ops import _PACKED
    torch.manual_seed(0)
    lin = Linear(48, 80, bias=bias).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    with torch.no_grad():
        if bias:
            lin.bias.normal_()
        for shape in [(16, 48), (8, 1, 48), (2, 3, 48), (64, 48)]:     # decode sizes: the packed path
            x = torch.randn(*shape).to(dtype)
            y = lin(x)
            ref = F.linear(x, lin.weight, lin.bias)
            assert y.shape == ref.shape and y.dtype == dtype and y.is_contiguous()
            assert ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item() < tol
            assert not torch.equal(y, torch.zeros_like(y))
        packed = _PACKED[lin]
        lin(torch.randn(64, 48).to(dtype))
        assert _PACKED[lin] is packed                         # same rows, same weight: reused
        lin.weight.mul_(2.0)                                  # an in-place update invalidates it
        x = torch.randn(64, 48).to(dtype)
        assert ((lin(x).float() - F.linear(x, lin.weight, lin.bias).float()).abs().max()
                / F.linear(x, lin.weight, lin.bias).float().abs().max()).item() < tol
        assert _PACKED[lin] is not packed
        copy.deepcopy(lin)                                    # the pack lives outside the module
        lin.release_packed()
        assert lin not in _PACKED
        x = torch.randn(100, 48).to(dtype)                    # too many rows: F.linear itself
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias)) and lin not in _PACKED
    x = torch.randn(16, 48, requires_grad=True).to(dtype)     # autograd: F.linear itself
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias)) and lin not in _PACKED
    assert isinstance(lin, torch.nn.Linear) and set(lin.state_dict()) == ({"weight", "bias"} if bias else {"weight"})


def test_clear_cache_releases_packed_weights():
    from ar_model.cpu.nn_ops import _PACKED
    lay = TokenLayout("grid", 4, (5, 3), 2, 2)
    m = make(lay, head="subtoken")
    with torch.no_grad():
        m.init_cache(4)
        h = m.prefill(torch.tensor([0, 1, 2, 0]))
        m.sample_position(h, lambda g, lg: lg.argmax(-1))
    lins = [x for x in m.modules() if isinstance(x, Linear)]
    packed = [x for x in lins if x in _PACKED]
    assert packed
    m.clear_cache(release_packed=False)                         # a sampler between chunks
    assert m._kv is None and all(x in _PACKED for x in packed)
    m.clear_cache()
    assert not any(x in _PACKED for x in lins)


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_fast_cpu_dropout(p, kernel, cpu_kernel_path):
    """Both CPU paths: the Philox kernel (where built) and the integer-draw fallback."""
    cpu_kernel_path(kernel)
    d = Dropout(p).train()
    x = torch.ones(500, 401, requires_grad=True)      # odd size: the 4-per-draw packing is cut
    torch.manual_seed(0)
    y = d(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.005
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())              # d(x*m)/dx = m
    torch.manual_seed(0)
    assert torch.equal(d(x), y)                         # the global RNG drives it
    yb = d(torch.ones(64, 64, dtype=torch.bfloat16))
    assert yb.dtype == torch.bfloat16 and set(yb.unique().tolist()) <= {0.0, round(1 / (1 - p), 2)} | {
        float(torch.tensor(1 / (1 - p), dtype=torch.bfloat16))}
    d.eval()
    assert torch.equal(d(x), x)
    # masks of neighbouring elements are independent (no shared bits between the four 15-bit draws)
    m = (d.train()(torch.ones(4, 200_000)) != 0).float()
    assert abs((m[:, ::4] * m[:, 1::4]).mean().item() - (1 - p) ** 2) < 0.01


def test_a_dtype_cast_keeps_the_rotary_tables_in_fp32():
    """bf16 sampling casts the model; the rotary tables must stay the fp32 angles (a bf16 rounding
    of cos/sin is up to a 0.4% error in every rotated query and key)."""
    m = make(GRID)
    cos, sin = m.rope_cos.clone(), m.rope_sin.clone()
    mb = m.to(torch.bfloat16)
    assert mb.rope_cos.dtype == mb.rope_sin.dtype == torch.float32
    assert torch.equal(mb.rope_cos, cos) and torch.equal(mb.rope_sin, sin)
    assert all(p.dtype == torch.bfloat16 for p in mb.parameters())
    assert copy.deepcopy(mb).rope_cos.dtype == torch.float32
