"""Issue 23: the K=16384 search, revival without duplicates, MGVQ's two-stage recipe and soft
revival, and QG-VAE's growth rule without the doubling ceiling."""
import pytest
import torch

from groupgen.config import load_config
from tokenizer.quantize import Codebooks, QuantizerConfig, build_quantizer

torch.set_num_threads(1)


class _MaxNumel(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.max = max(self.max, o.numel())
        return out


# ----------------------------------------------------------------------------- item 1: the search

@pytest.mark.parametrize("kernel", [True, False])
def test_large_codebook_search_stays_in_cache_and_matches_argmin(kernel, monkeypatch):
    """At 2048 vectors x 16384 codes the distance block must stay <= 2^20 floats (4 MiB; the old 2^23
    block went to memory and the search took ~5x longer) and the result must equal a plain argmin,
    first index on ties included: with the fused kernel and with the GEMM path."""
    from tokenizer import nearest_cpu
    if kernel and nearest_cpu._ext() is None:
        pytest.skip("the nearest-code kernel cannot be built here")
    if not kernel:
        monkeypatch.setattr(nearest_cpu, "applies", lambda x, e: False)
    torch.manual_seed(0)
    N, K, d = 2048, 16384, 8
    e = torch.nn.functional.normalize(torch.randn(1, K, d), dim=-1)
    e[0, 9000] = e[0, 70]                      # duplicates: the first index must win
    e[0, 12000] = e[0, 70]
    x = torch.nn.functional.normalize(torch.randn(1, N, d), dim=-1)
    x[0, :5] = e[0, 70]
    books = Codebooks(1, K, d, QuantizerConfig(codebook_size=K), 0.1)
    rec = _MaxNumel()
    with rec:
        idx = books.nearest(x, e)
    assert rec.max <= 1 << 20
    ref = torch.baddbmm((e * e).sum(-1)[:, None, :], x, e.transpose(1, 2), alpha=-2.0).argmin(-1)
    assert torch.equal(idx, ref)
    assert (idx[0, :5] == 70).all()


def test_fused_kernel_on_several_slots_wide_codes_and_ragged_rows():
    """Per-token shapes: 3 slots, dim 64, 7 vectors (not a multiple of the kernel's 4-row pass)."""
    from tokenizer import nearest_cpu
    if nearest_cpu._ext() is None:
        pytest.skip("the nearest-code kernel cannot be built here")
    torch.manual_seed(1)
    x, e = torch.randn(3, 7, 64), torch.randn(3, 2048, 64)
    e[1, 1500] = x[1, 2]                          # an exact hit late in the codebook
    got = nearest_cpu.nearest(x, e)
    brute = ((x[:, :, None, :] - e[:, None]) ** 2).sum(-1).argmin(-1)
    assert got is not None and got.dtype == torch.long and torch.equal(got, brute)
    assert int(got[1, 2]) == 1500
    assert nearest_cpu.nearest(x, e[:, :1024]) is None      # small K keeps the GEMM path


# ----------------------------------------------------------------------------- item 2: revival

def _books_with_dead(feats: torch.Tensor, K: int, **kw) -> Codebooks:
    cfg = QuantizerConfig(kind="vq", codebook_size=K, revive_every=1, **kw)
    books = Codebooks(1, K, feats.shape[-1], cfg, 0.1)
    with torch.no_grad():
        books.embed[0, 2:] = 100.0                 # codes 2.. are far away: dead after one window
    books.observe(feats[None], books.nearest(feats[None], books.codebook()))
    return books


def test_revival_draws_distinct_features_without_replacement_and_perturbs():
    torch.manual_seed(0)
    base = torch.randn(3, 4)
    feats = base[torch.arange(24) % 3]             # 24 features, only 3 distinct (blank-border-like)
    books = _books_with_dead(feats, K=10)
    moved = books.revive()
    new = books.embed.detach()[0, 2:]
    assert moved == 3                              # one per distinct feature; the rest wait
    revived = new[(new < 50).all(-1)]
    assert revived.shape[0] == 3
    d = torch.cdist(revived, base)                 # each revived code sits next to its own feature
    assert (d.min(-1).values < 0.2).all() and (d.min(-1).values > 0).all()
    assert sorted(d.argmin(-1).tolist()) == [0, 1, 2]
    # no two revived codes are equal, so none can tie in the argmin
    assert torch.pdist(revived).min() > 0


def test_revival_never_duplicates_when_dead_codes_outnumber_features():
    torch.manual_seed(1)
    feats = torch.randn(5, 4)
    books = _books_with_dead(feats, K=40)
    assert books.revive() == 5                     # 38 dead codes, 5 features: 5 revived, 33 wait
    new = books.embed.detach()[0]
    revived = new[(new < 50).all(-1) & (torch.arange(40) >= 2)]
    assert revived.shape[0] == 5 and torch.pdist(revived).min() > 0
    d = torch.cdist(revived, feats)
    assert sorted(d.argmin(-1).tolist()) == [0, 1, 2, 3, 4] and (d.min(-1).values < 0.2).all()


@pytest.mark.parametrize("pick", ["uniform", "d2"])
def test_d2_revival_fills_the_region_the_live_codes_miss(pick):
    """``revive_pick: d2`` draws by squared distance to the nearest live code (k-means++): with 20
    features crowding the one live code and one far away, the dead code lands on the far one every time;
    a uniform draw finds it about once in 21."""
    hits = 0
    for seed in range(10):
        torch.manual_seed(seed)
        near = torch.zeros(20, 4) + torch.randn(20, 4) * 1e-3     # 20 distinct features at the live code
        far = torch.full((1, 4), 5.0)
        feats = torch.cat([near, far])
        cfg = QuantizerConfig(kind="vq", codebook_size=2, revive_every=1, revive_pick=pick, revive_noise=0.0)
        books = Codebooks(1, 2, 4, cfg, 0.1)
        with torch.no_grad():
            books.embed[0, 0] = 0.0
            books.embed[0, 1] = -100.0                            # never nearest: dead after one window
        books.observe(feats[None], books.nearest(feats[None], books.codebook()))
        assert books.revive() == 1
        hits += bool(torch.allclose(books.embed.detach()[0, 1], far[0]))
    assert hits == 10 if pick == "d2" else hits <= 3


def test_revival_pool_spans_several_batches():
    """With ``revive_pool`` the dead codes are filled from the last batches, not only the last one."""
    torch.manual_seed(3)
    cfg = QuantizerConfig(kind="pertoken", num_tokens=1, codebook_size=40, revive_every=3, revive_pool=24)
    q = build_quantizer(cfg, 4).train()
    with torch.no_grad():
        q.books.embed[0, 1:] = 100.0
        q.books.embed[0, 0] = 0.0
    batches = [torch.randn(8, 1, 4) for _ in range(3)]
    for step, z in enumerate(batches, 1):
        q.quantize(z)
        info = q.step_end(step)
    assert info["revived"] == 24                   # 39 dead, 3 batches x 8 distinct features
    new = q.books.embed.detach()[0]
    revived = new[(new < 50).all(-1) & (torch.arange(40) > 0)]
    feats = torch.cat(batches)[:, 0]
    d = torch.cdist(revived, feats)
    assert sorted(d.argmin(-1).tolist()) == list(range(24)) and (d.min(-1).values < 0.2).all()


# ----------------------------------------------------------------------------- item 3: MGVQ as released

def test_two_stage_schedule_masks_before_and_not_after_the_switch_step():
    torch.manual_seed(0)
    cfg = QuantizerConfig(kind="multigroup", groups=4, codebook_size=16, nested_mask=True,
                          nested_keep_probs=[1.0, 0.0, 0.0, 0.0], mask_until_step=3)
    q = build_quantizer(cfg, 16).train()
    keeps = []
    for step in range(1, 7):
        out, _, _ = q.quantize(torch.randn(2, 4, 16))
        keeps.append(q.last_keep)
        if step <= 3:
            assert (out.reshape(2, 4, 4, 4)[:, :, 1:] == 0).all()
        q.step_end(step)
    assert keeps == [1, 1, 1, 4, 4, 4]
    # a resumed run keeps its stage: the step count is part of the state
    q2 = build_quantizer(cfg, 16).train()
    q2.load_state_dict(q.state_dict())
    q2.quantize(torch.randn(2, 4, 16))
    assert q2.last_keep == 4
    q.eval()
    q.quantize(torch.randn(2, 4, 16))
    assert q.last_keep == 4


def test_two_stage_keys_load_through_the_config_mechanism():
    from tokenizer.train import TokenizerTrainConfig
    cfg = load_config(TokenizerTrainConfig, "configs/tokenizer/fmnist_mgvq_g4.yaml",
                      ["quantizer.mask_until_step=200", "quantizer.soft_revive=true"])
    assert cfg.quantizer.mask_until_step == 200 and cfg.quantizer.soft_revive
    with pytest.raises(ValueError, match="mask_until_step"):
        QuantizerConfig(kind="multigroup", groups=2, mask_until_step=5).validate(8)


def test_soft_revival_pulls_unused_codes_to_features_and_leaves_used_ones():
    torch.manual_seed(0)
    cfg = QuantizerConfig(kind="vq", codebook_size=8, soft_revive=True, revive_noise=0.0)
    q = build_quantizer(cfg, 2).train()
    with torch.no_grad():
        q.books.embed.copy_(torch.tensor([[[0.0, 0.0], [1.0, 0.0]] + [[50.0, 50.0]] * 6]))
    feats = torch.tensor([[0.1, 0.0], [0.9, 0.0]]).repeat(4, 1)[None]      # uses codes 0 and 1 only
    q.quantize(feats)
    before = q.books.embed.detach().clone()
    info = q.step_end(1)
    after = q.books.embed.detach()[0]
    assert info["soft_revived"] == 6
    # unused codes moved (almost all the way: weight exp(-1e-3)) onto batch features
    d = torch.cdist(after[2:], feats[0]).min(-1).values
    assert (d < 0.1).all()
    # codes used at 4x the average rate keep their place (weight exp(-0.005 * 8 * 10 / 0.01) = e^-40)
    assert torch.allclose(after[:2], before[0, :2], rtol=0, atol=1e-15)
    assert q.books.usage_ema[0, :2].sum() > 0 and q.books.usage_ema[0, 2:].sum() == 0


def test_soft_revival_leaves_groups_masked_this_step_alone():
    torch.manual_seed(0)
    cfg = QuantizerConfig(kind="multigroup", groups=2, codebook_size=8, soft_revive=True, nested_mask=True,
                          nested_keep_probs=[1.0, 0.0])
    q = build_quantizer(cfg, 4).train()
    q.quantize(torch.randn(2, 4, 4))              # group 1 masked: its codes saw nothing this step
    before = q.books.embed.detach().clone()
    q.step_end(1)
    assert torch.equal(q.books.embed.detach()[1], before[1]) and q.books.usage_ema[1].sum() == 0
    assert not torch.equal(q.books.embed.detach()[0], before[0])


# ----------------------------------------------------------------------------- item 5: QG-VAE growth

def _reset_books(rule: str) -> tuple[Codebooks, torch.Tensor]:
    cfg = QuantizerConfig(kind="pertoken", num_tokens=1, codebook_size=64, reset_every=1, reset_rule=rule)
    books = Codebooks(1, 64, 4, cfg, 0.5)
    live = torch.tensor([3, 10, 20, 30, 40, 50])
    books.round_usage[0, live] = 1.0
    books.grad_acc[0, live] = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 5.0])  # code 50 carries half the load
    return books, live


def test_proportional_reset_fills_every_dead_code_in_one_reset():
    torch.manual_seed(0)
    books, live = _reset_books("proportional")
    before = books.embed.detach().clone()
    assert books.grad_reset() == 58                       # from 6 live codes, all 58 dead ones
    after = books.embed.detach()[0]
    assert torch.equal(after[live], before[0, live])
    dead = torch.tensor([k for k in range(64) if k not in live.tolist()])
    d = (after[dead, None, :] - before[0, live][None]).abs().amax(-1)  # [58, 6]
    assert (d.min(-1).values <= 1e-4).all()               # each is a split of a live code
    copies = torch.bincount(d.argmin(-1), minlength=6)
    assert copies.tolist() == [6, 6, 6, 6, 5, 29]         # in proportion to the load (5/10 of 58 = 29)
    assert torch.unique(after, dim=0).shape[0] == 64      # the noise makes every copy distinct


def test_once_reset_keeps_the_release_rule():
    torch.manual_seed(0)
    books, _ = _reset_books("once")
    assert books.grad_reset() == 6                        # each live code split once: at most doubling


def _cell_masses(q, z):
    idx = q.quantize(z)[1].flatten()
    return torch.bincount(idx, minlength=q.cfg.codebook_size).double() / idx.numel()


def test_refit_balances_cells_that_codes_on_random_features_leave_uneven():
    """Codes placed on single features (what revival and splits do) give cells of uneven mass; the refit
    moves every code to its cell's centroid (Lloyd), so the masses come out far more even, no cell is empty,
    and fresh draws hit more codes."""
    torch.manual_seed(0)
    K, d = 64, 8
    scale = torch.linspace(0.3, 2.0, d)                        # anisotropic data
    draw = lambda n: (torch.randn(n, d) * scale)[None]        # latents [1, n, d]: one slot, n positions
    q = build_quantizer(QuantizerConfig(kind="vq", codebook_size=K, refit_steps=[1], refit_iters=10), d).eval()
    fit = draw(4096)
    q.books.embed.data[0] = fit[0, torch.randperm(4096)[:K]]  # codes on random features
    q.books.window_usage = torch.ones(1, K)                   # stands in for a revival window
    test = draw(20000)
    before = _cell_masses(q, test)
    assert q.refit([fit[:, :2048], fit[:, 2048:]]) == 0        # latents come in batches; no cell empty
    after = _cell_masses(q, test)
    cv = lambda m: float(m.std() / m.mean())
    assert cv(before) > 0.5 and cv(after) < 0.5 * cv(before)  # 0.59 -> 0.26 here
    assert (after > 0).all()
    hit = lambda m: float((1 - (1 - m) ** 200).mean())         # expected share of codes hit by 200 draws
    assert hit(after) > hit(before) + 0.05
    assert q.books.window_usage.sum() == 0                     # the window described the old codes


def test_balanced_plan_gives_every_code_equal_mass_and_every_feature_unit_mass():
    from tokenizer.quantize_revival import balanced_plan
    torch.manual_seed(0)
    x, e = torch.randn(600, 3) * torch.tensor([3.0, 1.0, 0.3]), torch.randn(20, 3)
    cost = lambda x, e: Codebooks.distances(x[None].double(), e[None].double())[0]
    plan = balanced_plan(cost(x, e), eps=0.5, iters=200)
    assert torch.allclose(plan.sum(0), torch.full((20,), 30.0, dtype=plan.dtype), rtol=1e-6)
    assert torch.allclose(plan.sum(1), torch.ones(600, dtype=plan.dtype), atol=1e-6)
    far = torch.cat([e, torch.full((1, 3), 1e3)])              # a code no feature reaches: an empty cell
    assert balanced_plan(cost(x, far), eps=0.05)[:, -1].sum() == 0


def test_balanced_refit_evens_the_cells_that_lloyd_leaves_uneven_in_dense_data():
    """In low dimension Lloyd's cells hold more of the data where it is dense (cell mass ~ density^(d/(d+2))):
    on a 2-d Gaussian the refit with ``refit_balance`` gives cells of near-equal mass, so fresh draws hit more
    codes, at a distortion close to Lloyd's."""
    torch.manual_seed(0)
    K, d = 32, 2
    fit, test = torch.randn(1, 4096, d), torch.randn(1, 20000, d)
    out = {}
    for balance in (0.0, 0.05):
        q = build_quantizer(QuantizerConfig(kind="vq", codebook_size=K, refit_steps=[1], refit_iters=10,
                                            refit_balance=balance), d).eval()
        q.books.embed.data[0] = fit[0, :K]
        q.refit([fit])
        m = _cell_masses(q, test)
        zq = q.quantize(test)[0]
        out[balance] = (float(m.std() / m.mean()), float((1 - (1 - m) ** 64).mean()), float((zq - test).pow(2).mean()))
    (cv0, hit0, mse0), (cv1, hit1, mse1) = out[0.0], out[0.05]
    assert cv1 < 0.5 * cv0                                      # 0.43 -> 0.17 here
    assert hit1 > hit0 + 0.02
    assert mse1 < 1.25 * mse0


def test_refit_reseeds_empty_cells_from_distinct_features_and_keeps_unit_codes_under_l2_norm():
    torch.manual_seed(0)
    cfg = QuantizerConfig(kind="pertoken", num_tokens=2, codebook_size=16, refit_steps=[1], l2_norm=True,
                          refit_iters=3)
    q = build_quantizer(cfg, 4).eval()
    q.books.embed.data[:] = torch.tensor([1.0, 0, 0, 0])      # every code the same: 15 empty cells a slot
    z = torch.randn(64, 2, 4)
    z[:32] = z[0]                                              # half the features are one repeated feature
    assert q.refit([z]) >= 30                                  # 15 empty cells in each slot at the first step
    e = q.books.embed.detach()
    assert torch.allclose(e.norm(dim=-1), torch.ones(2, 16), atol=1e-5)
    for s in range(2):
        assert torch.unique(e[s], dim=0).shape[0] == 16       # re-seeds never duplicate a feature
    codes = q.quantize(z)[1][..., 0]                           # [64, 2]
    for s in range(2):
        assert torch.bincount(codes[:, s], minlength=16).min() >= 1   # every code serves the features


def test_refit_validates():
    with pytest.raises(ValueError, match=r"refit_steps needs kind vq/multigroup/pertoken.*got kind 'fsq'"):
        QuantizerConfig(kind="fsq", levels=[4, 4], refit_steps=[5]).validate()
    with pytest.raises(ValueError, match=r"refit_images >= 1.*0 images"):
        QuantizerConfig(kind="vq", refit_steps=[5], refit_images=0).validate()
    with pytest.raises(ValueError, match=r"refit_balance >= 0.*balance -0.1"):
        QuantizerConfig(kind="vq", refit_steps=[5], refit_balance=-0.1).validate()


def test_refit_in_training_runs_at_its_steps_and_resumes_exactly(tmp_path):
    """The trainer encodes fresh images at each refit step (chosen by seed and step, so a resumed run
    refits on the same images): a run stopped at step 3 and resumed equals the straight run, loss by loss
    and weight by weight, and the refit changed the codebook against a run without it."""
    from groupgen.checkpoint import load_tensors
    from groupgen.data import DataConfig
    from groupgen.runs import read_jsonl
    from tokenizer.model import ModelConfig
    from tokenizer.train import TokenizerTrainConfig, train

    def cfg(steps, refit):
        c = TokenizerTrainConfig(
            data=DataConfig(name="fmnist", image_size=16, channels=1, resize="resize", limit=64),
            model=ModelConfig(arch="qgvae", image_size=16, channels=1, tokens=8, heads=2, down=1, embed_dim=4,
                              unet_ch=[8, 8, 8], fourier_freqs=2),
            quantizer=QuantizerConfig(kind="pertoken", codebook_size=16, num_tokens=8, l2_norm=True,
                                      refit_steps=refit, refit_images=48, refit_iters=2))
        c.loss.recon, c.loss.disc_weight = "none", 0.0
        t = c.train
        t.steps, t.batch_size, t.ckpt_every, t.log_every, t.sample_every, t.eval_every, t.threads = steps, 8, 3, 1, 0, 0, 1
        return c

    a, b, n = tmp_path / "a", tmp_path / "b", tmp_path / "n"
    ra = train(cfg(5, [2, 4]), a)
    train(cfg(3, [2, 4]), b)
    rb = train(cfg(5, [2, 4]), b)
    rn = train(cfg(5, []), n)
    rows = read_jsonl(a / "metrics.jsonl")
    assert [r["step"] for r in rows if "q/refit_reseeded" in r] == [2, 4]
    assert [(r["step"], r["loss"]) for r in rows] == [(r["step"], r["loss"]) for r in read_jsonl(b / "metrics.jsonl")]
    ta, tb, tn = (load_tensors(r["checkpoint"], "model") for r in (ra, rb, rn))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    key = next(k for k in ta if k.endswith("books.embed"))
    assert not torch.equal(ta[key], tn[key])


def test_qgvae_preset_uses_the_growth_rule():
    from tokenizer.train import TokenizerTrainConfig
    cfg = load_config(TokenizerTrainConfig, "configs/tokenizer/fmnist_qgvae.yaml")
    assert cfg.quantizer.reset_rule == "proportional" and cfg.quantizer.revive_pool >= cfg.quantizer.codebook_size


def test_train_step_bench_quick(tmp_path):
    """``tokenizer_speed --train-step`` runs (2 steps per K) and reports a ratio per K; no timing asserted."""
    from bench import tokenizer_speed
    R = tokenizer_speed.main(["--train-step", "--quick", "--ks", "256,2048", "--threads", "1", "--reps", "1",
                              "--warmup", "0", "--json", str(tmp_path / "s.json")])
    assert R["ks"] == [256, 2048] and R["K=256"]["ratio"] == 1.0
    assert R["K=2048"]["s_per_step"] > 0 and (tmp_path / "s.json").exists()


def test_decoder_only_steps_keep_encoder_and_codebooks_and_train_the_decoder(tmp_path):
    """``train.decoder_only_after``: from that step on, the encoder and the codebooks stay bit for bit (no
    AdamW decay or momentum, no revival) while the decoder still learns; a run resumed across the switch
    equals the straight run."""
    from groupgen.checkpoint import load_tensors
    from groupgen.data import DataConfig
    from groupgen.runs import read_jsonl
    from tokenizer.model import ModelConfig, Tokenizer
    from tokenizer.train import TokenizerTrainConfig, train

    def cfg(steps):
        c = TokenizerTrainConfig(
            data=DataConfig(name="fmnist", image_size=16, channels=1, resize="resize", limit=64),
            model=ModelConfig(arch="qgvae", image_size=16, channels=1, tokens=8, heads=2, down=1, embed_dim=4,
                              unet_ch=[8, 8, 8], fourier_freqs=2),
            quantizer=QuantizerConfig(kind="pertoken", codebook_size=16, num_tokens=8, l2_norm=True,
                                      revive_every=1, refit_steps=[4], refit_images=48, refit_iters=2))
        c.loss.recon, c.loss.disc_weight = "none", 0.0
        t = c.train
        t.steps, t.batch_size, t.ckpt_every, t.log_every, t.sample_every, t.eval_every, t.threads = steps, 8, 1, 1, 0, 0, 1
        t.weight_decay, t.decoder_only_after, t.keep_last = 0.1, 3, 10
        return c

    a, b = tmp_path / "a", tmp_path / "b"
    train(cfg(5), a)
    train(cfg(4), b)
    train(cfg(5), b)
    w = {s: load_tensors(a / "checkpoints" / f"step_{s:08d}", "model") for s in (2, 3, 4, 5)}
    net = Tokenizer(cfg(5).model, cfg(5).quantizer)
    dec = {n for n, p in net.named_parameters() if id(p) in {id(q) for q in net.decoder_parameters()}}
    assert dec and any(n.startswith("quantizer") for n in w[5]) and not any(n.startswith("quantizer") for n in dec)
    for n in w[5]:
        if n in dec:
            assert not torch.equal(w[4][n], w[5][n]), n          # the decoder still trains
        elif w[5][n].is_floating_point():
            assert torch.equal(w[3][n], w[5][n]), n             # encoder, codebooks: fixed, refit at 4 skipped
    assert any(not torch.equal(w[2][n], w[3][n]) for n in w[3] if n.startswith("quantizer"))  # before: they moved
    rows = read_jsonl(a / "metrics.jsonl")
    assert not any("q/refit_reseeded" in r for r in rows)
    # steps 1-3 count codes; decoder-only steps 4-5 count none, so they report no usage (not a false 0.0)
    assert [r["step"] for r in rows if "q/usage" in r] == [1, 2, 3] and rows[2]["q/usage"] > 0
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_jsonl(b / "metrics.jsonl")]
    wb = load_tensors(b / "checkpoints" / "step_00000005", "model")
    assert all(torch.equal(w[5][n], wb[n]) for n in w[5])
