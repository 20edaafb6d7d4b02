"""Our GPT vs LlamaGen's GPT at equal size: training step, sampling, per-token cost, matmul roofline.

    python bench/ar_vs_llamagen.py --llamagen /work/llamagen_ref [--quick] [--json out.json]

LlamaGen (https://github.com/FoundationVision/LlamaGen, a checkout outside this repo) is imported at
run time from ``--llamagen``; none of its code lives here. Everything is measured in one process,
interleaved (ours, LlamaGen, ours, ...) after a warmup, and reported as medians and ratios of
medians, so a busy machine slows both sides alike. Peak RSS comes from one child process per
(model, phase) so the numbers do not include the other model.
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from contextlib import nullcontext

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from bench.common import (REPO, hwm_mb, now, interleave, machine_info, matmul_peak_gflops, median,
                          profile_table, rss_mb, set_clock, spread, train_flops, write_json)

from ar_model.model import GPT, gpt_config, make_adamw
from groupgen.layout import TokenLayout
from sampling.sample import SamplingConfig, kv_cache_dtype, model_for_precision

FULL = dict(preset="B", n_layer=12, dim=768, n_head=12, vocab=16384, grid=16, classes=1000, batch=8,
            top_k=2000, g8_K=2048)
QUICK = dict(preset="micro", n_layer=2, dim=64, n_head=4, vocab=512, grid=4, classes=10, batch=2,
             top_k=64, g8_K=64)


# ----------------------------------------------------------------------------------- models


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def build_ours(S: dict, G: int = 1, head: str = "independent", subtoken_dim: int = 0,
               subtoken_layers: int = 2) -> GPT:
    K = (S["vocab"],) if G == 1 else (S["g8_K"],) * G
    layout = TokenLayout(kind="grid", L=S["grid"] ** 2, K=K, h=S["grid"], w=S["grid"])
    # LlamaGen's GPT-B defaults: dropout 0.1 on tokens, residual and FFN; class dropout 0.1.
    over = dict(dim=S["dim"], n_layer=S["n_layer"], n_head=S["n_head"], head=head, subtoken_dim=subtoken_dim,
                subtoken_layers=subtoken_layers, n_kv_head=S.get("n_kv_head"))
    if S["preset"] != "B":
        over["multiple_of"] = 256
    return GPT(gpt_config(S["preset"], **over), layout, S["classes"])


def cache_dtype(S: dict, precision: str) -> torch.dtype:
    """Our KV cache's dtype for ``precision`` under ``--kv-cache``."""
    return kv_cache_dtype(SamplingConfig(precision=precision, kv_cache=S.get("kv_cache", "auto")))


def import_llamagen(path: str):
    sys.path.append(path)   # appended: our own packages (e.g. `tokenizer`) keep precedence
    from autoregressive.models import generate as lg_generate
    from autoregressive.models import gpt as lg_gpt
    return lg_gpt, lg_generate


def build_llamagen(lg_gpt, S: dict):
    args = lg_gpt.ModelArgs(n_layer=S["n_layer"], n_head=S["n_head"], dim=S["dim"], vocab_size=S["vocab"],
                            num_classes=S["classes"], block_size=S["grid"] ** 2, cls_token_num=1,
                            model_type="c2i")
    return lg_gpt.Transformer(args)


# ----------------------------------------------------------------------------------- training


class TrainCase:
    """One fwd+bwd+AdamW step on a fixed random batch (AdamW as LlamaGen: lr 1e-4, betas .9/.95)."""

    def __init__(self, model, kind: str, precision: str, S: dict, opt: torch.optim.Optimizer, seed: int = 0):
        self.model, self.kind, self.precision = model.train(), kind, precision
        g = torch.Generator().manual_seed(seed)
        L = S["grid"] ** 2
        if kind == "llamagen":
            self.codes = torch.randint(0, S["vocab"], (S["batch"], L), generator=g)
        else:
            K = model.layout.K
            self.codes = torch.stack([torch.randint(0, k, (S["batch"], L), generator=g) for k in K], -1)
        self.labels = torch.randint(0, S["classes"], (S["batch"],), generator=g)
        self.opt = opt   # one per model, shared by its fp32 and bf16 cases (halves optimizer memory)
        self.tokens = S["batch"] * L

    def loss(self):
        with autocast(self.precision):
            if self.kind == "llamagen":
                _, loss = self.model(idx=self.codes[:, :-1], cond_idx=self.labels, targets=self.codes)
            else:
                loss, _ = self.model.loss(self.codes, self.labels)
        return loss

    def __call__(self):
        loss = self.loss()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss


# ----------------------------------------------------------------------------------- sampling


def ours_sampler(model: GPT, S: dict, precision: str, top_k: int, cfg: float = 4.0):
    """``run()``: sampling.sample.generate_codes (the package's loop, tokenizer decode excluded) for
    ``batch`` fixed labels, keeping the packed decode weights across runs as ``sample`` keeps them
    across chunks (packing happens in the warmup: ~0.3 s for GPT-B); ``run(times)``: the same loop written out here with per-position
    timestamps appended to ``times`` (for the cost-growth measurement)."""

    from sampling.logits import GroupPicker, GroupSettings
    from sampling.sample import Plan, generate_codes

    if precision == "bf16" and next(model.parameters()).dtype != torch.bfloat16:
        model = model_for_precision(copy.deepcopy(model), precision)   # keep the caller's fp32 model
    labels = torch.arange(S["batch"]) % S["classes"]
    G, L = model.layout.G, model.layout.L
    settings = [GroupSettings(top_k=top_k)] * G
    plan = Plan(model.layout, model.num_classes, [], labels.numpy(), settings, [cfg] * G, True)
    scfg = SamplingConfig(cfg_scale=cfg, top_k=top_k, precision=precision, batch_size=S["batch"],
                          kv_cache=S.get("kv_cache", "auto"))
    dev = torch.device("cpu")

    def run(positions: list[list[float]] | None = None):
        gen = torch.Generator().manual_seed(0)
        if positions is None:
            return generate_codes(model, labels, plan, scfg, gen, dev, keep_packed=True)
        picker = GroupPicker(settings, [cfg] * G, L, "constant", -1, True, gen)
        lab = torch.cat([labels, torch.full_like(labels, model.num_classes)])
        out, times = [], []
        with torch.inference_mode(), autocast(precision):
            model.init_cache(lab.shape[0], dev, cache_dtype(S, precision))
            h = model.prefill(lab)
            for pos in range(L):
                t0 = now()
                picker.pos = pos
                c = model.sample_position(h, picker)
                out.append(c[: labels.shape[0]])
                if pos < L - 1:
                    h = model.decode(c, pos)
                times.append(now() - t0)
            model.clear_cache(release_packed=False)
        positions.append(times)
        return torch.stack(out, 1)

    return run


def ours_token_at(model: GPT, S: dict, precision: str, pos: int, top_k: int, cfg: float = 4.0):
    """``run()``: one of our sampling steps at position ``pos`` (decode of sequence index ``pos`` + 1,
    then the guided draw of the next position), as ``llamagen_token_at``. The cache is filled once,
    by decoding random codes up to ``pos``; ``model`` is a shallow copy per position (shared weights
    and packed weights, its own cache), so steps at two positions can be interleaved."""
    from sampling.logits import GroupPicker, GroupSettings

    model = copy.copy(model)   # the modules (and their packed weights) are shared; the cache is not
    G, L, B = model.layout.G, model.layout.L, S["batch"]
    settings = [GroupSettings(top_k=top_k)] * G
    picker = GroupPicker(settings, [cfg] * G, L, "constant", -1, True, torch.Generator().manual_seed(0))
    labels = torch.arange(B) % S["classes"]
    lab = torch.cat([labels, torch.full_like(labels, model.num_classes)])
    codes = torch.randint(0, min(model.layout.K), (2 * B, G), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), autocast(precision):
        model.init_cache(lab.shape[0], torch.device("cpu"), cache_dtype(S, precision))
        model.prefill(lab)
        for p in range(pos):
            model.decode(codes, p)

    def run():
        with torch.inference_mode(), autocast(precision):
            h = model.decode(codes, pos)
            picker.pos = pos + 1
            return model.sample_position(h, picker)

    return run


def llamagen_sampler(lg_generate, model, S: dict, top_k: int, cfg: float = 4.0):
    labels = torch.arange(S["batch"]) % S["classes"]

    def run(max_new: int | None = None):
        torch.manual_seed(0)
        return lg_generate.generate(model, labels, max_new or S["grid"] ** 2, cfg_scale=cfg, cfg_interval=-1,
                                    temperature=1.0, top_k=top_k, top_p=1.0, sample_logits=True)

    return run


def llamagen_token_at(lg_generate, model, S: dict, pos: int, top_k: int, cfg: float = 4.0):
    """One LlamaGen decode step at sequence index ``pos + 1`` (its cache is sized once, masked)."""
    B = S["batch"]
    x = torch.zeros(B, 1, dtype=torch.long)

    def run():
        ip = torch.tensor([pos + 1], dtype=torch.int)
        return lg_generate.decode_one_token(model, x, ip, cfg, True, temperature=1.0, top_k=top_k, top_p=1.0,
                                            sample_logits=True)

    return run


def randomize_heads(ours: GPT | None = None, lg=None) -> None:
    """Both models zero their output layers at init (uniform logits); give them N(0, 0.02) so
    top-k and the draw see realistic, untied logits."""
    with torch.no_grad():
        if ours is not None:
            for m in ours.heads.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.normal_(0.0, 0.02)
        if lg is not None:
            lg.output.weight.normal_(0.0, 0.02)


# ----------------------------------------------------------------------------------- RSS child


def rss_child(spec: str, S: dict, llamagen: str) -> dict:
    """Build one model, run its phase twice, return {baseline_mb, peak_mb} (VmRSS / VmHWM)."""
    impl, phase, precision = spec.split(":")
    base = rss_mb()
    if impl == "ours":
        model = build_ours(S)
    else:
        lg_gpt, lg_generate = import_llamagen(llamagen)
        model = build_llamagen(lg_gpt, S)
    randomize_heads(model if impl == "ours" else None, model if impl != "ours" else None)
    if phase == "train":
        case = TrainCase(model, impl, precision, S, adamw(model))
        for _ in range(2):
            case()
    else:
        model.eval()
        if precision == "bf16":
            model = model.to(torch.bfloat16)   # both cast the weights once (LlamaGen: sample_c2i.py)
        if impl == "ours":
            run = ours_sampler(model, S, precision, S["top_k"])
        else:
            run = llamagen_sampler(lg_generate, model, S, S["top_k"])
        run()   # the peak is reached in the first run (cache and logits are allocated per run)
    return {"spec": spec, "baseline_mb": round(base, 1), "peak_mb": round(hwm_mb(), 1)}


# ----------------------------------------------------------------------------------- main


def adamw(model):
    """Each side's own optimizer on the CPU: ours is the trainer's (``make_adamw``: fused, decay on
    matrices only); LlamaGen's ``configure_optimizers`` fuses only on CUDA. lr 1e-4, betas .9/.95,
    weight decay 0.05 in both."""
    if isinstance(model, GPT):
        return make_adamw(model, 1e-4, (0.9, 0.95), 0.05)
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)


def window(per_pos: list[list[float]], lo: int, hi: int) -> float:
    """Median per-token seconds over positions lo..hi (inclusive) across all recorded runs."""
    return median([t for run in per_pos for t in run[lo : hi + 1]])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llamagen", required=True, help="path of a LlamaGen checkout (imported at run time)")
    ap.add_argument("--quick", action="store_true", help="tiny models, one rep: a smoke test of the bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-reps", type=int, default=3)
    ap.add_argument("--sample-reps", type=int, default=3)
    ap.add_argument("--parts", default="train,sample,pos,g8,profile,rss",
                    help="comma list of: train sample pos g8 (G=8 heads: training and sampling) profile rss")
    ap.add_argument("--precisions", default="fp32,bf16", help="train/sample precisions to compare")
    ap.add_argument("--sample-warmup", type=int, default=1, help="untimed generations per case first")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu: process CPU seconds (use with --threads 1 on a crowded machine)")
    ap.add_argument("--n-kv-head", type=int, default=0,
                    help="grouped-query attention for OUR models only (changes the model; e.g. with --parts pos)")
    ap.add_argument("--kv-cache", default="auto", choices=["auto", "fp32", "bf16"],
                    help="OUR KV cache dtype (sampling's kv_cache; bf16 under fp32 changes the numerics)")
    ap.add_argument("--json", default="", help="write all numbers here")
    ap.add_argument("--rss-child", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    set_clock(a.clock)
    S = dict(QUICK if a.quick else FULL, n_kv_head=a.n_kv_head or None, kv_cache=a.kv_cache)
    if a.rss_child:
        print(json.dumps(rss_child(a.rss_child, S, a.llamagen)))
        return {}
    parts = set(a.parts.split(","))
    precs = a.precisions.split(",")
    if a.quick:
        a.train_reps, a.sample_reps = min(a.train_reps, 2), min(a.sample_reps, 2)
    torch.manual_seed(0)
    R: dict = {"machine_start": machine_info(a.threads), "settings": dict(S, quick=a.quick, clock=a.clock,
               train_reps=a.train_reps, sample_reps=a.sample_reps, cfg=4.0)}
    log = lambda m: print(m, flush=True)  # noqa: E731
    peak = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}
    log(f"matmul 2048^2 peak GFLOP/s: {peak}")

    lg_gpt, lg_generate = import_llamagen(a.llamagen)
    ours, lg = build_ours(S), build_llamagen(lg_gpt, S)
    randomize_heads(ours, lg)
    R["params"] = {"ours": sum(p.numel() for p in ours.parameters()),
                   "llamagen": sum(p.numel() for p in lg.parameters())}
    log(f"params: {R['params']}")
    L, T = S["grid"] ** 2, S["batch"] * S["grid"] ** 2

    def tok_s(times):
        return T / median(times)

    g8 = {}
    if "g8" in parts:
        narrow = max(S["dim"] // 3, 32)
        g8 = {"G8-sub": build_ours(S, G=8, head="subtoken"),
              "G8-sub256": build_ours(S, G=8, head="subtoken", subtoken_dim=narrow),
              "G8-sub256-L1": build_ours(S, G=8, head="subtoken", subtoken_dim=narrow, subtoken_layers=1)}
        for m in g8.values():
            randomize_heads(m)

    if "train" in parts:
        opts = {"ours": adamw(ours), "llamagen": adamw(lg)}
        R["train"] = {}
        for prec in precs:
            log(f"[train {prec}] interleaved, batch {S['batch']} x {L} tokens")
            cases = {"ours": TrainCase(ours, "ours", prec, S, opts["ours"]),
                     "llamagen": TrainCase(lg, "llamagen", prec, S, opts["llamagen"])}
            times = interleave(cases, a.train_reps, log=log)
            R["train"][prec] = {n: {"s": spread(t), "tok_s": tok_s(t),
                                    "flop_frac": train_flops(m, S["batch"], L, S["n_layer"], S["dim"])
                                    / median(t) / 1e9 / peak[prec]}
                                for (n, t), m in zip(times.items(), (ours, lg))}
            R["train"][prec]["ratio_ours_over_llamagen"] = median(times["llamagen"]) / median(times["ours"])
            log(json.dumps(R["train"][prec]))
            write_json(a.json, R)   # partial results survive a run cut short
        del opts
    if "g8" in parts:
        log("[train bf16] G=1 vs G=8 sub-token head")
        cases = {"G1": TrainCase(ours, "ours", "bf16", S, adamw(ours))}
        cases.update({n: TrainCase(m, "ours", "bf16", S, adamw(m)) for n, m in g8.items()})
        times = interleave(cases, a.train_reps, log=log)
        R["train_g8"] = {n: {"s": spread(t), "tok_s": tok_s(t), "ratio_vs_G1": median(t) / median(times["G1"])}
                         for n, t in times.items()}
        log(json.dumps(R["train_g8"]))
        write_json(a.json, R)   # partial results survive a run cut short
        del cases

    ours.eval(), lg.eval()
    for m in g8.values():
        m.eval()
    per_pos: dict[str, list[list[float]]] = {"fp32": [], "bf16": []}
    if "sample" in parts:
        R["sample"] = {}
        # LlamaGen's sample_c2i.py casts the weights (no autocast) for bf16
        lg_bf16 = copy.deepcopy(lg).to(torch.bfloat16) if "bf16" in precs else None
        for prec in precs:
            log(f"[sample {prec}] {S['batch']} images, CFG 4.0, top-k {S['top_k']}")
            run_ours = ours_sampler(ours, S, prec, S["top_k"])
            run_lg = llamagen_sampler(lg_generate, lg if prec == "fp32" else lg_bf16, S, S["top_k"])
            cases = {"ours": run_ours, "llamagen": run_lg}
            times = interleave(cases, a.sample_reps, warmup=a.sample_warmup, log=log)
            R["sample"][prec] = {n: {"s": spread(t), "img_s": S["batch"] / median(t)} for n, t in times.items()}
            R["sample"][prec]["ratio_ours_over_llamagen"] = median(times["llamagen"]) / median(times["ours"])
            log(json.dumps(R["sample"][prec]))
            write_json(a.json, R)   # partial results survive a run cut short
        del lg_bf16
    if "g8" in parts:
        log("[sample bf16] G=1 vs G=8 sub-token head")
        cases = {"G1": ours_sampler(ours, S, "bf16", S["top_k"])}
        cases.update({n: ours_sampler(m, S, "bf16", min(S["top_k"], S["g8_K"] // 8)) for n, m in g8.items()})
        times = interleave(cases, a.sample_reps, warmup=a.sample_warmup, log=log)
        R["sample_g8"] = {n: {"s": spread(t), "img_s": S["batch"] / median(t),
                              "ratio_vs_G1": median(t) / median(times["G1"])} for n, t in times.items()}
        log(json.dumps(R["sample_g8"]))
        write_json(a.json, R)   # partial results survive a run cut short
    if "pos" in parts:
        # (c) per-token cost along the sequence: ours from per-position timestamps of whole runs,
        # LlamaGen from single decode steps at the two positions (its cache is fully masked).
        lo, hi = (12, 20), (L - 10, L - 2)
        if a.quick:
            lo, hi = (1, 3), (L - 4, L - 2)
        R["pos"] = {"windows": [lo, hi]}
        for prec in precs:
            run_ours = ours_sampler(ours, S, prec, S["top_k"])
            cases = {"ours": lambda: run_ours(per_pos[prec])}
            interleave(cases, a.sample_reps, warmup=0, log=None)
            t_lo, t_hi = window(per_pos[prec], *lo), window(per_pos[prec], *hi)
            R["pos"][prec] = {"ours_ms_lo": 1e3 * t_lo, "ours_ms_hi": 1e3 * t_hi, "ours_growth": t_hi / t_lo}
            # The same two positions as single steps, interleaved (as LlamaGen's below): a slow minute
            # of the machine then slows both sides instead of one end of a sampling run.
            m = ours if prec == "fp32" else model_for_precision(copy.deepcopy(ours), prec)
            steps = interleave({"lo": ours_token_at(m, S, prec, lo[0], S["top_k"]),
                                "hi": ours_token_at(m, S, prec, hi[1], S["top_k"])},
                               max(5, 3 * a.sample_reps) * 4, log=None)
            s_lo, s_hi = median(steps["lo"]), median(steps["hi"])
            R["pos"][prec].update(ours_step_ms_lo=1e3 * s_lo, ours_step_ms_hi=1e3 * s_hi, ours_step_growth=s_hi / s_lo)
            m.release_packed()
        with torch.no_grad():
            lg.setup_caches(max_batch_size=2 * S["batch"], max_seq_length=L + 1, dtype=torch.float32)
            times = interleave({f"lg@{lo[0]}": llamagen_token_at(lg_generate, lg, S, lo[0], S["top_k"]),
                                f"lg@{hi[1]}": llamagen_token_at(lg_generate, lg, S, hi[1], S["top_k"])},
                               max(5, 3 * a.sample_reps), log=None)
        t_lo, t_hi = median(times[f"lg@{lo[0]}"]), median(times[f"lg@{hi[1]}"])
        R["pos"]["llamagen_fp32"] = dict(llamagen_ms_lo=1e3 * t_lo, llamagen_ms_hi=1e3 * t_hi, llamagen_growth=t_hi / t_lo)
        log(json.dumps(R["pos"]))
        write_json(a.json, R)   # partial results survive a run cut short
    if "profile" in parts:
        run_ours = ours_sampler(ours, S, "bf16", S["top_k"])
        R["profile_sample_bf16"] = profile_table(run_ours, rows=12)
        ours.train()
        case = TrainCase(ours, "ours", "bf16", S, adamw(ours))
        case()
        R["profile_train_bf16"] = profile_table(case, rows=12)
        ours.eval()
        log(R["profile_sample_bf16"])
        log(R["profile_train_bf16"])
    del ours, lg, g8
    if "rss" in parts:
        R["rss"] = []
        for spec in [f"{m}:{ph}:{p}" for ph in ("train", "sample") for p in precs for m in ("ours", "llamagen")]:
            cmd = [sys.executable, __file__, "--llamagen", a.llamagen, "--threads", str(a.threads),
                   "--rss-child", spec, "--kv-cache", a.kv_cache] + (["--quick"] if a.quick else [])
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            row = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else \
                {"spec": spec, "error": out.stderr[-500:]}
            R["rss"].append(row)
            log(json.dumps(row))
            write_json(a.json, R)   # partial results survive a run cut short
    R["peak_gflops"] = peak
    R["machine_end"] = machine_info(a.threads)
    write_json(a.json, R)
    return R


if __name__ == "__main__":
    main()
