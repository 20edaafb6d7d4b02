"""Generation metrics of a samples file: FID, IS, precision/recall (+ class accuracy for ``domain``).

    python -m eval.generation --samples S.npz --ref REF [--out metrics.json] [--config Y] [key=value ...]

``S.npz``: ``arr_0`` uint8 [N,H,W,3] and optional ``labels`` [N] (the sampler's output).
``REF``: a folder of real images, a dataset name (``fmnist``, ``fmnist:train``, ``digits``), or a
reference ``.npz`` (ADM format: ``mu``/``sigma`` used when they match the extractor; ``arr_0`` images
otherwise and for precision/recall). Reference statistics are cached under ``$GROUPGEN_CACHE``
(default ``~/.cache/groupgen``), keyed by reference, extractor (incl. weights hash) and N.
See ``eval/__init__.py`` for which numbers are comparable to papers.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from groupgen.config import ConfigError, load_config, to_dict

from .domain import DomainConfig, class_conditional_accuracy
from .fidelity import (EvalError, build_extractor, dataset_images, emit_json, extract, fid_from_stats, fid_stats,
                       inception_score, load_samples_npz, parse_ref, precision_recall, reference_stats,
                       resolve_device, seeded_subset)

SAMPLES_SEED = 0   # subsets of the generated side (num_samples, pr_max); fixed, so runs compare
FLOOR_DRAWS = 5    # seeded draws of real images behind the equal-N FID floor (mean, spread)


@dataclass
class GenEvalConfig:
    extractor: str = "inception"    # inception (paper-comparable) | domain (small-dataset yardstick)
    inception_weights: str = ""     # path; else $GROUPGEN_INCEPTION_WEIGHTS; else torch hub cache
    domain: DomainConfig = field(default_factory=DomainConfig)
    num_samples: int = 0            # evaluate a seeded random N of the samples (0 = all)
    ref_split: str = "test"         # for dataset references
    ref_n: int = 0                  # reference images used (0 = all; seeded subset otherwise)
    ref_resize: str = "pad"         # dataset references: how 28x28 becomes the samples' size
    batch_size: int = 100
    isc_splits: int = 10
    pr: bool = True                 # precision/recall (needs reference images, not only mu/sigma)
    pr_k: int = 3
    pr_max: int = 10000             # features per side for precision/recall (cdist is N x N; seeded subset)
    device: str = "auto"
    cache: str = ""                 # cache dir override

    def validate(self):
        if self.extractor not in ("inception", "domain"):
            raise EvalError(f"extractor must be 'inception' or 'domain', got {self.extractor!r}")


def check_domain_ref(ref: str, cfg: GenEvalConfig) -> None:
    """A dataset reference scored with the domain classifier of another dataset is meaningless.

    An error rather than quietly switching ``domain.dataset`` to the reference: the classifier is
    part of every domain number, so which one scored a run must be what the config says."""
    if cfg.extractor != "domain":
        return
    kind, name, _ = parse_ref(ref, cfg.ref_split)
    if kind == "dataset" and name != cfg.domain.dataset:
        raise EvalError(f"reference {ref!r} is the {name!r} dataset but extractor=domain uses the classifier "
                        f"trained on {cfg.domain.dataset!r} (domain.dataset); pass domain.dataset={name}")


def evaluate_samples(images: np.ndarray, labels: np.ndarray | None, ref: str, cfg: GenEvalConfig,
                     log=None) -> dict:
    """All generation metrics for uint8 NHWC ``images`` against ``ref``; a JSON-ready dict."""
    t0 = time.perf_counter()
    check_domain_ref(ref, cfg)
    # Subsets of the samples are seeded random, never a prefix: balanced sampling writes the classes
    # one after another, so the first N would cover only the first classes.
    if cfg.num_samples:
        idx = seeded_subset(len(images), cfg.num_samples, seed=SAMPLES_SEED)
        images = images[idx]
        labels = labels[idx] if labels is not None else None
    ext = build_extractor(cfg.extractor, resolve_device(cfg.device), cfg.inception_weights, cfg.domain, cfg.cache)
    hw = tuple(images.shape[1:3])
    ref_st = reference_stats(ref, ext, hw, cfg.ref_n, cfg.ref_split, cfg.pr_max, cfg.batch_size, cfg.cache,
                             cfg.ref_resize)
    feats, logits = extract(ext, images, cfg.batch_size, progress_desc="sample features")
    is_mean, is_std = inception_score(logits, cfg.isc_splits)
    out = {"extractor": ext.name, "num_samples": len(images), "image_hw": list(hw), "ref": ref, "ref_n": ref_st["n"],
           "fid": fid_from_stats(fid_stats(feats), ref_st), "is": is_mean, "is_std": is_std}
    if cfg.pr and ref_st["pr_features"] is not None:
        sel = feats[torch.from_numpy(seeded_subset(len(feats), cfg.pr_max, seed=SAMPLES_SEED + 1))]
        out.update(precision_recall(sel, ref_st["pr_features"], cfg.pr_k))
    elif cfg.pr and log:
        log("precision/recall skipped: the reference has statistics only (no arr_0 images)")
    if cfg.extractor == "domain":
        out["classifier_test_acc"] = ext.info.get("test_acc")
        if labels is not None:
            out["class_acc"] = class_conditional_accuracy(logits, labels)
        out["comparable_to_papers"] = False
    else:
        out["comparable_to_papers"] = "only with 50k samples against the ADM reference batch of the same dataset"
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def fid_floor(ref: str, n: int, hw: tuple[int, int], cfg: GenEvalConfig, draws: int = FLOOR_DRAWS, seed: int = 0,
              split: str = "train", log=None) -> dict:
    """The FID that *real* images score when they stand in for ``n`` samples: ``draws`` seeded subsets of
    ``n`` real ``split`` images, each scored exactly like the samples (same extractor, same reference
    statistics, same N). FID is biased upwards at small N (the covariance of N features is noisy), so a
    sample FID means something only next to this floor at the same N, not next to a 10,000-image one.

    Draw ``i`` uses ``seeded_subset(len(split), n, seed + i)``. Returns the per-draw FIDs and IS, their
    mean, sample standard deviation and range."""
    kind, name, ref_split = parse_ref(ref, cfg.ref_split)
    if kind != "dataset":
        raise EvalError(f"the FID floor needs real images of another split than the reference; reference {ref!r} "
                        f"is a {kind}, not a dataset name")
    if split == ref_split:
        raise EvalError(f"the FID floor's real images must come from another split than the reference's "
                        f"({ref_split!r}); got split={split!r}")
    if n < 2 or draws < 1:
        raise EvalError(f"the FID floor needs n >= 2 images and draws >= 1, got n={n}, draws={draws}")
    check_domain_ref(ref, cfg)
    ext = build_extractor(cfg.extractor, resolve_device(cfg.device), cfg.inception_weights, cfg.domain, cfg.cache)
    ref_st = reference_stats(ref, ext, hw, cfg.ref_n, cfg.ref_split, cfg.pr_max, cfg.batch_size, cfg.cache,
                             cfg.ref_resize)
    seeds = [seed + i for i in range(draws)]
    fids, iss = [], []
    for s in seeds:
        real, _ = dataset_images(name, split, hw, n, cfg.ref_resize, seed=s)
        if len(real) != n:
            raise EvalError(f"the FID floor at N={n} needs {n} real {split!r} images, the split holds {len(real)}")
        feats, logits = extract(ext, real, cfg.batch_size, progress_desc=f"floor features (seed {s})")
        fids.append(fid_from_stats(fid_stats(feats), ref_st))
        iss.append(inception_score(logits, cfg.isc_splits)[0])
    f = np.asarray(fids)
    out = {"n": n, "draws": draws, "seeds": seeds, "split": split, "ref": ref, "ref_n": ref_st["n"],
           "extractor": ext.name, "fid": fids, "fid_mean": float(f.mean()),
           "fid_std": float(f.std(ddof=1)) if draws > 1 else 0.0, "fid_min": float(f.min()),
           "fid_max": float(f.max()), "is_mean": float(np.mean(iss))}
    if log:
        log(f"FID floor at N={n}: {out['fid_mean']:.3f} +- {out['fid_std']:.3f} over {draws} draws of real {split}")
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m eval.generation", description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", required=True, help="samples .npz (arr_0 uint8 [N,H,W,3], optional labels)")
    ap.add_argument("--ref", required=True, help="image folder | fmnist[:split] | digits[:split] | ref .npz")
    ap.add_argument("--out", default=None, help="write the metrics JSON here too")
    ap.add_argument("--config", default=None)
    ap.add_argument("overrides", nargs="*", help="key=value (GenEvalConfig keys, e.g. extractor=domain)")
    args = ap.parse_args(argv)
    from groupgen.runs import set_threads

    set_threads()
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    try:
        cfg = load_config(GenEvalConfig, args.config, args.overrides)
        images, labels = load_samples_npz(args.samples)
        out = {"samples": str(args.samples), **evaluate_samples(images, labels, args.ref, cfg, log)}
    except (EvalError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    out["config"] = to_dict(cfg)
    emit_json(out, args.out)
    return out


if __name__ == "__main__":
    main()
