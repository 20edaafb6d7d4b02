"""Quantizers: one interface for vq / multigroup / pertoken / residual / fsq / lfq."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from groupgen.config import from_dict
from tokenizer.quantize import QuantizerConfig, build_quantizer

torch.set_num_threads(1)

# (config kwargs, latent dim D, positions L)
KINDS = {
    "vq": (dict(kind="vq", codebook_size=64), 8, 16),
    "vq_l2_entropy": (dict(kind="vq", codebook_size=64, l2_norm=True, entropy_weight=0.1), 8, 16),
    "vq_ema": (dict(kind="vq", codebook_size=64, ema=True), 8, 16),
    "multigroup": (dict(kind="multigroup", groups=4, codebook_size=32, l2_norm=True,
                        nested_mask=True, revive_every=5), 16, 16),
    "pertoken": (dict(kind="pertoken", num_tokens=12, codebook_size=16, reset_every=5,
                      ordered_dropout_p=0.5, codebook_weight=0.25, beta=1.0), 8, 12),
    "residual": (dict(kind="residual", groups=3, codebook_size=32, init_scale=1.0), 8, 16),
    "residual_shared": (dict(kind="residual", groups=3, codebook_size=32, residual_shared=True), 8, 16),
    "fsq": (dict(kind="fsq", levels=[8, 8, 5, 5], fsq_groups=2), 4, 16),
    "lfq": (dict(kind="lfq", lfq_split=[2, 4], entropy_weight=0.1), 6, 16),
}


def make(name, seed=0, **over):
    torch.manual_seed(seed)
    kw, D, L = KINDS[name]
    return build_quantizer(QuantizerConfig(**{**kw, **over}), D), D, L


class OpRecorder(TorchDispatchMode):
    """Records every aten op with its output sizes and dtypes."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        for o in outs:
            if isinstance(o, torch.Tensor):
                self.ops.append((str(func), o.numel(), o.dtype))
        return out


@pytest.mark.parametrize("name", list(KINDS))
def test_straight_through_gradient_reaches_z(name):
    q, D, L = make(name)
    q.train()
    z = torch.randn(3, L, D, requires_grad=True)
    out, codes, losses = q.quantize(z)
    assert out.shape == z.shape and out.dtype == torch.float32
    assert codes.shape == (3, L, len(q.layout_K())) and codes.dtype == torch.long
    assert set(losses) >= {"vq"} and losses["vq"].dim() == 0
    (out * torch.randn_like(out)).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_straight_through_is_identity_for_plain_vq():
    q, D, L = make("vq")
    z = torch.randn(2, L, D, requires_grad=True)
    w = torch.randn(2, L, D)
    out, _, _ = q.quantize(z)
    (out * w).sum().backward()
    assert torch.equal(z.grad, w)
    assert q.books.embed.grad is None  # the codebook learns from its own loss, not through z_q


@pytest.mark.parametrize("name", ["vq", "multigroup", "residual"])
def test_nearest_matches_brute_force_without_broadcast_tensor(name):
    q, D, L = make(name, nested_mask=False) if name == "multigroup" else make(name)
    q.eval()
    B = 4
    z = torch.randn(B, L, D)
    rec = OpRecorder()
    with rec:
        _, codes, _ = q.quantize(z)
    K = q.cfg.codebook_size
    assert max(n for _, n, _ in rec.ops) <= B * L * K * D // 2  # a [.., K, d] broadcast is B*L*K*D
    e = q.books.codebook()
    if name == "residual":
        r = z.reshape(-1, D)
        for g in range(q.G):
            s = q._slot(g)
            brute = ((r[:, None, :] - e[s][None]) ** 2).sum(-1).argmin(-1)
            assert torch.equal(codes.reshape(-1, q.G)[:, g], brute)
            r = r - e[s][brute]
    else:
        G, d = q.G, q.d
        x = z.reshape(-1, G, d)
        if q.cfg.l2_norm:
            x = torch.nn.functional.normalize(x, dim=-1)
        for g in range(G):
            brute = ((x[:, g, None, :] - e[g][None]) ** 2).sum(-1).argmin(-1)
            assert torch.equal(codes.reshape(-1, G)[:, g], brute)


def test_nested_masking_zeroes_exactly_masked_groups():
    q, D, L = make("multigroup", nested_keep_probs=[0.0, 1.0, 0.0, 0.0], revive_every=0)
    q.train()
    z = torch.randn(2, L, D, requires_grad=True)
    out, codes, losses = q.quantize(z)
    g = out.reshape(2, L, 4, 4)
    assert (g[:, :, 2:] == 0).all()
    assert (g[:, :, :2].abs().sum(-1) > 0).all()
    # VQ losses only over the kept groups
    x = torch.nn.functional.normalize(z.detach().reshape(-1, 4, 4), dim=-1)
    e = q.books.codebook().detach()
    qk = torch.stack([e[j][codes.reshape(-1, 4)[:, j]] for j in range(4)], 1)
    want = ((x[:, :2] - qk[:, :2]) ** 2).mean()
    assert torch.allclose(losses["commitment"], want, atol=1e-6)
    out.sum().backward()
    assert (z.grad.reshape(2, L, 4, 4)[:, :, 2:] == 0).all()
    # eval: no masking
    q.eval()
    out, _, _ = q.quantize(z.detach())
    assert (out.reshape(2, L, 4, 4).abs().sum(-1) > 0).all()


def test_nested_masking_default_schedule_never_masks_group_0():
    q, D, L = make("multigroup", revive_every=0)
    assert q.cfg.keep_probs() == [0.2, 0.1, 0.1, 0.6]
    q.train()
    z = torch.randn(1, 4, D)
    kept = []
    for _ in range(400):
        out, _, _ = q.quantize(z)
        nz = (out.reshape(4, 4, 4).abs().sum(-1) > 0).all(0)  # [G] group is nonzero everywhere
        k = int(nz.sum())
        assert nz[0] and bool(nz[:k].all()) and not bool(nz[k:].any())
        assert k == q.last_keep
        kept.append(k)
    freq = [kept.count(k) / len(kept) for k in (1, 2, 3, 4)]
    assert abs(freq[0] - 0.2) < 0.07 and abs(freq[3] - 0.6) < 0.08 and min(freq) > 0


def test_keep_probs_generalise():
    for G in (2, 3, 8):
        p = QuantizerConfig(kind="multigroup", groups=G).keep_probs()
        assert len(p) == G and abs(sum(p) - 1) < 1e-9 and p[-1] == 0.6


@pytest.mark.parametrize("name", list(KINDS))
def test_decode_codes_bit_exact_in_eval(name):
    q, D, L = make(name)
    q.train()
    for _ in range(2):  # a few training forwards (EMA moves codes) before checking
        q.quantize(torch.randn(4, L, D))
    if getattr(q, "offset", None) is not None and isinstance(q.offset, torch.nn.Parameter):
        with torch.no_grad():
            q.offset.normal_()  # a nonzero learned offset must be reproduced as well
    q.eval()
    z = torch.randn(5, L, D) * 2
    out, codes, _ = q.quantize(z)
    dec = q.decode_codes(codes)
    assert dec.dtype == out.dtype and torch.equal(dec, out)


def test_multigroup_decode_with_fewer_groups():
    q, D, L = make("multigroup")
    q.eval()
    z = torch.randn(2, L, D)
    out, codes, _ = q.quantize(z, keep_groups=2)
    assert torch.equal(q.decode_codes(codes, keep_groups=2), out)
    assert (out.reshape(2, L, 4, 4)[:, :, 2:] == 0).all()


def test_pertoken_layout_offset_and_ordered_dropout():
    q, D, L = make("pertoken", ordered_dropout_p=1.0)
    assert q.per_position_codebook and q.layout_K() == (16,)
    assert q.books.embed.shape == (L, 16, D)
    assert q.books.embed.abs().max() <= 0.5 and q.books.embed.abs().max() > 0.4  # U(-0.5, 0.5)
    with torch.no_grad():
        q.offset.fill_(3.0)
    q.train()
    out, codes, _ = q.quantize(torch.randn(64, L, D))
    alive = out.abs().sum(-1) > 0  # [B, C]
    assert alive[:, 0].all()  # token 0 is never dropped
    k = alive.sum(1)
    assert (k < L).all()  # p=1: every sample drops a suffix
    assert torch.equal(alive, torch.arange(L)[None] < k[:, None])  # prefix kept, suffix zeroed
    with pytest.raises(ValueError, match="expected z of shape"):
        q.quantize(torch.randn(2, L + 1, D))


def test_pertoken_codebooks_differ_per_position():
    q, D, L = make("pertoken")
    q.eval()
    codes = torch.zeros(1, L, 1, dtype=torch.long)
    zq = q.decode_codes(codes)
    assert not torch.equal(zq[0, 0], zq[0, 1])
    assert torch.equal(zq[0, 3], q.books.embed[3, 0].float() + q.offset[3])


def test_grad_magnitude_reset_moves_unused_code_next_to_most_loaded():
    torch.manual_seed(0)
    cfg = QuantizerConfig(kind="pertoken", num_tokens=2, codebook_size=4, reset_every=3)
    q = build_quantizer(cfg, 3)
    with torch.no_grad():
        q.books.embed.copy_(torch.tensor([[0.0, 0, 0], [10, 0, 0], [0, 10, 0], [-9, -9, -9]]).expand(2, 4, 3))
    q.train()
    for step in (1, 2, 3):
        # token 0: half the batch near code 0 (small error), half near code 1 far off (large grad)
        z = torch.zeros(8, 2, 3)
        z[4:, 0] = torch.tensor([8.0, 0, 0])
        z[:, 1] = torch.tensor([0.1, 0, 0])  # token 1 only uses code 0
        out, codes, losses = q.quantize(z)
        losses["vq"].backward()
        q.after_backward()
        before = q.books.embed.detach().clone()
        info = q.step_end(step)
        q.books.embed.grad = None
    assert info == {"reset": 3}  # token 0: 2 unused <-> 2 loaded; token 1: 1 loaded, 3 unused -> 1
    after = q.books.embed.detach()
    # token 0: codes 2 and 3 unused; code 1 (far from its inputs) is the most loaded, then code 0
    assert (after[0, 2] - before[0, 1]).abs().max() < 1e-3 and not torch.equal(after[0, 2], before[0, 1])
    assert (after[0, 3] - before[0, 0]).abs().max() < 1e-3
    assert torch.equal(after[0, :2], before[0, :2])
    # token 1: only code 0 is loaded, split at most once: exactly one unused code moves next to it
    near = ((after[1, 1:] - before[1, 0]).abs().max(-1).values < 1e-3)
    assert int(near.sum()) == 1
    assert q.books.grad_acc.abs().sum() == 0 and q.books.round_usage.sum() == 0


def test_revival_reinitialises_dead_codes_from_batch_features():
    # revive_noise=0: the unperturbed path, so each revived code equals a feature exactly
    q, D, L = make("multigroup", l2_norm=False, nested_mask=False, revive_every=2, revive_noise=0.0)
    with torch.no_grad():
        q.books.embed[:, 8:] = 100.0  # far away: never chosen
    q.train()
    feats = []
    for step in (1, 2):
        z = torch.randn(2, L, D)
        q.quantize(z)
        feats.append(z.reshape(-1, 4, 4))
        info = q.step_end(step)
    e = q.books.embed.detach()
    assert info["revived"] >= 4 * 24
    assert (e[:, 8:] < 50).all()
    for g in range(4):  # every revived code is a feature of its own group from the last batch
        d = (e[g, 8:, None, :] - feats[-1][None, :, g]).abs().amax(-1)  # [dead, N]
        assert (d.min(-1).values == 0).all()
    assert q.books.window_usage.sum() == 0


def test_residual_error_shrinks_with_depth():
    torch.manual_seed(0)
    q = build_quantizer(QuantizerConfig(kind="residual", groups=4, codebook_size=128, init_scale=1.0), 2)
    with torch.no_grad():  # like trained RQ codebooks: each depth on the scale of its residuals
        q.books.embed.mul_(0.2 ** torch.arange(4.0)[:, None, None])
    q.eval()
    z = torch.rand(1, 256, 2) * 2 - 1
    out, codes, _ = q.quantize(z)
    e = q.books.codebook().detach()
    partial = torch.zeros_like(z)
    errs = [float((z ** 2).mean())]
    for g in range(4):
        partial = partial + e[g][codes[0, :, g]][None]
        errs.append(float(((z - partial) ** 2).mean()))
    assert all(b < 0.7 * a for a, b in zip(errs, errs[1:])), errs
    assert torch.allclose(out, partial)


def test_fsq_grid_and_index_round_trip():
    q, D, L = make("fsq")
    assert q.layout_K() == (64, 25)
    z = torch.randn(4, L, D) * 3
    out, codes, _ = q.quantize(z)
    for c, lv in enumerate([8, 8, 5, 5]):
        grid = (torch.arange(lv) - lv // 2).float() / (lv // 2)
        assert torch.isin(out[..., c], grid).all()
    assert torch.equal(q.decode_codes(codes), out)
    # every digit combination maps to a distinct index in [0, K) and back
    digits = torch.cartesian_prod(*[torch.arange(n) for n in (8, 8, 5, 5)])[None]
    c = q.digits_to_codes(digits)
    assert c[..., 0].max() == 63 and c[..., 1].max() == 24 and c.min() == 0
    assert len(set(map(tuple, c[0].tolist()))) == 8 * 8 * 5 * 5
    assert torch.equal(q.codes_to_digits(c), digits)
    # z = 0 lands on the zero level; large |z| saturates at the ends of the grid
    out0, _, _ = q.quantize(torch.zeros(1, 1, D))
    assert (out0 == 0).all()
    outb, _, _ = q.quantize(torch.tensor([[[50.0, -50, 50, -50]]]))
    assert torch.equal(outb[0, 0], torch.tensor([0.75, -1.0, 1.0, -1.0]))


def test_lfq_round_trip_and_entropy_sign():
    cfg = QuantizerConfig(kind="lfq", lfq_split=[6, 12])
    q = build_quantizer(cfg, 18)
    assert q.layout_K() == (64, 4096)
    z = torch.randn(2, 10, 18)
    out, codes, _ = q.quantize(z)
    assert torch.equal(out, torch.where(z > 0, 1.0, -1.0))
    assert torch.equal(q.decode_codes(codes), out)
    bits = (z > 0).long()
    assert torch.equal(codes[..., 0], (bits[..., :6] * 2 ** torch.arange(6)).sum(-1))
    assert torch.equal(codes[..., 1], (bits[..., 6:] * 2 ** torch.arange(12)).sum(-1))

    small = build_quantizer(QuantizerConfig(kind="lfq", lfq_split=[2, 2]), 4)
    corners = torch.tensor([[a, b, c, d] for a in (-1., 1) for b in (-1., 1) for c in (-1., 1)
                            for d in (-1., 1)])
    confident_diverse = small.entropy(corners)           # every code once, far from 0
    uncertain = small.entropy(corners * 1e-4)             # near 0: every bit a coin flip
    collapsed = small.entropy(torch.ones(16, 4))          # confident but one code only
    assert confident_diverse[0] < 1e-3 and abs(confident_diverse[1] - 2 * math.log(4)) < 1e-4
    assert uncertain[0] > 2 * math.log(4) - 1e-3 and collapsed[1] < 1e-3
    small.cfg.entropy_weight = 1.0
    loss = [small.quantize(x[None])[2]["entropy"] for x in (corners, corners * 1e-4, torch.ones(16, 4))]
    assert loss[0] < loss[1] and loss[0] < loss[2]
    # the per-bit path (chunks > 12 bits) and the exact path agree on the per-sample entropy
    big = build_quantizer(QuantizerConfig(kind="lfq"), 14)  # one 14-bit index: per-bit path
    x = torch.randn(32, 14)
    s_big, _ = big.entropy(x)
    s_exact = sum(build_quantizer(QuantizerConfig(kind="lfq", lfq_split=[7, 7]), 14).entropy(x)[:1])
    assert torch.allclose(s_big, s_exact, atol=1e-4)


def test_ema_moves_codes_toward_assigned_means():
    torch.manual_seed(0)
    q = build_quantizer(QuantizerConfig(kind="vq", codebook_size=4, ema=True, ema_decay=0.9), 2)
    with torch.no_grad():
        q.books.embed.copy_(torch.tensor([[[0.0, 0], [5, 0], [0, 5], [-5, -5]]]))
        q.books.ema_sum.copy_(q.books.embed)
    z = torch.cat([torch.randn(50, 2) * 0.1 + torch.tensor([1.0, 1.0]),
                   torch.randn(50, 2) * 0.1 + torch.tensor([5.0, 1.0])])[None]
    q.train()
    before = q.books.embed.detach().clone()
    _, codes, losses = q.quantize(z)
    after = q.books.embed.detach()
    assert losses["codebook"] == 0 and not q.books.embed.requires_grad
    for k in (0, 1):
        mean = z[0][codes[0, :, 0] == k].mean(0)
        assert (after[0, k] - mean).norm() < 0.95 * (before[0, k] - mean).norm()
    assert torch.allclose(after[0, 2:], before[0, 2:], atol=1e-3)  # unused codes stay put
    q.eval()
    q.quantize(z)
    assert torch.equal(q.books.embed.detach(), after)  # no EMA update in eval


@pytest.mark.parametrize("name", ["vq_l2_entropy", "multigroup", "pertoken", "residual", "fsq", "lfq"])
def test_fp32_under_bf16_autocast(name):
    q, D, L = make(name)
    q.eval()
    z = torch.randn(2, L, D)
    ref, ref_codes, ref_losses = q.quantize(z)
    rec = OpRecorder()
    with torch.autocast("cpu", dtype=torch.bfloat16), rec:
        out, codes, losses = q.quantize(z.bfloat16().float())
        out2, _, _ = q.quantize(z.bfloat16())
    assert out.dtype == torch.float32 and out2.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in losses.values())
    assert not [op for op, _, dt in rec.ops if dt == torch.bfloat16 and ("mm" in op or "softmax" in op)]
    zb = z.bfloat16().float()
    ref_b, codes_b, _ = q.quantize(zb)
    assert torch.equal(codes, codes_b) and torch.equal(out, ref_b)


def test_stats_usage_and_perplexity_on_constructed_case():
    q = build_quantizer(QuantizerConfig(kind="multigroup", groups=2, codebook_size=4), 4)
    e = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]])
    with torch.no_grad():
        q.books.embed.copy_(e.expand(2, 4, 2))
    q.train()  # the stats count training forwards (see test_eval_forwards_leave_usage_stats_alone)
    # group 0 uses codes 0,0,1,1 (usage 1/2, perplexity 2); group 1 uses 0,1,2,3 (usage 1, ppl 4)
    z = torch.cat([e[[0, 0, 1, 1]], e[[0, 1, 2, 3]]], dim=-1)[None]
    _, codes, _ = q.quantize(z)
    assert codes[0].tolist() == [[0, 0], [0, 1], [1, 2], [1, 3]]
    s = q.stats()
    assert s["usage/g0"] == 0.5 and abs(s["perplexity/g0"] - 2.0) < 1e-9
    assert s["usage/g1"] == 1.0 and abs(s["perplexity/g1"] - 4.0) < 1e-9
    assert abs(s["usage"] - 0.75) < 1e-9 and abs(s["perplexity"] - 3.0) < 1e-9
    q.quantize(z[:, :1])  # one more code 0 in each group: counts accumulate across batches
    s = q.stats()
    p = torch.tensor([3, 2, 0, 0]) / 5.0
    assert abs(s["perplexity/g0"] - math.exp(-(p[:2] * p[:2].log()).sum())) < 1e-6
    q.reset_stats()
    assert q.stats()["usage"] == 0.0 and q.stats()["count"] == 0.0


@pytest.mark.parametrize("name", list(KINDS))
def test_eval_forwards_leave_usage_stats_alone(name):
    q, D, L = make(name)
    q.train()
    q.quantize(torch.randn(4, L, D))
    before = q.stats()
    assert before["count"] > 0
    q.eval()
    with torch.no_grad():
        q.quantize(torch.randn(8, L, D))  # a held-out PSNR or recon-strip forward between two logs
    assert q.stats() == before


def test_config_validation_errors():
    with pytest.raises(ValueError, match="D=30 is not divisible by groups G=4"):
        build_quantizer(QuantizerConfig(kind="multigroup", groups=4), 30)
    with pytest.raises(ValueError, match="use 'multigroup'"):
        QuantizerConfig(kind="vq", groups=4).validate()
    with pytest.raises(ValueError, match="nested_keep_probs needs one probability"):
        QuantizerConfig(kind="multigroup", groups=4, nested_keep_probs=[0.5, 0.5]).validate()
    with pytest.raises(ValueError, match="num_tokens"):
        build_quantizer(QuantizerConfig(kind="pertoken"), 8)
    with pytest.raises(ValueError, match="len\\(levels\\)"):
        build_quantizer(QuantizerConfig(kind="fsq", levels=[8, 5, 5]), 4)
    with pytest.raises(ValueError, match="lfq_split"):
        build_quantizer(QuantizerConfig(kind="lfq", lfq_split=[6, 12]), 16)
    with pytest.raises(ValueError, match="code_dim=16 does not match"):
        build_quantizer(QuantizerConfig(kind="multigroup", groups=4, code_dim=16), 32)
    with pytest.raises(ValueError, match="unknown kind"):
        QuantizerConfig(kind="pq").validate()
    with pytest.raises(ValueError, match="ema=True"):
        QuantizerConfig(kind="pertoken", num_tokens=4, ema=True, reset_every=10).validate()
    # loading through the config mechanism runs validate() too
    with pytest.raises(ValueError, match="nested_keep_probs"):
        from_dict(QuantizerConfig, {"kind": "multigroup", "groups": 2, "nested_keep_probs": [1.0]})
    cfg = from_dict(QuantizerConfig, {"kind": "multigroup", "groups": 4, "codebook_size": "8192",
                                      "nested_mask": "true", "learned_offset": None})
    assert cfg.codebook_size == 8192 and cfg.nested_mask is True
    assert build_quantizer(cfg, 32).layout_K() == (8192,) * 4


def test_vq_entropy_loss_prefers_confident_diverse_assignments():
    q = build_quantizer(QuantizerConfig(kind="vq", codebook_size=4, entropy_weight=1.0,
                                        entropy_temperature=0.1), 2)
    e = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]])
    with torch.no_grad():
        q.books.embed.copy_(e[None])
    q.eval()
    ent = [float(q.quantize(z[None])[2]["entropy"].detach()) for z in (e, e[[0, 0, 0, 0]], e * 0.0)]
    assert ent[0] < ent[1] and ent[0] < ent[2]  # vs collapsed onto one code, vs undecided
    assert abs(float(ent[0]) + math.log(4)) < 1e-2  # confident (~0) minus full diversity (log 4)
