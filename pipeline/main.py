"""The main job: tokenizer -> token store -> AR prior (DeepSpeed) -> samples -> metrics, in one run folder.

    python -m pipeline.main --config configs/main/fmnist.yaml [key=value ...]   (or: python -m groupgen.main)

Each stage runs in ``out/<n>_<stage>-<hash>/`` where the hash covers the stage's resolved config and the
hashes of the stages before it, and is marked finished by a ``DONE.json``. A re-run reuses finished
stages and resumes unfinished ones; ``redo=[ar]`` (or ``redo=[all]``) recomputes a stage and every stage
after it (their hashes do not cover the results they read). A stage being redone keeps its previous
folder as ``out/.old-<folder>`` until the whole pipeline has finished, so an interrupted or failed redo
loses nothing, and re-running the same command continues it. Final artefacts are copied to ``out/``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from groupgen.checkpoint import atomic_copyfile, atomic_write_text
from groupgen.cli import user_errors
from groupgen.config import ConfigError, config_hash, load_config, save_config
from groupgen.runlock import hold_run_folder
from groupgen.runs import set_threads

STAGES = ("tokenizer", "encode", "ar", "sample", "eval")


@dataclass
class StageRef:
    config: str = ""                                    # the stage's own YAML preset
    overrides: list[str] = field(default_factory=list)  # key=value overrides applied to that preset


@dataclass
class EncodeSection:
    views: int = 2              # 1 = image, 2 = image + horizontal flip
    batch_size: int = 500
    train_limit: int = 0        # training images encoded (0 = all); the CPU demo uses a subset to fit 15 min
    val_limit: int = 0          # test-split images encoded for the AR validation loss (0 = all)


@dataclass
class EvalSection:
    ref: str = "fmnist"                     # reference for FID: dataset name, image folder, or .npz
    extractor: str = "domain"               # domain (small datasets) | inception
    real_n: int = 10000                     # real images per side for the train-vs-test reference FID
    floor_draws: int = 5                    # seeded draws of real train images behind the equal-N FID floor
    floor_seed: int = 0                     # draw i uses seed floor_seed + i
    recon_images: int = 2000                # test images for the tokenizer's PSNR / SSIM / rFID / usage
    overrides: list[str] = field(default_factory=list)   # eval.generation GenEvalConfig overrides


@dataclass
class MainConfig:
    out: str = "runs/fmnist"
    threads: int = 2
    seed: int = 0               # the whole job's seed: the tokenizer's and the prior's train.seed, the sampler's
    #   seed (a stage preset's own seed is replaced; seed 0 leaves the presets' default of 0 as it is)
    tokenizer: StageRef = field(default_factory=StageRef)
    encode: EncodeSection = field(default_factory=EncodeSection)
    ar: StageRef = field(default_factory=StageRef)
    sampling: StageRef = field(default_factory=StageRef)
    eval: EvalSection = field(default_factory=EvalSection)
    redo: list[str] = field(default_factory=list)

    def validate(self):
        bad = [s for s in self.redo if s not in STAGES + ("all",)]
        if bad:
            raise ConfigError(f"redo: unknown stages {bad}; valid: {list(STAGES) + ['all']}")


def encode_stores(tok_dir, out: Path, data_cfg, enc: EncodeSection) -> dict:
    """The encode stage: a training store (``enc.views`` views) and a one-view store of the test split
    for the AR validation loss."""
    from tokenizer.encode import encode

    data = dataclasses.replace(data_cfg, limit=enc.train_limit)
    train_dir = encode(tok_dir, out / "train", data, "train", enc.views, enc.batch_size)
    val_dir = encode(tok_dir, out / "val", dataclasses.replace(data, limit=enc.val_limit), "test", 1, enc.batch_size)
    return {"train": str(train_dir), "val": str(val_dir)}


def eval_config(section):
    """The sample-scoring config of an `eval`/`quality` section (extractor + overrides). One place: the scores
    and the classifier a comparison archives must agree."""
    from eval.generation import GenEvalConfig

    return load_config(GenEvalConfig, None, [f"extractor={section.extractor}"] + section.overrides)


def _log(msg: str) -> None:
    print(f"[pipeline.main {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Pipeline:
    def __init__(self, cfg: MainConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.redo: set[str] = set()
        for name in STAGES if "all" in cfg.redo else cfg.redo:
            self._redo_from(name)
        self.set_aside: list[Path] = []   # previous folders of redone stages, deleted once all finished
        self.timings: dict[str, float] = {}

    def _redo_from(self, name: str) -> None:
        # a later stage's key holds only upstream config hashes, so it would reuse a result computed from
        # the replaced upstream one: redo it too
        self.redo.update(STAGES[STAGES.index(name):] if name in STAGES else (name,))   # e.g. compare's stats

    def stage(self, idx: int, name: str, key: dict, run):
        """Run ``run(dir)`` unless a finished run with the same key exists; return (dir, result, hash)."""
        h = config_hash(key)
        d = self.out / f"{idx}_{name}-{h}"
        done = d / "DONE.json"
        old = self.out / f".old-{d.name}"
        if old.exists():
            # a redo of this stage has not finished (interrupted or failed): keep what it did, finished or
            # not, and redo the later stages
            self._redo_from(name)
        elif name in self.redo:
            # set the previous folder aside (an empty marker if there is none): the redo starts afresh, and
            # the old result survives until the whole pipeline has finished
            if d.exists():
                os.replace(d, old)
            else:
                old.mkdir()
        if old.exists():
            self.set_aside.append(old)
        if done.is_file():
            _log(f"stage {name}: reusing {d}")
            result = json.loads(done.read_text())
            self.timings[name] = f"{result.get('seconds', 0)} (reused)"
            return d, result, h
        d.mkdir(parents=True, exist_ok=True)
        _log(f"stage {name}: running in {d}")
        t0 = time.perf_counter()
        result = run(d)
        if isinstance(result, dict) and (result.get("interrupted") or result.get("stopped_early")):
            # a trainer stopped by a signal saved a checkpoint and returned: resume it next time,
            # never mark it finished
            _log(f"stage {name}: interrupted at step {result.get('step')}")
            raise SystemExit(143)
        self.timings[name] = round(time.perf_counter() - t0, 1)
        result = dict(result or {}, seconds=self.timings[name])
        atomic_write_text(done, json.dumps(result, indent=1, default=str))
        _log(f"stage {name}: done in {self.timings[name]:.0f}s")
        return d, result, h

    def stage_configs(self):
        """The tokenizer, AR and sampling configs: each stage's preset + overrides, seeded by the job's seed."""
        from ar_model.train import ARTrainConfig
        from sampling.sample import SamplingConfig
        from tokenizer.train import TokenizerTrainConfig

        c = self.cfg
        return (load_config(TokenizerTrainConfig, c.tokenizer.config or None,
                            c.tokenizer.overrides + [f"train.seed={c.seed}"]),
                load_config(ARTrainConfig, c.ar.config or None, c.ar.overrides + [f"train.seed={c.seed}"]),
                load_config(SamplingConfig, c.sampling.config or None, c.sampling.overrides + [f"seed={c.seed}"]))

    def run(self) -> dict:
        from ar_model.train import train as train_ar
        from eval.generation import evaluate_samples, fid_floor
        from sampling.sample import sample as run_sampling
        from tokenizer.train import train as train_tok

        c = self.cfg
        t_all = time.perf_counter()
        tok_cfg, ar_cfg, s_cfg = self.stage_configs()
        e_cfg = self.e_cfg = eval_config(c.eval)
        run_lock = hold_run_folder(self.out, "groupgen.main")   # one job per out= (held until run returns)
        save_config(c, self.out / "config.yaml")

        tok_dir, tok_res, h1 = self.stage(1, "tokenizer", {"cfg": tok_cfg},
                                          lambda d: train_tok(tok_cfg, d))
        enc_key = {"up": h1, "enc": c.encode}

        enc_dir, enc_res, h2 = self.stage(2, "encode", enc_key,
                                          lambda d: encode_stores(tok_dir, d, tok_cfg.data, c.encode))

        def run_ar(d):
            cfg = dataclasses.replace(ar_cfg)
            if hasattr(cfg.train, "val_tokens") and not cfg.train.val_tokens:
                cfg.train = dataclasses.replace(cfg.train, val_tokens=enc_res["val"])
            return train_ar(cfg, enc_res["train"], d)

        ar_dir, ar_res, h3 = self.stage(3, "ar", {"up": h2, "cfg": ar_cfg}, run_ar)
        smp_dir, smp_res, h4 = self.stage(4, "sample", {"up": h3, "cfg": s_cfg},
                                          lambda d: run_sampling(s_cfg, ar_dir, d))

        def run_eval(d):
            import numpy as np

            from eval.fidelity import dataset_images

            data = np.load(smp_dir / "samples.npz")
            gen = evaluate_samples(data["arr_0"], data["labels"], c.eval.ref, e_cfg, log=_log)
            # the yardstick: the same metric between real train and real test images
            hw = tuple(data["arr_0"].shape[1:3])
            real, _ = dataset_images(c.eval.ref.partition(":")[0], "train", hw, c.eval.real_n, e_cfg.ref_resize)
            base = evaluate_samples(real, None, c.eval.ref, dataclasses.replace(e_cfg, pr=False), log=_log)
            # the honest yardstick: real train images scored like the samples, at the samples' N
            floor = fid_floor(c.eval.ref, gen["num_samples"], hw, e_cfg, c.eval.floor_draws, c.eval.floor_seed,
                              log=_log)
            from eval.reconstruction import ReconEvalConfig, evaluate_tokenizer
            from tokenizer.model import load_tokenizer

            # rFID with the gFID's extractor (the same domain classifier), on held-out test images
            rec = evaluate_tokenizer(load_tokenizer(tok_dir), ReconEvalConfig(
                n=c.eval.recon_images, extractor=c.eval.extractor, inception_weights=e_cfg.inception_weights,
                domain=e_cfg.domain, lpips=False, device=e_cfg.device, cache=e_cfg.cache), log=_log)
            atomic_write_text(d / "tokenizer.json", json.dumps(rec, indent=1))
            return {"generation": gen, "tokenizer": rec, "fid_floor": floor,
                    "real_train_vs_test": {"fid": base["fid"], "is": base["is"], "n": base["num_samples"]}}

        ev_dir, ev_res, _ = self.stage(5, "eval", {"up": h4, "cfg": e_cfg,
                                                   "ref": c.eval.ref, "real_n": c.eval.real_n,
                                                   "recon_images": c.eval.recon_images,
                                                   "floor": [c.eval.floor_draws, c.eval.floor_seed]}, run_eval)
        metrics = self.collect(tok_dir, enc_res, ar_dir, ar_res, smp_dir, smp_res, ev_res)
        metrics["wall_seconds"] = round(time.perf_counter() - t_all, 1)
        metrics["stage_seconds"] = self.timings
        atomic_write_text(self.out / "metrics.json", json.dumps(metrics, indent=1, default=str))
        self.report(metrics, tok_dir, ar_dir, smp_dir)
        self.drop_set_aside()
        _log(f"finished in {metrics['wall_seconds']:.0f}s; see {self.out / 'report.md'}")
        run_lock.release()
        return metrics

    def drop_set_aside(self) -> None:
        """The pipeline finished: the results its redone stages replaced can go."""
        for old in self.set_aside:
            shutil.rmtree(old)
        self.set_aside = []

    def collect(self, tok_dir, enc_res, ar_dir, ar_res, smp_dir, smp_res, ev_res) -> dict:
        for src, dst in ((smp_dir / "grid.png", "grid.png"), (smp_dir / "samples.npz", "samples.npz")):
            atomic_copyfile(src, self.out / dst)
        strips = sorted(Path(tok_dir).glob("recon_*.png"))
        if strips:
            atomic_copyfile(strips[-1], self.out / "recon.png")
        from groupgen.tokens import TokenStore

        store = TokenStore(enc_res["train"])
        layout = store.layout
        gen = ev_res["generation"]
        out = {
            "layout": layout.to_dict(), "layout_text": layout.describe(),
            "class_names": store.header.get("class_names") or [],
            "tokenizer": {"dir": str(tok_dir), **ev_res.get("tokenizer", {})},
            "ar": {k: v for k, v in (ar_res or {}).items() if isinstance(v, (int, float, str, list))},
            "sampling": {"dir": str(smp_dir)},
            "generation": gen, "real_train_vs_test": ev_res["real_train_vs_test"],
            "fid_floor": ev_res.get("fid_floor"),
        }
        out.update(ratios(gen, ev_res.get("fid_floor")))
        return out

    def report(self, m: dict, tok_dir, ar_dir, smp_dir) -> None:
        import numpy as np

        from .report import loss_curves_png, real_vs_samples_png, write_report

        figs = {"loss_curves": "loss_curves.png"}
        loss_curves_png(Path(tok_dir) / "metrics.jsonl", Path(ar_dir) / "metrics.jsonl", self.out / figs["loss_curves"])
        with np.load(Path(smp_dir) / "samples.npz") as z:
            images, labels = z["arr_0"], z["labels"]
        real = self.real_test_images(tuple(images.shape[1:3]))
        if real is not None:
            figs["real_vs_samples"] = "real_vs_samples.png"
            real_vs_samples_png(*real, images, labels, self.out / figs["real_vs_samples"],
                                class_names=m.get("class_names"))
        write_report(self.out, m, figs)

    def real_test_images(self, hw: tuple[int, int]):
        """Held-out real images (with labels) of a dataset reference, for the side-by-side figure."""
        from eval.fidelity import dataset_images, parse_ref

        kind, name, _ = parse_ref(self.cfg.eval.ref, "test")
        if kind != "dataset":
            return None
        return dataset_images(name, "test", hw, 2000, self.e_cfg.ref_resize)


def ratios(gen: dict, floor: dict | None) -> dict:
    """The samples' numbers over their yardsticks: FID over the equal-N floor's mean, class accuracy over
    the classifier's accuracy on real test images."""
    out = {}
    if floor and floor.get("fid_mean"):
        out["fid_ratio"] = gen["fid"] / floor["fid_mean"]
    acc, ref_acc = gen.get("class_acc"), gen.get("classifier_test_acc")
    if acc is not None and ref_acc:
        out["class_acc_ratio"] = acc / ref_acc
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m pipeline.main", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/main/fmnist.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. out=runs/x 'ar.overrides=[train.steps=50]'")
    args = ap.parse_args(argv)
    with user_errors(ap.prog):
        cfg = load_config(MainConfig, args.config, args.overrides)
        set_threads(cfg.threads)
        return _run_until_signal(Pipeline(cfg))


class Terminated(BaseException):
    """SIGTERM outside a trainer (which checkpoints and stops on its own): unwind and say how to resume."""


def _terminated(signum, frame):
    raise Terminated()


def _run_until_signal(pipe: Pipeline) -> dict:
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return pipe.run()
    except (Terminated, KeyboardInterrupt, SystemExit) as e:
        if isinstance(e, SystemExit) and e.code not in (130, 143):
            raise
        code = 130 if isinstance(e, KeyboardInterrupt) or getattr(e, "code", 0) == 130 else 143
        _log(f"stopped by {'SIGINT' if code == 130 else 'SIGTERM'}; finished stages and saved checkpoints in "
             f"{pipe.out} are kept: re-run the same command to resume")
        sys.exit(code)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
