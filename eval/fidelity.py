"""FID / IS / precision-recall from features, feature extractors, sample files, reference statistics.

Metrics are computed from features with torch-fidelity's own functions (``fid_features_to_statistics``,
``fid_statistics_to_metric``, ``isc_features_to_metric``, ``prc_features_to_metric``), so numbers equal
``torch_fidelity.calculate_metrics`` on the same features, while we control batching, devices, the
``.npz`` input format and the reference-statistics cache (keyed by reference + extractor + N).

Images travel as uint8 NHWC numpy arrays (the ADM/``arr_0`` convention) and enter extractors as
uint8 NCHW tensors (torch-fidelity's convention).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

IMG_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".jfif"}
CACHE_VERSION = 1


def emit_json(out: dict, path: str | Path | None = None) -> None:
    """What every eval CLI does with its result: print it as JSON, and write it to ``path`` if given."""
    text = json.dumps(out, indent=1)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")


class EvalError(ValueError):
    """Bad evaluation input (file, key, shape, missing weights), with what was expected."""


def cache_dir(override: str = "") -> Path:
    d = Path(override or os.environ.get("GROUPGEN_CACHE", "") or Path.home() / ".cache" / "groupgen")
    d.mkdir(parents=True, exist_ok=True)
    return d


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def file_hash(path: str | Path, n: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


# ----------------------------------------------------------------------------------------------
# Inception weights: explicit path > $GROUPGEN_INCEPTION_WEIGHTS > torch hub cache (where
# torch-fidelity itself would download them). Never downloads.

def inception_url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def inception_hub_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / inception_url().rsplit("/", 1)[-1]


def resolve_inception_weights(path: str = "") -> Path:
    cands = [("inception_weights", path), ("$GROUPGEN_INCEPTION_WEIGHTS", os.environ.get("GROUPGEN_INCEPTION_WEIGHTS", ""))]
    for where, p in cands:
        if p:
            if not Path(p).is_file():
                raise EvalError(f"Inception weights file {p!r} (from {where}) does not exist")
            return Path(p)
    hub = inception_hub_path()
    if hub.is_file():
        return hub
    raise EvalError(
        "Inception-v3 FID weights not found and nothing is downloaded at run time. Provide them by one of:\n"
        f"  1. download {inception_url()}\n"
        f"     and place it at {hub}  (torch-fidelity's cache; $TORCH_HOME moves it), or\n"
        "  2. pass inception_weights=/path/to/weights-inception-2015-12-05-6726825d.pth, or\n"
        "  3. export GROUPGEN_INCEPTION_WEIGHTS=/path/to/that/file.\n"
        "For small datasets without Inception weights use extractor=domain.")


# ----------------------------------------------------------------------------------------------
# Extractors: a name (part of every cache key) and __call__(uint8 [B,3,H,W]) -> (features, logits).

class Extractor:
    name = "base"
    feature_dim = 0

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class InceptionExtractor(Extractor):
    """torch-fidelity's ``inception-v3-compat``: ``2048`` pool features (FID/PR), ``logits_unbiased`` (IS)."""

    feature_dim = 2048

    def __init__(self, weights: str = "", device: torch.device = torch.device("cpu")):
        super().__init__(device)
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = resolve_inception_weights(weights)
        try:  # torch-fidelity loads with weights_only=False; refuse anything that is not plain tensors first
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise EvalError(f"Inception weights {path}: not a plain state dict ({type(e).__name__}: {e})") from None
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(path)).to(device)
        self.name = f"inception-v3-compat-{file_hash(path)}"

    @torch.no_grad()
    def __call__(self, x):
        f, logits = self.net(x.to(self.device))
        return f.float().cpu(), logits.float().cpu()


def build_extractor(kind: str, device: torch.device, inception_weights: str = "", domain_cfg=None,
                    cache: str = "") -> Extractor:
    if kind == "inception":
        return InceptionExtractor(inception_weights, device)
    if kind == "domain":
        from .domain import DomainConfig, DomainExtractor

        return DomainExtractor(domain_cfg or DomainConfig(), device, cache=cache)
    raise EvalError(f"extractor must be 'inception' or 'domain', got {kind!r}")


def extract(extractor: Extractor, images: np.ndarray, batch_size: int = 100,
            progress_desc: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NHWC images -> (features [N,D], logits [N,C]) float32 on the CPU."""
    from groupgen.runs import progress

    feats, logits = [], []
    starts = range(0, len(images), batch_size)
    for a in progress(starts, total=len(starts), desc=progress_desc or f"features ({extractor.name})"):
        x = torch.from_numpy(np.ascontiguousarray(images[a: a + batch_size])).permute(0, 3, 1, 2)
        f, lg = extractor(x)
        feats.append(f)
        logits.append(lg)
    return torch.cat(feats), torch.cat(logits)


# ----------------------------------------------------------------------------------------------
# Metrics from features (torch-fidelity's formulas; float64 so that stats from any source compare).

def fid_stats(features: torch.Tensor) -> dict[str, np.ndarray]:
    from torch_fidelity.metric_fid import fid_features_to_statistics

    if features.dim() != 2 or len(features) < 2:
        raise EvalError(f"FID needs features [N>=2, D], got {list(features.shape)}")
    s = fid_features_to_statistics(features.detach().cpu().double())
    return {"mu": np.asarray(s["mu"], np.float64), "sigma": np.atleast_2d(np.asarray(s["sigma"], np.float64))}


def fid_from_stats(s1: dict, s2: dict) -> float:
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    a = {k: np.asarray(s1[k], np.float64) for k in ("mu", "sigma")}
    b = {k: np.asarray(s2[k], np.float64) for k in ("mu", "sigma")}
    if a["mu"].shape != b["mu"].shape or a["sigma"].shape != b["sigma"].shape:
        raise EvalError(f"FID statistics disagree in dimension: mu {a['mu'].shape} vs {b['mu'].shape} "
                        f"(reference statistics from another feature extractor?)")
    return float(fid_statistics_to_metric(a, b, verbose=False)["frechet_inception_distance"])


def fid_from_features(f1: torch.Tensor, f2: torch.Tensor) -> float:
    return fid_from_stats(fid_stats(f1), fid_stats(f2))


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    from torch_fidelity.metric_isc import isc_features_to_metric

    splits = max(1, min(splits, len(logits)))
    out = isc_features_to_metric(logits.detach().cpu(), splits=splits, shuffle=True, rng_seed=seed)
    return out["inception_score_mean"], out["inception_score_std"]


def precision_recall(gen: torch.Tensor, real: torch.Tensor, k: int = 3) -> dict[str, float]:
    """Kynkäänniemi et al. k-NN precision/recall (torch-fidelity's implementation); gen first."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    if min(len(gen), len(real)) <= k:
        raise EvalError(f"precision/recall with k={k} needs more than {k} samples per side, "
                        f"got {len(gen)} generated and {len(real)} real")
    return prc_features_to_metric(gen.float().cpu(), real.float().cpu(), prc_neighborhood=k,
                                  prc_batch_size=10000, save_cpu_ram=False, verbose=False)


# ----------------------------------------------------------------------------------------------
# Inputs.

def load_samples_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``arr_0`` uint8 [N,H,W,3] (grey [N,H,W] or [N,H,W,1] is replicated) and optional ``labels`` [N]."""
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"samples file {str(p)!r} does not exist")
    try:
        z = np.load(p, allow_pickle=False)
    except Exception as e:
        raise EvalError(f"{p}: not a readable .npz ({type(e).__name__}: {e})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise EvalError(f"{p}: expected an .npz archive with key 'arr_0', got a single .npy array")
    with z:
        if "arr_0" not in z.files:
            raise EvalError(f"{p}: no 'arr_0' key (images uint8 [N,H,W,3]); keys are {z.files}")
        try:
            x = z["arr_0"]
            labels = z["labels"] if "labels" in z.files else None
        except ValueError as e:  # object arrays need pickle: refused
            raise EvalError(f"{p}: {e}") from None
    if x.dtype != np.uint8:
        raise EvalError(f"{p}: arr_0 must be uint8 in [0,255], got dtype {x.dtype}")
    if x.ndim == 3:
        if x.shape[-1] <= 4:   # one [H,W,C] image, not a batch of grey images only <= 4 px wide
            raise EvalError(f"{p}: arr_0 of shape {list(x.shape)} looks like one [H,W,C] image; expected "
                            f"a batch [N,H,W,3] (or grey [N,H,W]), e.g. arr[None] for a single image")
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise EvalError(f"{p}: arr_0 must be [N,H,W,3] (NHWC), got shape {list(x.shape)}")
    if x.shape[0] == 0:
        raise EvalError(f"{p}: arr_0 holds no images")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if labels is not None:
        if labels.dtype.kind not in "iu" or labels.shape != (x.shape[0],):
            raise EvalError(f"{p}: labels must be integers of shape [{x.shape[0]}], got {labels.dtype} "
                            f"{list(labels.shape)}")
        labels = labels.astype(np.int64)
    return x, labels


def save_samples_npz(path: str | Path, images: np.ndarray, labels: np.ndarray | None = None) -> None:
    arrays = {"arr_0": np.asarray(images, np.uint8)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, np.int64)
    np.savez(path, **arrays)


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """[-1,1] float [N,C,H,W] -> uint8 [N,H,W,3] (grey replicated), rounding like the sampler."""
    x = ((x.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def _center_resize(im, hw: tuple[int, int]):
    """ADM-style: box-halve while >= 2x, bicubic to cover, centre crop."""
    from PIL import Image

    h, w = hw
    while min(im.size[0] / w, im.size[1] / h) >= 2:
        im = im.resize((im.size[0] // 2, im.size[1] // 2), Image.BOX)
    s = max(w / im.size[0], h / im.size[1])
    im = im.resize((max(w, round(im.size[0] * s)), max(h, round(im.size[1] * s))), Image.BICUBIC)
    left, top = (im.size[0] - w) // 2, (im.size[1] - h) // 2
    return im.crop((left, top, left + w, top + h))


def seeded_subset(n_total: int, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded random ``n`` of ``n_total`` (all when n is 0 or >= n_total). A
    prefix would be biased whenever a file is ordered (e.g. samples written class after class)."""
    if n <= 0 or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, n, replace=False))


def load_image_folder(root: str | Path, hw: tuple[int, int], n: int = 0) -> np.ndarray:
    from PIL import Image

    files = sorted(f for f in Path(root).rglob("*") if f.suffix.lower() in IMG_EXTS)
    if not files:
        raise EvalError(f"reference folder {str(root)!r} holds no images ({sorted(IMG_EXTS)})")
    idx = seeded_subset(len(files), n)
    out = np.empty((len(idx), hw[0], hw[1], 3), np.uint8)
    for i, j in enumerate(idx):
        try:
            with Image.open(files[j]) as im:
                im = im.convert("RGB")
        except Exception as e:
            raise EvalError(f"cannot read reference image {files[j]}: {type(e).__name__}: {e}") from None
        if im.size != (hw[1], hw[0]):
            im = _center_resize(im, hw)
        out[i] = np.asarray(im, np.uint8)
    return out


def dataset_images(name: str, split: str, hw: tuple[int, int], n: int = 0,
                   resize: str = "pad", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Real images of a named dataset (``fmnist``/``digits``) at the samples' size, uint8 NHWC: a seeded
    subset of ``n`` (all when 0)."""
    from groupgen.data import DataConfig, build_dataset

    if hw[0] != hw[1]:
        raise EvalError(f"dataset reference {name!r} needs square samples, got {hw}")
    ds = build_dataset(DataConfig(name=name, image_size=hw[0], channels=1, resize=resize), split)
    idx = seeded_subset(len(ds), n, seed)
    x, y = ds.batch(idx)
    return to_uint8_nhwc(x), y.numpy()


def parse_ref(ref: str, default_split: str) -> tuple[str, str, str]:
    """-> (kind, what, split): kind in npz|folder|dataset."""
    if ref.endswith(".npz"):
        return "npz", ref, ""
    if Path(ref).is_dir():
        return "folder", ref, ""
    name, _, split = ref.partition(":")
    if name in ("fmnist", "digits"):
        split = split or default_split
        if split not in ("train", "test"):
            raise EvalError(f"reference {ref!r}: split must be train or test, got {split!r}")
        return "dataset", name, split
    raise EvalError(f"reference {ref!r} is not an .npz file, an existing image folder, or a dataset name "
                    f"(fmnist[:test|:train], digits[:test|:train])")


def _ref_identity(kind: str, what: str, split: str) -> dict:
    if kind == "dataset":
        return {"dataset": what, "split": split}
    p = Path(what).resolve()
    if kind == "npz":
        if not p.is_file():
            raise EvalError(f"reference file {str(p)!r} does not exist")
        st = p.stat()
        return {"npz": str(p), "size": st.st_size, "mtime": st.st_mtime_ns}
    files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMG_EXTS)
    return {"folder": str(p), "files": len(files), "mtime": max((f.stat().st_mtime_ns for f in files), default=0)}


def reference_stats(ref: str, extractor: Extractor, hw: tuple[int, int], n: int = 0, split: str = "test",
                    pr_max: int = 10000, batch_size: int = 100, cache: str = "", resize: str = "pad") -> dict:
    """FID statistics (+ up to ``pr_max`` features for precision/recall) of a reference, cached.

    An ADM reference ``.npz`` contributes its ``mu``/``sigma`` when their dimension matches the
    extractor (Inception pool features), and its ``arr_0`` images for precision/recall (or for the
    statistics themselves when ``mu``/``sigma`` are absent or from another extractor).
    """
    kind, what, split = parse_ref(ref, split)
    key = {"v": CACHE_VERSION, "ref": _ref_identity(kind, what, split), "extractor": extractor.name,
           "n": n, "hw": list(hw), "pr_max": pr_max, "resize": resize if kind == "dataset" else ""}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    cfile = cache_dir(cache) / "refstats" / f"{digest}.npz"
    if cfile.is_file():
        with np.load(cfile, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
        out["pr_features"] = torch.from_numpy(out["pr_features"]) if out["pr_features"].size else None
        return {**out, "n": int(out["n"]), "cached": str(cfile)}

    mu = sigma = None
    images = None
    if kind == "npz":
        with np.load(what, allow_pickle=False) as z:
            if "mu" in z.files and "sigma" in z.files and z["mu"].shape == (extractor.feature_dim,):
                mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
            if "arr_0" in z.files:
                images = load_samples_npz(what)[0]
                images = images[seeded_subset(len(images), n)]
        if mu is None and images is None:
            raise EvalError(f"reference {what}: needs 'mu'/'sigma' of dimension {extractor.feature_dim} "
                            f"(for {extractor.name}) or 'arr_0' images")
    elif kind == "folder":
        images = load_image_folder(what, hw, n)
    else:
        images = dataset_images(what, split, hw, n, resize)[0]

    pr_feats = None
    count = 0
    if images is not None:
        if images.shape[1:3] != tuple(hw):
            images = np.stack([np.asarray(_center_resize(_pil(im), hw)) for im in images])
        feats, _ = extract(extractor, images, batch_size, progress_desc="reference features")
        count = len(feats)
        if mu is None:
            s = fid_stats(feats)
            mu, sigma = s["mu"], s["sigma"]
        pr_feats = feats[torch.from_numpy(seeded_subset(len(feats), pr_max, seed=1))]
    cfile.parent.mkdir(parents=True, exist_ok=True)
    tmp = cfile.with_name(f".{cfile.stem}.{os.getpid()}.npz")
    np.savez(tmp, mu=mu, sigma=sigma, n=np.int64(count),
             pr_features=pr_feats.numpy() if pr_feats is not None else np.zeros((0,), np.float32))
    os.replace(tmp, cfile)
    return {"mu": mu, "sigma": sigma, "pr_features": pr_feats, "n": count, "cached": ""}


def _pil(arr: np.ndarray):
    from PIL import Image

    return Image.fromarray(arr)
