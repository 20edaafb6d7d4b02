"""A small Fashion-MNIST classifier as a *domain* feature extractor (Inception is meaningless and slow
on 28x28 grey clothes): penultimate features for domain FID / precision-recall, logits for domain IS
and the class-conditional accuracy of samples.

The classifier is trained on the real training split, cached under ``<cache>/domain/<config hash>/``
as a groupgen checkpoint (safetensors + meta with its test accuracy), and registered with
torch-fidelity as ``groupgen-domain`` so ``torch_fidelity.calculate_metrics(feature_extractor=
"groupgen-domain", feature_extractor_weights_path=<checkpoint dir>)`` gives the same numbers.

    python -m eval.domain train [key=value ...]       # build (or rebuild with force=true) and report
    python -m eval.domain baseline [n=10000 ...]      # domain FID/IS/PR of real train vs real test
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from groupgen.checkpoint import load_meta, load_tensors, write_checkpoint_dir
from groupgen.config import config_hash, load_config, to_dict

from .fidelity import EvalError, Extractor, cache_dir

FEATURES = ("features", "logits")


@dataclass
class DomainConfig:
    dataset: str = "fmnist"         # fmnist | digits (real training split)
    image_size: int = 32            # classifier input; other sizes are resized to it
    resize: str = "pad"             # how 28x28 becomes image_size (same meaning as DataConfig.resize)
    width: int = 16                 # conv channels: width, 2*width, 4*width
    hidden: int = 128               # penultimate (feature) dimension
    epochs: int = 2
    batch_size: int = 128
    lr: float = 3e-3
    train_limit: int = 0            # use the first N training images (0 = all); tests use a few thousand
    test_limit: int = 0             # accuracy on the first N test images (0 = all 10k)
    seed: int = 0
    bf16: bool = True               # bf16 autocast for training only (AMX on CPU); features are fp32


class DomainNet(nn.Module):
    def __init__(self, cfg: DomainConfig, num_classes: int = 10):
        super().__init__()
        w = cfg.width

        def block(i, o, k):
            return [nn.Conv2d(i, o, k, padding=k // 2), nn.BatchNorm2d(o), nn.ReLU()]

        self.body = nn.Sequential(*block(1, w, 5), nn.MaxPool2d(2), *block(w, 2 * w, 5), nn.MaxPool2d(2),
                                  *block(2 * w, 4 * w, 3), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                  nn.Linear(16 * w, cfg.hidden), nn.ReLU())
        self.head = nn.Linear(cfg.hidden, num_classes)
        self.image_size = cfg.image_size

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [B,C,H,W] (C = 1 or 3) -> grey float in [-1,1] at the classifier's size."""
        if x.dtype == torch.uint8:
            x = x.float().div(127.5).sub(1.0)
        if x.shape[1] != 1:
            x = x.mean(1, keepdim=True)
        s = self.image_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=x.shape[-1] > s)
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.body(self.prepare(x))
        return f, self.head(f)


def _data(cfg: DomainConfig, split: str):
    from groupgen.data import DataConfig, build_dataset

    return build_dataset(DataConfig(name=cfg.dataset, image_size=cfg.image_size, channels=1, resize=cfg.resize,
                                    limit=cfg.train_limit if split == "train" else cfg.test_limit), split)


@torch.no_grad()
def predict(net: DomainNet, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    net.eval()
    return torch.cat([net(x[a: a + batch_size])[1] for a in range(0, len(x), batch_size)])


def train_domain_classifier(cfg: DomainConfig, log=None) -> tuple[DomainNet, dict]:
    """Train on the real training split; returns the net (eval mode) and {test_acc, train_s, ...}."""
    torch.manual_seed(cfg.seed)
    tr, te = _data(cfg, "train"), _data(cfg, "test")
    net = DomainNet(cfg, tr.num_classes)
    steps_per_epoch = max(1, len(tr) // cfg.batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    # one-cycle: reaches ~90% on Fashion-MNIST in 2 epochs, which a constant LR does not
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    net.train()
    for ep in range(cfg.epochs):
        perm = torch.randperm(len(tr), generator=gen)
        for i in range(steps_per_epoch):
            x, y = tr.batch(perm[i * cfg.batch_size: (i + 1) * cfg.batch_size])
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = F.cross_entropy(net(x)[1].float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if log:
            log(f"domain classifier epoch {ep + 1}/{cfg.epochs}: loss {loss.item():.3f} "
                f"({time.perf_counter() - t0:.0f}s)")
    train_s = time.perf_counter() - t0
    net.eval()
    acc = float((predict(net, te.images).argmax(1) == te.labels).float().mean())
    return net, {"test_acc": acc, "train_s": round(train_s, 1), "train_images": len(tr),
                 "class_names": list(tr.class_names), "num_classes": tr.num_classes}


def checkpoint_path(cfg: DomainConfig, cache: str = "") -> Path:
    return cache_dir(cache) / "domain" / f"{cfg.dataset}-{config_hash(cfg)}"


def load_or_train(cfg: DomainConfig, cache: str = "", force: bool = False, log=None) -> tuple[DomainNet, dict]:
    """The cached classifier for ``cfg`` (trained and cached on first use)."""
    path = checkpoint_path(cfg, cache)
    if not force and (path / "meta.json").is_file():
        return load_domain_checkpoint(path)
    if log:
        log(f"training the domain classifier ({cfg.dataset}); cached at {path}")
    net, info = train_domain_classifier(cfg, log)
    write_checkpoint_dir(path, {"model": net.state_dict()},
                         {"kind": "domain_classifier", "config": to_dict(cfg), **info})
    return net, {**info, "path": str(path)}


def load_domain_checkpoint(path: str | Path) -> tuple[DomainNet, dict]:
    meta = load_meta(path)
    if meta.get("kind") != "domain_classifier":
        raise EvalError(f"{path}: not a domain classifier checkpoint (kind={meta.get('kind')!r})")
    cfg = DomainConfig(**meta["config"])
    net = DomainNet(cfg, int(meta["num_classes"]))
    net.load_state_dict(load_tensors(path, "model"))
    net.eval()
    info = {k: meta[k] for k in ("test_acc", "train_s", "train_images", "num_classes") if k in meta}
    return net, {**info, "path": str(path)}


class DomainExtractor(Extractor):
    """fidelity.Extractor over the cached classifier: (penultimate features, logits)."""

    def __init__(self, cfg: DomainConfig, device: torch.device = torch.device("cpu"), cache: str = "",
                 log=None):
        super().__init__(device)
        self.net, self.info = load_or_train(cfg, cache, log=log or (lambda m: print(m, file=sys.stderr)))
        self.net.to(device)
        self.feature_dim = cfg.hidden
        # the weights' hash is part of the name, so cached reference statistics never outlive the
        # classifier they were computed with (e.g. after it is retrained under the same config)
        from groupgen.checkpoint import checkpoint_hash

        self.name = f"domain-{Path(self.info['path']).name}-{checkpoint_hash(self.info['path'])[:8]}"

    @torch.no_grad()
    def __call__(self, x):
        f, logits = self.net(x.to(self.device))
        return f.float().cpu(), logits.float().cpu()


def class_conditional_accuracy(logits: torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """Share of samples the classifier assigns to their conditioning label."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if labels.shape != (len(logits),):
        raise EvalError(f"labels shape {list(labels.shape)} does not match {len(logits)} samples")
    if len(labels) and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise EvalError(f"labels outside [0, {logits.shape[1]}) of the domain classifier")
    return float((logits.argmax(1) == labels).float().mean())


class DomainFeatureExtractorTF(FeatureExtractorBase):
    """The same classifier for torch-fidelity's ``calculate_metrics``; weights path = checkpoint dir."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if not feature_extractor_weights_path:
            raise EvalError("groupgen-domain needs feature_extractor_weights_path=<domain checkpoint dir> "
                            "(build one with: python -m eval.domain train)")
        self.net = load_domain_checkpoint(feature_extractor_weights_path)[0]
        self.requires_grad_(False)

    def forward(self, x):
        f, logits = self.net(x)
        out = {"features": f.float(), "logits": logits.float()}
        return tuple(out[k] for k in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return FEATURES

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)


def register_with_torch_fidelity(name: str = "groupgen-domain") -> None:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(name, DomainFeatureExtractorTF)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m eval.domain", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["train", "baseline"])
    ap.add_argument("--config", default=None, help="YAML with DomainConfig keys")
    ap.add_argument("overrides", nargs="*", help="key=value (DomainConfig keys; baseline also n=, cache=, "
                                                  "force=)")
    args = ap.parse_args(argv)
    extra = {}
    rest = []
    for o in args.overrides:  # a few non-config knobs of this CLI
        k, _, v = o.partition("=")
        (extra.__setitem__(k, v) if k in ("n", "cache", "force") else rest.append(o))
    cfg = load_config(DomainConfig, args.config, rest)
    from groupgen.runs import set_threads

    set_threads()
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    cache = extra.get("cache", "")
    if args.command == "train":
        net, info = load_or_train(cfg, cache, force=extra.get("force", "false").lower() in ("1", "true"), log=log)
        out = {k: v for k, v in info.items() if k != "class_names"}
    else:
        from .fidelity import dataset_images, extract, fid_from_features, inception_score, precision_recall

        n = int(extra.get("n", 10000))
        ext = DomainExtractor(cfg, cache=cache, log=log)
        hw = (cfg.image_size, cfg.image_size)
        t0 = time.perf_counter()
        xa, ya = dataset_images(cfg.dataset, "train", hw, n, cfg.resize)
        xb, yb = dataset_images(cfg.dataset, "test", hw, n, cfg.resize)
        fa, la = extract(ext, xa, 500)
        fb, lb = extract(ext, xb, 500)
        is_m, is_s = inception_score(la)
        out = {"what": f"domain metrics, real {cfg.dataset} train ({len(xa)}) vs test ({len(xb)})",
               "domain_fid": fid_from_features(fa, fb), "domain_is": is_m, "domain_is_std": is_s,
               **precision_recall(fa, fb), "class_acc_train_subset": class_conditional_accuracy(la, ya),
               "classifier_test_acc": ext.info["test_acc"], "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
