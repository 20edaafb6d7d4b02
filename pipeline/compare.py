"""Token-layout comparison: one AR recipe trained on the token stores of several tokenizers.

    python -m pipeline.compare --config configs/main/compare_fmnist.yaml [key=value ...]

For every layout row (a tokenizer preset + overrides, and AR overrides such as the head kind) it
trains the tokenizer, encodes the train split (and a test-split validation store), measures
reconstruction (held-out PSNR, SSIM, code usage) and layout statistics (``eval.layout_stats``), then
trains the *shared* AR recipe (same preset, steps, schedule, seeds for every row) with a checkpoint
every ``quality.every`` steps. Each checkpoint samples the same balanced label set with the same
sampling seed and gets domain (or Inception) FID, IS and class-conditional accuracy; the AR
validation loss at that step comes from the run's log. Results: ``out/compare.md`` (one table),
``out/compare.json`` (everything, incl. full curves) and ``out/quality_vs_steps.png``.

Quality vs steps comes from the intermediate checkpoints of one run per (row, seed) rather than from
separate shorter runs: the cheapest correct choice (a curve over one schedule, like FID-vs-epochs
plots); the cosine LR therefore has not decayed at intermediate points.

Stages are ``pipeline.main.Pipeline.stage`` (cached under ``out/stages/<n>_<stage>-<hash>/``,
finished ones reused, ``redo=[ar,sample]`` recomputes). Rows sharing a tokenizer (MGVQ with both
head kinds) share its tokenizer/encode/stats stages because the keys are equal.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from groupgen.checkpoint import atomic_write_text
from groupgen.cli import user_errors
from groupgen.config import ConfigError, config_hash, load_config, save_config, to_dict
from groupgen.runlock import hold_run_folder
from groupgen.runs import read_jsonl, set_threads
from eval.study_stats import ci95, convergence

from . import stage_archive
from .compare_report import plot_quality, write_study_results, write_table
from .main import STAGES, EncodeSection, MainConfig, Pipeline, StageRef, encode_stores, eval_config

EXTRA_STAGES = ("stats",)   # compare-only stage names (recon + layout statistics)
EXTRACTOR_DIR = "extractor"  # archive/<this>/<folder>: the domain classifier a study's FIDs come from


@dataclass
class LayoutSpec:
    name: str = ""                                          # row label, unique
    tokenizer: StageRef = field(default_factory=StageRef)   # tokenizer preset + its overrides
    ar_overrides: list[str] = field(default_factory=list)   # on top of the shared AR recipe (e.g. model.head)
    extra: bool = False                                     # run only with select=[all] or when named


@dataclass
class QualitySection:
    every: int = 0                      # evaluate every N AR steps (+ the final one); 0 = final only
    sampling: StageRef = field(default_factory=StageRef)   # one fixed sampling recipe for all rows
    ref: str = "fmnist"                 # FID reference: dataset name, folder, or ADM .npz
    extractor: str = "domain"           # domain | inception
    overrides: list[str] = field(default_factory=list)     # eval.generation GenEvalConfig overrides
    real_baseline: bool = True          # same metric for real train vs ref (dataset refs only)
    floor_draws: int = 5                # the equal-N floor: seeded draws of N real train images (0 = off)


@dataclass
class StatsSection:
    recon_images: int = 2000            # held-out (test split) images for PSNR / usage; 0 = all
    recon_batch: int = 250
    layout_overrides: list[str] = field(default_factory=list)   # eval.layout_stats LayoutStatsConfig


@dataclass
class CompareConfig:
    out: str = "runs/compare_fmnist"
    threads: int = 2
    jobs: int = 1        # > 1: rows trained by that many worker processes (pipeline/parallel.py), each at `threads`
    layouts: list[LayoutSpec] = field(default_factory=list)
    select: list[str] = field(default_factory=list)   # row names; [] = all non-extra rows; [all] = every row
    tokenizer_overrides: list[str] = field(default_factory=list)   # appended to every row's tokenizer
    encode: EncodeSection = field(default_factory=EncodeSection)
    ar: StageRef = field(default_factory=StageRef)     # the shared AR recipe
    seeds: list[int] = field(default_factory=lambda: [0])   # AR seeds (each row runs every seed)
    quality: QualitySection = field(default_factory=QualitySection)
    stats: StatsSection = field(default_factory=StatsSection)
    redo: list[str] = field(default_factory=list)
    results: str = ""    # also write the study's results.json here (one object per row; issue 23's format)
    archive: str = ""    # keep finished stages' records here (in the repository) and restore them at start:
                         # a study continues on a machine that starts empty (pipeline/stage_archive.py)
    tok_conv_db: float = 0.2   # a tokenizer counts as converged when held-out PSNR gains less over its last fifth

    def validate(self):
        names = [spec.name for spec in self.layouts]
        if not names:
            raise ConfigError("layouts: no layout rows configured")
        if "" in names or len(set(names)) != len(names):
            raise ConfigError(f"layouts: every row needs a unique non-empty name, got {names}")
        unknown = [s for s in self.select if s != "all" and s not in names]
        if unknown:
            raise ConfigError(f"select: unknown rows {unknown}; configured rows: {names}")
        valid = STAGES + EXTRA_STAGES + ("all",)
        bad = [s for s in self.redo if s not in valid]
        if bad:
            raise ConfigError(f"redo: unknown stages {bad}; valid: {list(valid)}")
        if self.jobs < 1:
            raise ConfigError(f"jobs must be >= 1, got {self.jobs}")
        if not self.seeds:
            raise ConfigError("seeds: give at least one AR seed")
        if self.quality.every < 0:
            raise ConfigError(f"quality.every must be >= 0, got {self.quality.every}")

    def rows(self) -> list[LayoutSpec]:
        if "all" in self.select:
            return list(self.layouts)
        if self.select:
            return [s for s in self.layouts if s.name in self.select]
        return [s for s in self.layouts if not s.extra]


def _log(msg: str) -> None:
    print(f"[pipeline.compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _finite(x) -> float | None:
    return float(x) if x is not None and isinstance(x, (int, float)) and math.isfinite(float(x)) else None


def scheduled_checkpoints(ckpt_dir: Path, every: int) -> list[tuple[int, Path]]:
    """(step, folder) of the checkpoints on the quality schedule: every ``every`` steps and the final one.
    A run stopped and resumed also keeps the checkpoint it saved to resume from; scoring that one would add a
    curve point that exists only because (and in the seeds where) the run was interrupted."""
    cks = sorted((int(ck.name.split("_")[1]), ck) for ck in ckpt_dir.glob("step_*"))
    final = cks[-1][0] if cks else None
    return [(s, ck) for s, ck in cks if s == final or (every > 0 and s % every == 0)]


def _mean_std(xs: list) -> tuple[float | None, float | None]:
    v = [float(x) for x in xs if _finite(x) is not None]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v)) if len(v) > 1 else None)


class Comparison:
    def __init__(self, cfg: CompareConfig):
        from ar_model.train import ARTrainConfig
        from sampling.sample import SamplingConfig

        self.cfg = cfg
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.archive = Path(cfg.archive) if cfg.archive else None
        self.pipe = Pipeline(MainConfig(out=str(self.out / "stages"), threads=cfg.threads))
        self.pipe.redo = set(STAGES + EXTRA_STAGES) if "all" in cfg.redo else set(cfg.redo)
        self.memo: dict[str, tuple] = {}   # one run per key per invocation (redo must not repeat it)
        q = cfg.quality
        if not q.ref:   # fail before hours of training, not at the first evaluation
            raise ConfigError("quality.ref: no FID reference given (dataset name, image folder or ADM .npz)")
        if q.ref.endswith(".npz") and not Path(q.ref).is_file():
            raise ConfigError(f"quality.ref: reference batch {q.ref!r} does not exist")
        load_config(ARTrainConfig, cfg.ar.config or None, cfg.ar.overrides)   # fail fast on a bad shared recipe
        self.s_cfg = load_config(SamplingConfig, q.sampling.config or None, q.sampling.overrides)
        self.e_cfg = eval_config(q)

    def stage(self, idx: int, name: str, key: dict, fn):
        h = config_hash(key)
        if (name, h) not in self.memo:
            self.memo[(name, h)] = self.pipe.stage(idx, name, key, fn)
            if name not in stage_archive.ARCHIVED_AFTER_SCORING:
                self.archive_finished(self.memo[(name, h)][0])
        return self.memo[(name, h)]

    def archive_finished(self, *dirs) -> None:
        """Export finished stages to the archive (when one is configured), and with the first scored
        samples the domain classifier that scored them."""
        if not self.archive:
            return
        for d in dirs:
            if stage_archive.export_stage(Path(d), self.archive):
                _log(f"archived {Path(d).name}")
            ck = extractor_checkpoint(self.e_cfg) if stage_archive.stage_name(Path(d)) == "eval" else None
            if ck and (ck / "meta.json").is_file() \
                    and stage_archive.copy_folder_once(ck, self.archive / EXTRACTOR_DIR / ck.name):
                _log(f"archived the domain classifier {ck.name}")

    # ------------------------------------------------------------------------------- stage 1
    def tokens(self, spec: LayoutSpec) -> dict:
        """Tokenizer, train/val token stores, recon + layout statistics of one row (cached)."""
        from eval.layout_stats import LayoutStatsConfig, layout_stats
        from groupgen.tokens import TokenStore
        from eval.reconstruction import ReconEvalConfig, evaluate_tokenizer
        from tokenizer.model import load_tokenizer
        from tokenizer.train import train as train_tok

        c = self.cfg
        tok_cfg = tokenizer_config(c, spec)
        tok_dir, tok_res, h1 = self.stage(1, "tokenizer", {"cfg": tok_cfg},
                                          lambda d: train_tok(tok_cfg, d))

        _, enc, h2 = self.stage(2, "encode", {"up": h1, "enc": c.encode},
                                lambda d: encode_stores(tok_dir, d, tok_cfg.data, c.encode))
        ls_cfg = load_config(LayoutStatsConfig, None, c.stats.layout_overrides)

        def run_stats(d):
            rc = ReconEvalConfig(split="test", n=c.stats.recon_images, batch_size=c.stats.recon_batch,
                                 lpips=False, extractor="none")
            rec = evaluate_tokenizer(load_tokenizer(tok_dir), rc, log=_log)
            atomic_write_text(d / "recon.json", json.dumps(rec, indent=1))
            lay = layout_stats(TokenStore(enc["train"]), ls_cfg)
            return {"recon": rec, "layout": lay}

        _, st, _ = self.stage(2, "stats", {"up": h2, "recon": c.stats,
                                           "layout": ls_cfg}, run_stats)
        return {"tok_dir": str(tok_dir), "tok_res": tok_res, "enc": enc, "h": h2, "stats": st,
                "tokenizer_config": spec.tokenizer.config}

    # ------------------------------------------------------------------------------- stage 2
    def ar_config(self, spec: LayoutSpec, seed: int):
        from ar_model.train import ARTrainConfig

        every = self.cfg.quality.every
        forced = [f"train.seed={seed}", f"train.ckpt_every={every}", "train.keep_last=0",
                  f"train.eval_every={every}", "train.val_split=0.0"]
        return load_config(ARTrainConfig, self.cfg.ar.config or None,
                           self.cfg.ar.overrides + forced + spec.ar_overrides)

    def ar(self, spec: LayoutSpec, tok: dict, seed: int):
        ar_cfg = self.ar_config(spec, seed)

        def run_ar(d):
            from ar_model.train import train as train_ar
            from groupgen.checkpoint import latest_checkpoint

            cfg = dataclasses.replace(ar_cfg, train=dataclasses.replace(ar_cfg.train, val_tokens=tok["enc"]["val"]))
            res = train_ar(cfg, tok["enc"]["train"], d)
            # Only the latest checkpoint needs DeepSpeed state (resume); the others serve sampling.
            latest = latest_checkpoint(d / "checkpoints")
            for p in (d / "checkpoints").glob("step_*/engine"):
                if latest is None or p.parent.name != latest.name:
                    shutil.rmtree(p, ignore_errors=True)
            return res

        return self.stage(3, "ar", {"up": tok["h"], "cfg": ar_cfg}, run_ar)

    # ------------------------------------------------------------------------------- quality
    def quality_at(self, ckpt: Path, h_ar: str, step: int) -> dict:
        from eval.generation import evaluate_samples
        from sampling.sample import sample as run_sampling

        s_cfg, e_cfg, ref = self.s_cfg, self.e_cfg, self.cfg.quality.ref

        def run_sample(d):
            if not (Path(ckpt) / "model.safetensors").is_file():
                raise ConfigError(f"{ckpt}: no weights to sample from: this AR run was restored from the archive "
                                  f"as records only (scored with another sampling recipe); add redo=[ar] to retrain it")
            return run_sampling(s_cfg, ckpt, d)

        smp_dir, _, h4 = self.stage(4, "sample", {"up": h_ar, "step": step, "cfg": s_cfg},
                                    run_sample)

        def run_eval(d):
            data = np.load(Path(smp_dir) / "samples.npz")
            return evaluate_samples(data["arr_0"], data["labels"], ref, e_cfg, log=_log)

        _, ev, _ = self.stage(5, "eval", {"up": h4, "cfg": e_cfg, "ref": ref}, run_eval)
        return dict(ev, samples=str(Path(smp_dir) / "samples.npz"), sample_dir=str(smp_dir))

    def real_baseline(self, n: int, hw: tuple[int, int]) -> dict | None:
        from eval.fidelity import dataset_images, parse_ref
        from eval.generation import evaluate_samples

        ref = self.cfg.quality.ref
        if not self.cfg.quality.real_baseline or parse_ref(ref, "test")[0] != "dataset":
            return None
        e_cfg = self.e_cfg

        def run(d):
            real, labels = dataset_images(ref.partition(":")[0], "train", hw, n, e_cfg.ref_resize)
            return evaluate_samples(real, labels, ref, e_cfg, log=_log)

        return self.stage(5, "eval", {"real_train": ref, "n": n, "hw": list(hw),
                                      "cfg": e_cfg}, run)[1]

    def fid_floor(self, n: int, hw: tuple[int, int]) -> dict | None:
        """The equal-N floor (``eval.generation.fid_floor``, as the main job reports it): what real train
        images score in the samples' place, over ``quality.floor_draws`` seeded draws."""
        from eval.fidelity import parse_ref
        from eval.generation import fid_floor

        q = self.cfg.quality
        if q.floor_draws < 1 or parse_ref(q.ref, "test")[0] != "dataset":
            return None
        return self.stage(5, "eval", {"floor": q.ref, "n": n, "hw": list(hw), "draws": q.floor_draws,
                                      "cfg": self.e_cfg},
                          lambda d: fid_floor(q.ref, n, hw, self.e_cfg, q.floor_draws, 0, log=_log))[1]

    # ------------------------------------------------------------------------------- driver
    def run(self, rows_only: bool = False, rows_done: bool = False) -> dict:
        """Every selected row (tokenizer, priors, quality), then the yardsticks and the outputs;
        ``rows_only``: stop after the rows (a worker of ``jobs > 1``; its caller collects);
        ``rows_done``: workers have just trained (and redone) the rows: reuse them, and apply ``redo`` to the
        yardsticks only (a second redo here would repeat the workers' work)."""
        from groupgen.tokens import TokenStore

        t0 = time.perf_counter()
        save_config(self.cfg, self.out / "config.yaml")
        redo, self.pipe.redo = self.pipe.redo, (set() if rows_done else self.pipe.redo)
        rows = []
        for spec in self.cfg.rows():
            _log(f"row {spec.name}: {spec.tokenizer.config} {spec.tokenizer.overrides} AR {spec.ar_overrides}")
            tok = self.tokens(spec)
            layout = TokenStore(tok["enc"]["train"]).layout
            runs = []
            for seed in self.cfg.seeds:
                ar_dir, ar_res, h3 = self.ar(spec, tok, seed)
                val = {r["step"]: r["val_loss"] for r in read_jsonl(Path(ar_dir) / "metrics.jsonl") if "val_loss" in r}
                points, sample_dirs = [], []
                for step, ck in scheduled_checkpoints(Path(ar_dir) / "checkpoints", self.cfg.quality.every):
                    ev = self.quality_at(ck, h3, step)
                    vl = val.get(step)
                    points.append({"step": step, "fid": ev["fid"], "is": ev["is"], "class_acc": ev.get("class_acc"),
                                   "precision": ev.get("precision"), "recall": ev.get("recall"), "val_loss": vl,
                                   "val_nll_bits": (vl * layout.L * layout.G / math.log(2)) if vl is not None else None,
                                   "num_samples": ev["num_samples"], "samples": ev["samples"],
                                   "image_hw": ev.get("image_hw")})
                    sample_dirs.append(ev["sample_dir"])
                self.archive_finished(ar_dir, *sample_dirs)   # every checkpoint scored: the weights and samples are done with
                runs.append({"seed": seed, "dir": str(ar_dir), "params": ar_res.get("params"),
                             "final_loss": ar_res.get("loss"), "points": points})
            rows.append(self.summarise(spec, tok, layout, runs))
        self.pipe.redo = redo
        if rows_only:
            self.pipe.drop_set_aside()   # this worker's rows are finished: what their redo replaced can go
            return {"rows": rows}
        base = floor = None
        first = next((p for r in rows for run in r["runs"] for p in run["points"]), None)
        if first is not None:   # the yardsticks at the same N and image size as the samples
            hw = first["image_hw"]
            if hw is None:      # an eval cached before evaluate_samples recorded the size
                with np.load(first["samples"]) as z:
                    hw = z["arr_0"].shape[1:3]
            hw = tuple(int(v) for v in hw)
            base = self.real_baseline(first["num_samples"], hw)
            floor = self.fid_floor(first["num_samples"], hw)
        self.pipe.drop_set_aside()
        result = {"rows": rows, "real_train_vs_ref": base, "fid_floor": floor, "config": to_dict(self.cfg),
                  "extractor": self.cfg.quality.extractor, "ref": self.cfg.quality.ref,
                  "wall_seconds": round(time.perf_counter() - t0, 1)}
        atomic_write_text(self.out / "compare.json", json.dumps(result, indent=1, default=str))
        write_table(result, self.out / "compare.md")
        plot_quality(result, self.out / "quality_vs_steps.png")
        if self.cfg.results:
            write_study_results(result, Path(self.cfg.results))
        _log(f"done in {result['wall_seconds']:.0f}s: {self.out / 'compare.md'}")
        return result

    def summarise(self, spec: LayoutSpec, tok: dict, layout, runs: list[dict]) -> dict:
        """Per-step means (and std over seeds) of every quality number, plus the stage-1 statistics."""
        steps = sorted({p["step"] for r in runs for p in r["points"]})
        curve = []
        for s in steps:
            pts = [p for r in runs for p in r["points"] if p["step"] == s]
            row = {"step": s, "n_seeds": len(pts)}
            for k in ("fid", "is", "class_acc", "precision", "recall", "val_loss", "val_nll_bits"):
                row[k], row[f"{k}_std"] = _mean_std([p.get(k) for p in pts])
                row[f"{k}_ci95"] = ci95([float(p[k]) for p in pts if _finite(p.get(k)) is not None])
            curve.append(row)
        st = tok["stats"]
        tok_curve = [(m["step"], m["eval_psnr"]) for m in read_jsonl(Path(tok["tok_dir"]) / "metrics.jsonl")
                     if "eval_psnr" in m]
        tok_steps = int(tok["tok_res"].get("step") or 0)
        rec, lay = st["recon"], st["layout"]
        return {
            "name": spec.name, "tokenizer": tok["tokenizer_config"], "tokenizer_overrides": spec.tokenizer.overrides,
            "ar_overrides": spec.ar_overrides, "layout": layout.to_dict(), "layout_text": layout.describe(),
            "L": layout.L, "G": layout.G, "K": list(layout.K), "bits_per_image": layout.bits_per_image,
            "recon": rec, "layout_stats": lay, "tokenizer_dir": tok["tok_dir"], "stores": tok["enc"],
            "tokenizer_steps": tok_steps, "tokenizer_curve": tok_curve,
            "tokenizer_convergence": convergence(tok_curve, tok_steps, self.cfg.tok_conv_db),
            "params": runs[0]["params"] if runs else None, "runs": runs, "curve": curve,
            "final": curve[-1] if curve else None,
            "best_fid": min((c for c in curve if c["fid"] is not None), key=lambda c: c["fid"], default=None),
        }


def extractor_checkpoint(e_cfg) -> Path | None:
    """The cached domain classifier folder that scores samples under `e_cfg` (None: another extractor)."""
    from eval.domain import checkpoint_path

    return checkpoint_path(e_cfg.domain, e_cfg.cache) if e_cfg.extractor == "domain" else None


def restore_archive(cfg: CompareConfig) -> None:
    """Finished stages, and the domain classifier the archived FIDs were computed with (where this machine's
    cache has none: one trained here would differ in the last bits). A cached classifier of the same name
    with other weights is an error: the study's FIDs would mix two extractors."""
    archive = Path(cfg.archive)
    stage_archive.restore(archive, Path(cfg.out) / "stages", log=_log)
    ck = extractor_checkpoint(eval_config(cfg.quality))
    kept = archive / EXTRACTOR_DIR / ck.name if ck else None
    if not (kept and (kept / "meta.json").is_file()):
        return
    if (ck / "meta.json").is_file():
        if (ck / "model.safetensors").read_bytes() != (kept / "model.safetensors").read_bytes():
            raise ConfigError(f"the domain classifier cached at {ck} has other weights than the one this study's "
                              f"FIDs were computed with ({kept}): move the cached one away (the archived one is "
                              "then restored) or give this study its own cache (quality.overrides=[cache=...])")
        return
    shutil.rmtree(ck, ignore_errors=True)
    stage_archive.copy_folder_once(kept, ck)
    _log(f"restored the domain classifier {ck.name} from {archive}")


def train_extractor_once(cfg: CompareConfig) -> None:
    """Before several workers start: the domain classifier, trained by this one process if the cache has none
    (two workers would each train one, and score their rows with different weights)."""
    e_cfg = eval_config(cfg.quality)
    if e_cfg.extractor == "domain":
        from eval.domain import load_or_train

        load_or_train(e_cfg.domain, e_cfg.cache, log=_log)


def tokenizer_config(cfg: CompareConfig, spec: LayoutSpec):
    """A row's tokenizer training config (its stage key: rows with equal ones share one tokenizer)."""
    from tokenizer.train import TokenizerTrainConfig

    if not spec.tokenizer.config:
        raise ConfigError(f"layouts[{spec.name}].tokenizer.config: no tokenizer preset given")
    return load_config(TokenizerTrainConfig, spec.tokenizer.config, spec.tokenizer.overrides + cfg.tokenizer_overrides)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m pipeline.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/main/compare_fmnist.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. out=runs/x 'select=[vq,mgvq_g4_ind]'")
    ap.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)   # a worker of jobs > 1
    args = ap.parse_args(argv)
    try:
        cfg = load_config(CompareConfig, args.config, args.overrides)
    except ConfigError as e:
        ap.error(str(e))
    if args.rows_only:   # a worker: its caller holds the folder and has restored and dealt the rows
        set_threads(cfg.threads)
        return Comparison(cfg).run(rows_only=True)
    # one comparison per out= (its workers run under this one): a second would train the same stages
    lock = hold_run_folder(cfg.out, "pipeline.compare")
    try:
        if cfg.archive:   # before any worker starts: one process copies
            restore_archive(cfg)
        if cfg.jobs > 1:
            from .parallel import deal_rows, run_workers, worker_commands

            train_extractor_once(cfg)
            keys = [(s.name, config_hash(tokenizer_config(cfg, s))) for s in cfg.rows()]
            run_workers(worker_commands(args.config, args.overrides, deal_rows(keys, cfg.jobs)), log=_log)
        set_threads(cfg.threads)
        return Comparison(cfg).run(rows_done=cfg.jobs > 1)
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    with user_errors("python -m pipeline.compare"):
        main()
