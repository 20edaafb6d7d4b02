"""Codebook maintenance for ``tokenizer.quantize.Codebooks``: dead-code revival, the MGVQ release's
soft revival and QG-VAE's grad-magnitude resets. Each function edits ``books.embed`` in place (no
autograd), keeps data-parallel ranks identical (rank 0's result is broadcast) and returns how many
codes it moved.

* ``revive_dead``: every ``revive_every`` steps, codes used fewer than ``revive_threshold`` times in
  the window take *distinct* features of the slot's last batch (or of its last ``revive_pool``
  features: a per-token QG-VAE codebook sees one vector per image, 32 a batch for 512 codes), drawn
  without replacement (uniformly, or by k-means++ weights with ``revive_pick: d2``), plus a small
  relative perturbation (``revive_noise``). Drawing with replacement, or from features that are
  equal (Fashion-MNIST's blank border encodes to many identical latents), gives revived codes that
  tie in the argmin: only the first of a tie is ever chosen, the others stay dead.
* ``soft_revive``: every step, a usage EMA per code; each code is pulled toward a random batch feature
  with weight ``exp(-u K 10 / (1 - decay) - 1e-3)`` (u its EMA usage fraction): about 1 for a code
  never used, vanishing for a code used at the average rate 1/K (CVQ-VAE's online clustering rule,
  the "rarely used codes pulled toward batch features each step" of MGVQ's release).
* ``grad_reset``: QG-VAE's reset. ``reset_rule: once`` is the release's rule (each loaded code split
  at most once per round, so live codes at most double per reset); ``proportional`` fills every
  unused code, splitting each loaded code in proportion to its accumulated |grad| (its load).
* ``lloyd``: the refit (``refit_steps``): every code re-fit by Lloyd steps to features of fresh images
  that the trainer encodes with the current encoder, empty cells re-seeded at the features worst
  served. Revival and splits put codes on single features, which cuts the data into cells of about
  exponential mass (2,000 draws then hit ~80% of 512 codes); Lloyd centroids sit where the data is,
  in cells of more even mass. A pool of past features does not serve: the encoder moves faster than a
  per-token pool fills (32 features a step for 512 codes), and k-means on it lowered usage.
  With ``refit_balance > 0`` each step assigns by an equal-mass transport plan instead of the nearest
  code (Sinkhorn, entropic temperature ``refit_balance``): every cell gets N/K of the features, so the
  refit codes are hit about evenly; plain Lloyd cells still differ in mass where the data is dense.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _broadcast(*tensors: torch.Tensor) -> None:
    """Keep codebooks identical across data-parallel ranks after a stochastic edit (rank 0 wins)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.broadcast(t.data, src=0)


def perturb(x: torch.Tensor, rel: float) -> torch.Tensor:
    """``x + N(0, (rel * rms(x_row))^2)`` per element: distinct copies of equal rows, scaled to the
    features so the nudge is small against their spread (unit rows under ``l2_norm``: ~rel/sqrt(d))."""
    if rel <= 0:
        return x
    rms = x.float().pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
    return x + torch.randn_like(x, dtype=torch.float32).to(x.dtype) * (rel * rms).to(x.dtype)


def _pick(books, codes: torch.Tensor, cand: torch.Tensor, dead: torch.Tensor, m: int) -> torch.Tensor:
    """Which ``m`` of the distinct features ``cand`` the ``dead`` codes of a slot (its ``codes``) take, without
    replacement: uniformly, or (``revive_pick: d2``) with probability proportional to the squared distance
    to the nearest live code, k-means++'s weights. Codes placed at random features split the data into
    cells of unequal mass (about exponential), so many are rarely hit; d2 fills the regions the live codes
    cover worst first."""
    n = cand.shape[0]
    if books.cfg.revive_pick == "d2":
        live = torch.ones(books.K, dtype=torch.bool, device=cand.device)
        live[dead] = False
        codes = codes[live]
        if codes.shape[0]:
            d2 = books.distances(cand[None].float(), codes[None])[0].min(-1).values.clamp_min(0).double()
            w = d2 + 1e-12 * float(d2.mean()) + 1e-300        # every feature stays drawable
            return torch.multinomial(w, m, replacement=False)
    return torch.randperm(n, device=cand.device)[:m]


@torch.no_grad()
def revive_dead(books) -> int:
    cfg = books.cfg
    moved = 0
    e = books.codebook() if cfg.revive_pick == "d2" else None   # slots are independent: one copy serves all
    for s in range(books.P):
        feats = books._recent[s]
        dead = (books.window_usage[s] < cfg.revive_threshold).nonzero().squeeze(1)
        if feats is None or feats.shape[0] == 0 or dead.numel() == 0:
            continue
        cand = torch.unique(feats, dim=0)                       # distinct features only
        m = min(cand.shape[0], dead.numel())                    # more dead than features: the rest wait
        pick = cand[_pick(books, None if e is None else e[s], cand, dead, m)]
        target = dead[torch.randperm(dead.numel(), device=dead.device)[:m]]
        new = perturb(pick, cfg.revive_noise).to(books.embed.dtype)
        books.embed.data[s, target] = new
        if cfg.ema:
            books.ema_sum[s, target] = new.float()
            books.ema_count[s, target] = 1.0
        moved += m
    books.window_usage.zero_()
    _broadcast(*([books.embed] + ([books.ema_sum, books.ema_count] if cfg.ema else [])))
    return moved


@torch.no_grad()
def soft_revive(books) -> int:
    """One step of soft revival from ``books.step_counts`` (codes hit since the last call) and the
    last batch's features. Returns how many codes were pulled with weight > 0.5."""
    cfg = books.cfg
    a = 1.0 - cfg.soft_revive_decay
    n = books.step_counts.sum(-1, keepdim=True)
    seen = n[:, 0] > 0   # slots this step saw (a group masked by nested masking did not): only they move
    ema = books.usage_ema * (1 - a) + a * books.step_counts / n.clamp_min(1)
    books.usage_ema.copy_(torch.where(seen[:, None], ema, books.usage_ema))
    books.step_counts.zero_()
    w = torch.exp(-books.usage_ema * books.K * 10.0 / a - 1e-3)         # [P, K]
    pulled = 0
    for s in range(books.P):
        feats = books._recent[s]
        if not seen[s] or feats is None or feats.shape[0] == 0:
            continue
        N = feats.shape[0]
        # one anchor per code: a random permutation of the batch, repeated when K > N; perturbed so
        # codes anchored on one feature (or on equal features) do not tie
        order = torch.cat([torch.randperm(N, device=feats.device) for _ in range(-(-books.K // N))])[:books.K]
        anchor = perturb(feats[order].float(), cfg.revive_noise)
        ws = w[s, :, None]
        books.embed.data[s] = (books.embed.data[s].float() * (1 - ws) + anchor * ws).to(books.embed.dtype)
        pulled += int((w[s] > 0.5).sum())
    _broadcast(books.embed)
    return pulled


@torch.no_grad()
def balanced_plan(C: torch.Tensor, eps: float, iters: int = 20) -> torch.Tensor:
    """Soft assignment ``[N, K]`` of N features to K codes, given their squared distances ``C [N, K]``, with
    equal mass N/K per code (entropic optimal transport, Sinkhorn's scaling form). Pass ``C`` in float64:
    each row's kernel is shifted so its nearest code weighs 1, and at eps 0.01 the far entries reach
    exp(-400), below fp32's range. A code no feature reaches gets a zero column (an empty cell)."""
    G = torch.exp(-(C - C.min(1, keepdim=True).values) / eps)
    N, K = G.shape
    v = torch.ones(K, dtype=G.dtype, device=G.device)
    for _ in range(iters):
        u = 1.0 / (G @ v).clamp_min(1e-300)
        v = (N / K) / (G.T @ u).clamp_min(1e-300)
    return u[:, None] * G * v[None]


def lloyd(books, x: torch.Tensor, iters: int, balance: float = 0.0) -> int:
    """``iters`` Lloyd steps on every slot at once from the current codes (``balance > 0``: equal-mass cells,
    ``balanced_plan``, a slot at a time): features ``x [P, N, d]`` (unit
    rows under ``l2_norm``, where centroids are re-normalised: spherical k-means). A code whose cell is
    empty takes a feature among those farthest from their code (distinct ones, worst first). Writes
    ``books.embed``, zeroes the usage windows (they described the old codes) and returns how many cells
    were re-seeded."""
    P, N, d = x.shape
    x = x.float()
    e = books.codebook().clone()
    reseeded = 0
    for _ in range(iters):
        if balance > 0:                          # equal-mass cells, a slot at a time (a plan is N x K fp64)
            counts, sums = torch.zeros(P, books.K, device=x.device), torch.zeros(P, books.K, d, device=x.device)
            near = torch.zeros(P, N, device=x.device)
            for s in range(P):
                xs = x[s:s + 1].double()
                C = books.distances(xs, e[s:s + 1].double())[0]
                plan = balanced_plan(C, balance)
                counts[s], sums[s] = plan.sum(0).float(), (plan.T @ xs[0]).float()
                near[s] = C.min(1).values.clamp_min(0).float()     # distance to the nearest code, for re-seeding
            counts = torch.where(counts > 1e-6, counts, torch.zeros_like(counts))
        else:
            idx = books.nearest(x, e)                                # chunked search, [P, N]
            near = (x - books.lookup(e, idx)).pow(2).sum(-1)
            counts = torch.zeros(P, books.K, device=x.device).scatter_add_(1, idx, torch.ones_like(near))
            sums = torch.zeros(P, books.K, d, device=x.device).scatter_add_(
                1, idx[..., None].expand(-1, -1, d), x)
        c = sums / torch.where(counts > 0, counts, torch.ones_like(counts))[..., None]  # plan masses may be < 1
        if books.cfg.l2_norm:
            c = F.normalize(c, dim=-1)
        empty = counts == 0
        e = torch.where(empty[..., None], e, c)
        for s in empty.any(-1).nonzero().flatten().tolist():
            dead = empty[s].nonzero().flatten()
            worst = near[s].argsort(descending=True)
            inv = torch.unique(x[s, worst], dim=0, return_inverse=True)[1]
            first = torch.full((int(inv.max()) + 1,), N, device=x.device).scatter_reduce_(
                0, inv, torch.arange(N, device=x.device), "amin")       # first of each distinct feature
            cand = x[s, worst[first.sort().values]]
            m = min(dead.numel(), cand.shape[0])
            e[s, dead[:m]] = cand[:m]
            reseeded += m
    books.embed.data.copy_(e.to(books.embed.dtype))
    for name in ("window_usage", "round_usage", "grad_acc", "usage_ema"):
        if hasattr(books, name):
            getattr(books, name).zero_()
    if books.cfg.ema:
        books.ema_sum.copy_(e)
        books.ema_count.fill_(1.0)
    _broadcast(*([books.embed] + ([books.ema_sum, books.ema_count] if books.cfg.ema else [])))
    return reseeded


@torch.no_grad()
def grad_reset(books) -> int:
    cfg = books.cfg
    moved = 0
    for s in range(books.P):
        unused = (books.round_usage[s] == 0).nonzero().squeeze(1)
        used = (books.round_usage[s] > 0).nonzero().squeeze(1)
        if unused.numel() == 0 or used.numel() == 0:
            continue
        if cfg.reset_rule == "once":
            m = min(unused.numel(), used.numel())
            loaded = used[books.grad_acc[s, used].argsort(descending=True)[:m]]
        else:
            m = unused.numel()
            load = books.grad_acc[s, used].double()
            if float(load.sum()) <= 0:  # no gradient seen (e.g. frozen codebook): split by usage instead
                load = books.round_usage[s, used].double()
            share = load / load.sum() * m
            n = share.floor().long()
            rest = m - int(n.sum())        # largest remainders get the leftover copies
            n[(share - n).argsort(descending=True)[:rest]] += 1
            loaded = used.repeat_interleave(n)
        noise = (torch.rand(m, books.d, device=books.embed.device) * 2 - 1) * cfg.reset_noise
        books.embed.data[s, unused[:m]] = books.embed.data[s, loaded] + noise.to(books.embed.dtype)
        moved += m
    books.grad_acc.zero_()
    books.round_usage.zero_()
    _broadcast(books.embed)
    return moved
