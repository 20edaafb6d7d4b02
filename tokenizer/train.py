"""Train a stage-1 tokenizer.

    python -m tokenizer.train --config configs/tokenizer/fmnist_mgvq_g4.yaml [--out RUN_DIR] [key=value ...]
    torchrun --nproc_per_node 2 -m tokenizer.train --config ...      # data parallel (gloo on CPU)

RUN_DIR gets config.yaml, metrics.jsonl, recon_XXXXXXXX.png strips (originals over reconstructions)
and checkpoints/ (groupgen.checkpoint; meta kind "tokenizer"). Re-running on the same RUN_DIR resumes
exactly: the data order is a seeded permutation per epoch indexed by the step, and the optimizers
and every RNG (per rank) are restored, so the loss trajectory equals an uninterrupted run's.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from groupgen.checkpoint import (CheckpointError, latest_checkpoint, load_meta, load_state, load_tensors,
                                 rng_state, save_checkpoint, set_rng_state)
from groupgen.cli import user_errors
from groupgen.config import ConfigError, added_field, load_config, save_config, to_dict, with_defaults
from groupgen import distributed
from groupgen.data import DataConfig, build_dataset, write_skipped
from groupgen.loader import StepBatches, image_batches
from groupgen.runlock import hold_run_folder
from groupgen.runs import MetricsLog, StopSignals, autocast, lr_multiplier, progress, seed_everything, set_threads

from .losses import (LossConfig, PatchDiscriminator, adaptive_weight, build_lpips, gan_active, hinge_d_loss,
                     hinge_g_loss, recon_loss)
from .model import ModelConfig, Tokenizer
from .quantize import QuantizerConfig


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 64               # per process
    lr: float = 1e-4
    schedule: str = "constant"          # constant | cosine (to lr * min_lr_ratio at the last step)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    disc_lr: float = 0.0               # 0 = lr
    disc_betas: tuple[float, float] = (0.9, 0.95)
    precision: str = "fp32"            # fp32 | bf16 (autocast; quantizer stays fp32)
    clip: float = 1.0                  # grad-norm clip (0 = off), generator and discriminator
    ckpt_every: int = 500
    keep_last: int = 3
    log_every: int = 50
    sample_every: int = 500            # recon strip PNGs (0 = off)
    eval_every: int = 0                # held-out PSNR on eval_batches batches of eval_split (0 = off)
    eval_batches: int = 4
    eval_split: str = "test"
    seed: int = 0
    threads: int = 0                   # torch intra-op threads (0 = OMP_NUM_THREADS or all cores)
    workers: int = 4                   # image-decoding processes per rank (files only; in-memory data: none)
    device: str = "auto"               # auto | cpu | cuda (this rank's GPU)
    # > 0: after this many steps only the decoder trains: encoder, codebooks and their maintenance fixed, so
    # the codes (and their usage) stay as they are and the decoder adapts to them (e.g. after a last refit)
    decoder_only_after: int = added_field(default=0)

    def validate(self):
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"train.precision must be fp32 or bf16, got {self.precision!r}")
        for key in ("steps", "batch_size", "log_every"):   # steps=0 would save an untrained checkpoint
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("ckpt_every", "sample_every", "eval_every", "keep_last"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if self.decoder_only_after < 0:
            raise ConfigError(f"train.decoder_only_after must be >= 0, got {self.decoder_only_after}")
        if self.workers < 0:
            raise ConfigError(f"train.workers must be >= 0, got {self.workers}")
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"train.schedule must be constant or cosine, got {self.schedule!r}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.warmup_steps must be >= 0 and train.min_lr_ratio in [0, 1], got "
                              f"{self.warmup_steps} and {self.min_lr_ratio}")


@dataclass
class TokenizerTrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self):
        if (self.data.image_size, self.data.channels) != (self.model.image_size, self.model.channels):
            raise ConfigError(f"data gives {self.data.channels}x{self.data.image_size}^2 images but the model expects "
                              f"{self.model.channels}x{self.model.image_size}^2 (set model.image_size/channels)")


# sections whose change makes a resume something else than a continuation; the optimizer settings are
# among them because the saved optimizer state carries its own values and would silently win
_RESUME_KEYS = ("data", "model", "quantizer", "loss", "train.batch_size", "train.seed", "train.lr", "train.betas",
                "train.weight_decay", "train.disc_lr", "train.disc_betas")


def parse_cli(description: str, extra=None):
    """argparse with ``--config`` and free ``key=value`` overrides (plus ``extra(parser)`` args)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", default=None, help="YAML config")
    if extra:
        extra(ap)
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    return ap.parse_args()


# ----------------------------------------------------------------------------- data order

class BatchOrder:
    """Global batch ``step`` = slice of a seeded per-epoch permutation: a pure function of the step,
    so a resumed run reads exactly the batches the uninterrupted run would have."""

    def __init__(self, n: int, batch: int, rank: int, world: int, seed: int):
        self.n, self.b, self.rank, self.world, self.seed = n, batch, rank, world, seed
        self.per_epoch = n // (batch * world)
        if self.per_epoch == 0:
            raise ConfigError(f"dataset has {n} images, fewer than one global batch ({batch} x {world} ranks)")
        self._epoch, self._perm = -1, None

    def __call__(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        a = (i * self.world + self.rank) * self.b
        return self._perm[a:a + self.b]


def get_batch(ds, idx) -> torch.Tensor:
    if hasattr(ds, "batch"):
        return ds.batch(idx)[0]
    return torch.stack([ds[int(i)][0] for i in idx])


@torch.no_grad()
def refit_codebooks(model: Tokenizer, ds, step: int, seed: int, device, precision: str) -> int:
    """``quantizer.refit_steps``: encode ``refit_images`` training images (drawn by seed and step alone, so
    every rank and a resumed run use the same ones) with the current encoder and re-fit the codebooks to
    them by Lloyd (``tokenizer.quantize_revival.lloyd``). Returns how many empty cells were re-seeded."""
    qc = model.qcfg
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7_919 * step)
    idx = torch.randperm(len(ds), generator=g)[:qc.refit_images]
    was_training = model.training
    model.eval()
    latents = []
    for i in range(0, len(idx), 256):
        x = get_batch(ds, idx[i:i + 256]).to(device)
        with autocast(device, precision):
            latents.append(model.net.encode_latent(x).float())
    model.train(was_training)
    return model.quantizer.refit(latents)


def psnr_from_mse(mse: float) -> float:
    """Images in [-1, 1]: peak-to-peak 2, so PSNR = 10 log10(4 / MSE) (= the [0,1] PSNR)."""
    return 10.0 * math.log10(4.0 / max(mse, 1e-12))


def save_recon_strip(x: torch.Tensor, xrec: torch.Tensor, path: Path) -> None:
    from PIL import Image

    def row(t):
        t = ((t.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
        if t.shape[1] == 1:
            t = t.expand(-1, 3, -1, -1)
        return torch.cat(list(t), dim=2)  # [3, H, B*W]

    grid = torch.cat([row(x), row(xrec)], dim=1).permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(grid)).save(path)


# ----------------------------------------------------------------------------- trainer

def _check_resume(cfg: TokenizerTrainConfig, meta: dict, ck: Path) -> None:
    # a field the checkpoint predates counts at its default (a field added later defaults to the old behaviour)
    now, old = to_dict(cfg), meta.get("config") or {}
    old = with_defaults(old, to_dict(TokenizerTrainConfig())) if old else old
    diffs = []
    for key in _RESUME_KEYS:
        a, b = now, old
        for p in key.split("."):
            a, b = (x.get(p) if isinstance(x, dict) else None for x in (a, b))
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{k}: checkpoint {b.get(k)!r} vs now {a.get(k)!r}" for k in sorted(set(a) | set(b))
                      if _norm(a.get(k)) != _norm(b.get(k))]
        elif _norm(a) != _norm(b):
            diffs.append(f"{key}: checkpoint {b!r} vs now {a!r}")
    if diffs:
        raise CheckpointError(f"cannot resume from {ck}: config differs ({'; '.join(diffs)}); use a new --out "
                              f"directory to start a different run")


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def train(cfg: TokenizerTrainConfig, out_dir: str | Path) -> dict:
    """Train (or resume) into ``out_dir``; returns a summary dict (step, checkpoint, psnr, ...)."""
    cfg.validate()
    tc, lc = cfg.train, cfg.loss
    rank, world, device = distributed.init(tc.device)   # this rank's GPU set before any collective
    set_threads(tc.threads or None)
    out = Path(out_dir)
    ckroot = out / "checkpoints"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    seed_everything(tc.seed + rank)

    ds = build_dataset(cfg.data, "train", train=True)
    eval_ds = build_dataset(cfg.data, tc.eval_split, train=False) if rank == 0 else None
    model = Tokenizer(cfg.model, cfg.quantizer).to(device)
    q = model.quantizer
    disc = (PatchDiscriminator(cfg.model.channels, lc.disc_ndf, lc.disc_layers, lc.disc_norm).to(device)
            if lc.disc_weight > 0 else None)
    lp = build_lpips(lc)
    if lp is not None:
        lp = lp.to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tc.lr, betas=tc.betas,
                            weight_decay=tc.weight_decay)
    dopt = (torch.optim.AdamW(disc.parameters(), lr=tc.disc_lr or tc.lr, betas=tc.disc_betas,
                              weight_decay=tc.weight_decay) if disc is not None else None)
    meta = {"kind": "tokenizer", "config": to_dict(cfg), "layout": model.layout.to_dict()}

    step = 0
    log = MetricsLog(out / "metrics.jsonl", enabled=rank == 0)
    ck = latest_checkpoint(ckroot) if ckroot.is_dir() else None
    if ck is not None:
        _check_resume(cfg, load_meta(ck), ck)
    run_lock = hold_run_folder(out, "tokenizer.train", rank)  # noqa: F841 (held until train returns)
    if rank == 0:  # only once the model built and a resume was accepted: a rejected config changes nothing
        save_config(cfg, out / "config.yaml")
        write_skipped(ds, out)
    if ck is not None:
        model.load_state_dict(load_tensors(ck, "model"))
        st = load_state(ck)
        opt.load_state_dict(st["opt"])
        if disc is not None:
            disc.load_state_dict(load_tensors(ck, "disc"))
            dopt.load_state_dict(st["dopt"])
        step = int(st["step"])
        rngs = st["rng"]
        if len(rngs) != world:
            raise CheckpointError(f"{ck}: saved by {len(rngs)} ranks, resuming with {world}")
        set_rng_state(rngs[rank])
        log.truncate_after(step)
        if rank == 0:
            print(f"resumed from {ck} at step {step}", flush=True)

    ddp_model, ddp_disc = model, disc
    if distributed.active():   # world 1 under a launcher too: the same collectives as a cluster run
        from torch.nn.parallel import DistributedDataParallel as DDP
        dev_ids = [device.index] if device.type == "cuda" else None
        ddp_model = DDP(model, device_ids=dev_ids, find_unused_parameters=True)
        if disc is not None:
            ddp_disc = DDP(disc, device_ids=dev_ids)

    order = BatchOrder(len(ds), tc.batch_size, rank, world, tc.seed)
    fixed = get_batch(eval_ds, range(min(8, len(eval_ds)))).to(device) if eval_ds is not None else None

    def save(step_: int) -> Path | None:
        rngs = distributed.all_gather_object(rng_state())
        path = None
        if rank == 0:
            state = {"opt": opt.state_dict(), "step": step_, "rng": rngs}
            tensors = {"model": model.state_dict()}
            if disc is not None:
                state["dopt"] = dopt.state_dict()
                tensors["disc"] = disc.state_dict()
            path = save_checkpoint(ckroot, step_, tensors, meta, state, tc.keep_last)
        distributed.barrier()
        return path

    @torch.no_grad()
    def evaluate_psnr() -> float:
        model.eval()
        mses = []
        for b in range(tc.eval_batches):
            idx = range(b * tc.batch_size, min(len(eval_ds), (b + 1) * tc.batch_size))
            if len(idx) == 0:
                break
            x = get_batch(eval_ds, idx).to(device)
            with autocast(device, tc.precision):
                xr = model(x)[0]
            mses.append(float((xr.float() - x).pow(2).mean()))
        model.train()
        return psnr_from_mse(sum(mses) / max(1, len(mses)))

    fixed_params = []                   # what decoder-only steps hold still: all but the decoder
    if tc.decoder_only_after > 0:
        decoder = {id(p) for p in model.decoder_parameters()}
        fixed_params = [p for p in model.parameters() if id(p) not in decoder]
    last = {}
    last_saved = step if ck is not None else -1
    model.train()
    t_window, n_window = 0.0, 0
    bar = progress(total=tc.steps, initial=step, desc="tokenizer")
    # Decoded ahead by workers into pinned memory; each batch's augmentation is seeded by (seed, rank,
    # step), so it is the same with any number of workers and after a resume.
    batches = image_batches(ds, StepBatches(order, step, tc.steps), workers=tc.workers, first=step,
                            seed=tc.seed * 65_537 + rank, pin_memory=device.type == "cuda")
    with StopSignals() as stop:
        while step < tc.steps:
            t0 = time.perf_counter()
            x = next(batches)[0].to(device, non_blocking=True)
            gan_on = gan_active(lc, step)
            decoder_only = 0 < tc.decoder_only_after <= step
            if decoder_only:
                q.eval()   # no masking, no usage windows, no EMA codebook update
            with autocast(device, tc.precision):
                xrec, codes, qlosses = ddp_model(x)
            parts = recon_loss(x, xrec, lc)
            rec = lc.l2_weight * parts["l2"]
            if lc.recon != "none":
                rec = rec + lc.recon_weight * parts[lc.recon]
            if lp is not None:
                with autocast(device, tc.precision):
                    parts["lpips"] = lp(x, xrec).mean().float()
                rec = rec + lc.perceptual_weight * parts["lpips"]
            total = rec + lc.vq_weight * qlosses["vq"].float()
            if gan_on:
                disc.requires_grad_(False)  # the generator step must not touch D's grads
                with autocast(device, tc.precision):
                    parts["g_adv"] = hinge_g_loss(disc(xrec))
                w = adaptive_weight(rec, parts["g_adv"], model.last_layer) if lc.adaptive_disc_weight \
                    else torch.tensor(1.0)
                parts["d_weight"] = w
                total = total + lc.disc_weight * w * parts["g_adv"]
                disc.requires_grad_(True)
            bad = 0.0 if torch.isfinite(total) else 1.0
            bad, stop_now = distributed.all_reduce_sum([bad, float(stop.flag)])
            if bad:
                good = latest_checkpoint(ckroot) if ckroot.is_dir() else None
                raise FloatingPointError(
                    f"non-finite tokenizer loss at step {step + 1} (loss {float(total.detach())}, parts "
                    f"{ {k: float(v.detach()) for k, v in parts.items()} }); stopped without saving. Last good "
                    f"checkpoint: {good or 'none'}")
            lr_mult = lr_multiplier(step, tc.steps, tc.warmup_steps, tc.schedule, tc.min_lr_ratio)
            for o, base in ((opt, tc.lr), (dopt, tc.disc_lr or tc.lr)):
                for g in (o.param_groups if o is not None else ()):
                    g["lr"] = base * lr_mult
            opt.zero_grad(set_to_none=True)
            total.backward()
            if decoder_only:
                for p in fixed_params:   # after DDP's all-reduce; a None grad: AdamW neither moves nor decays p
                    p.grad = None
            else:
                q.after_backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip if tc.clip > 0 else float("inf"))
            opt.step()
            if gan_on:
                dopt.zero_grad(set_to_none=True)
                with autocast(device, tc.precision):
                    logits = ddp_disc(torch.cat([x, xrec.detach()]))
                lr_, lf_ = logits.float().chunk(2)
                d_loss = hinge_d_loss(lr_, lf_)
                d_loss.backward()
                if tc.clip > 0:
                    torch.nn.utils.clip_grad_norm_(disc.parameters(), tc.clip)
                dopt.step()
                parts["d_loss"] = d_loss.detach()
                parts["logits_real"], parts["logits_fake"] = lr_.mean().detach(), lf_.mean().detach()
            step += 1
            qinfo = {} if decoder_only else (q.step_end(step) or {})
            if step in cfg.quantizer.refit_steps and not decoder_only:
                qinfo["refit_reseeded"] = refit_codebooks(model, ds, step, tc.seed, device, tc.precision)
            dt = time.perf_counter() - t0
            t_window += dt
            n_window += 1
            bar.update(1)

            eval_now = bool(tc.eval_every) and step % tc.eval_every == 0   # logged too, on or off the log grid
            if step % tc.log_every == 0 or step == tc.steps or eval_now:
                row = {"step": step, "loss": float(total.detach()), "vq": float(qlosses["vq"].detach()),
                       **{k: float(v.detach()) for k, v in parts.items()},
                       **{f"q_{k}": float(v.detach()) for k, v in qlosses.items() if k != "vq"},
                       "psnr": psnr_from_mse(float(parts["l2"].detach())), "grad_norm": float(gnorm),
                       "lr": tc.lr * lr_mult,
                       "step_time": t_window / n_window, "gan": bool(gan_on)}
                qstats = q.stats()
                if qstats["count"] > 0:   # none counted (decoder-only steps run it in eval mode): no usage to report
                    row.update({f"q/{k}": float(v) for k, v in qstats.items()})
                row.update({f"q/{k}": float(v) for k, v in qinfo.items()})
                q.reset_stats()
                if eval_now and rank == 0:
                    row["eval_psnr"] = evaluate_psnr()
                log.write(**row)
                last = row
                bar.set_postfix(loss=f"{row['loss']:.4f}", psnr=f"{row['psnr']:.2f}")
                t_window, n_window = 0.0, 0
            if rank == 0 and tc.sample_every and (step % tc.sample_every == 0 or step == tc.steps):
                model.eval()
                with torch.no_grad(), autocast(device, tc.precision):
                    xr = model(fixed)[0]
                model.train()
                save_recon_strip(fixed, xr, out / f"recon_{step:08d}.png")
            if (tc.ckpt_every and step % tc.ckpt_every == 0) or step == tc.steps or stop_now:
                save(step)
                last_saved = step
            if stop_now:
                if rank == 0:
                    print(f"stopped by signal at step {step}; checkpoint saved", flush=True)
                break
    bar.close()
    batches.close()   # stops the workers
    if last_saved != step:
        save(step)
    result = {"step": step, "out_dir": str(out), "checkpoint": str(latest_checkpoint(ckroot)),
              "layout": model.layout.to_dict(), "interrupted": step < tc.steps}
    for k in ("loss", "psnr", "eval_psnr", "step_time"):
        if k in last:
            result[k] = last[k]
    return result


def main():
    args = parse_cli("Train a stage-1 tokenizer",
                     lambda ap: ap.add_argument("--out", default=None, help="run dir (default runs/tokenizer/<config>)"))
    with user_errors("python -m tokenizer.train", (CheckpointError,)):
        cfg = load_config(TokenizerTrainConfig, args.config, args.overrides)
        out = args.out or str(Path("runs/tokenizer") / (Path(args.config).stem if args.config else "default"))
        res = train(cfg, out)
    if distributed.rank_info()[0] == 0:
        import json
        print(json.dumps(res, indent=1))
    distributed.destroy()
    if res.get("interrupted"):
        sys.exit(143)  # like the AR trainer: `train && encode` must not go on with a half-trained tokenizer


if __name__ == "__main__":
    main()
