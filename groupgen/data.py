"""Datasets behind one interface: items are ``(image [C,H,W] float in [-1,1], label int)``.

``fmnist``      Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (idx .gz files).
``digits``      scikit-learn's bundled 8x8 digits.
``imagefolder`` an ImageNet-style folder (one sub-folder per class).
"""
from __future__ import annotations

import gzip
import json
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .checkpoint import atomic_write_text

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                  "Bag", "Ankle boot"]
IMG_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".jfif"}


class DataError(ValueError):
    pass


@dataclass
class DataConfig:
    name: str = "fmnist"            # fmnist | digits | imagefolder
    root: str = ""                  # imagefolder root (class sub-folders); fmnist dir override
    image_size: int = 32
    channels: int = 1               # 1 = grey, 3 = RGB (grey replicated)
    resize: str = "pad"             # fmnist/digits: "pad" (28->32 zero border) or "resize" (bilinear)
    limit: int = 0                  # use only N images (0 = all): fmnist/digits the first N,
                                    # imagefolder N spread over the classes
    skip_corrupt: bool = False      # imagefolder: drop unreadable files (listed) instead of failing
    crop_min: float = 0.8           # imagefolder training: random crop scale range [crop_min, 1]
    hflip: bool = True              # imagefolder training: random horizontal flip

    def validate(self):
        if self.name not in ("fmnist", "digits", "imagefolder"):
            raise DataError(f"data.name must be fmnist, digits or imagefolder, got {self.name!r}")
        if self.channels not in (1, 3):
            raise DataError(f"data.channels must be 1 or 3, got {self.channels}")
        if self.resize not in ("pad", "resize"):
            raise DataError(f"data.resize must be 'pad' or 'resize', got {self.resize!r}")
        if self.image_size < 8:
            raise DataError(f"data.image_size must be >= 8, got {self.image_size}")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic, = struct.unpack(">I", raw[:4])
    ndim = magic & 0xFF
    if (magic >> 8) != 0x08:
        raise DataError(f"{path}: not an unsigned-byte idx file (magic {magic:#x})")
    dims = struct.unpack(">" + "I" * ndim, raw[4: 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated idx file ({data.size} bytes of {int(np.prod(dims))})")
    return data.reshape(dims)


def fmnist_arrays(split: str, root: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Raw Fashion-MNIST: uint8 images [N,28,28] and int64 labels [N]."""
    d = Path(root or os.environ.get("GROUPGEN_FMNIST_DIR", FMNIST_DIR))
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DataError(f"fmnist split must be 'train' or 'test', got {split!r}")
    img, lab = d / f"{prefix}-images-idx3-ubyte.gz", d / f"{prefix}-labels-idx1-ubyte.gz"
    for f in (img, lab):
        if not f.is_file():
            raise DataError(f"Fashion-MNIST file {f} not found. Install the Debian package: "
                            f"sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist")
    x, y = _read_idx(img), _read_idx(lab).astype(np.int64)
    if len(x) != len(y):
        raise DataError(f"{img} has {len(x)} images but {lab} has {len(y)} labels")
    return x, y


def _to_tensor_images(u8: np.ndarray, cfg: DataConfig) -> torch.Tensor:
    """uint8 [N,h,w] grey -> float [N,C,S,S] in [-1,1], padded or resized to cfg.image_size."""
    x = torch.from_numpy(np.array(u8, copy=True)).float().div_(127.5).sub_(1.0).unsqueeze(1)
    s, h = cfg.image_size, x.shape[-1]
    if cfg.resize == "pad" and s >= h:
        lo = (s - h) // 2
        x = F.pad(x, (lo, s - h - lo, lo, s - h - lo), value=-1.0)
    elif s != h:
        x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=s < h)
    if cfg.channels == 3:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


class TensorImageDataset(Dataset):
    """A whole small dataset held as one tensor (Fashion-MNIST at 32x32 grey is 245 MB fp32)."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, class_names: list[str]):
        if len(images) == 0:
            raise DataError("dataset is empty")
        self.images, self.labels = images, torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.class_names = list(class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])

    def batch(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectorised gather for trainers: no per-item Python loop."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        return self.images[idx], self.labels[idx]


def _limit(x, y, n):
    return (x[:n], y[:n]) if n and n > 0 else (x, y)


def build_dataset(cfg: DataConfig, split: str = "train", train: bool = False) -> Dataset:
    cfg.validate()
    if cfg.name == "fmnist":
        x, y = _limit(*fmnist_arrays(split, cfg.root), cfg.limit)
        return TensorImageDataset(_to_tensor_images(x, cfg), y, FMNIST_CLASSES)
    if cfg.name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
        y = d.target.astype(np.int64)
        # a fixed 80/20 split: sklearn ships one array, so the split has to be ours
        rng = np.random.default_rng(0)
        perm = rng.permutation(len(x))
        cut = int(0.8 * len(x))
        sel = perm[:cut] if split == "train" else perm[cut:]
        x, y = _limit(x[sel], y[sel], cfg.limit)
        return TensorImageDataset(_to_tensor_images(x, DataConfig(**{**cfg.__dict__, "resize": "resize"})), y,
                                  [str(i) for i in range(10)])
    return ImageFolderDataset(cfg, split, train)


SPLIT_DIRS = ("train", "val", "test")


def _split_root(base: Path, split: str) -> Path:
    """``base/<split>``; the "test" split reads ``val`` where there is no ``test`` (ImageNet's labelled
    held-out split); ``base`` itself when it has no split folders (one folder for every split)."""
    present = [s for s in SPLIT_DIRS if (base / s).is_dir()]
    if not present:
        return base
    for s in (split, "val") if split == "test" else (split,):
        if s in present:
            return base / s
    raise DataError(f"imagefolder {base}: no {split!r} split folder; it has split folders {present}")


def _spread_over_classes(files: list[tuple[Path, int]], n: int, seed: int = 0) -> list[tuple[Path, int]]:
    """``n`` files taking the classes in turn (a seeded random file of each), in the original order: a
    class-sorted list cut at ``n`` would hold the first classes only."""
    seen: dict[int, int] = {}
    keyed = []
    for i in np.random.default_rng(seed).permutation(len(files)):
        c = files[i][1]
        seen[c] = seen.get(c, 0) + 1
        keyed.append((seen[c], c, int(i)))
    return [files[i] for i in sorted(i for *_, i in sorted(keyed)[:n])]


class ImageFolderDataset(Dataset):
    """``root/<split>/<class>/*.jpg`` (or ``root/<class>/*.jpg``). Training: random-resized crop
    (scale crop_min..1) + flip; evaluation: ADM-style centre crop (resize shorter side, then crop)."""

    def __init__(self, cfg: DataConfig, split: str, train: bool):
        base = Path(cfg.root)
        if not base.is_dir():
            raise DataError(f"imagefolder root {str(base)!r} is not a directory (set data.root=...)")
        root = _split_root(base, split)
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not classes:
            raise DataError(f"imagefolder {root}: no class sub-folders found")
        self.files: list[tuple[Path, int]] = []
        for ci, c in enumerate(classes):
            for f in sorted((root / c).rglob("*")):
                if f.suffix.lower() in IMG_EXTS:
                    self.files.append((f, ci))
        if not self.files:
            raise DataError(f"imagefolder {root}: no images with extensions {sorted(IMG_EXTS)}")
        _refuse_empty_classes(root, classes, self.files, "have no images with extensions " + str(sorted(IMG_EXTS)))
        if cfg.limit and cfg.limit > 0:
            self.files = _spread_over_classes(self.files, cfg.limit)
        self.cfg, self.train, self.class_names = cfg, train, classes
        self.skipped: list[str] = []
        if cfg.skip_corrupt:
            self._drop_unreadable(root)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.files)

    def _drop_unreadable(self, root: Path) -> None:
        """Decode every file once (threads: Pillow decodes without the GIL) and drop the unreadable ones
        with their labels, so a sample is skipped, never replaced by another file."""
        from concurrent.futures import ThreadPoolExecutor

        def readable(item):
            try:
                self._load(item[0])
                return True
            except DataError:
                return False

        with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
            ok = list(pool.map(readable, self.files))
        self.skipped = [str(f) for (f, _), good in zip(self.files, ok) if not good]
        self.files = [item for item, good in zip(self.files, ok) if good]
        if self.skipped:
            print(f"imagefolder {root}: data.skip_corrupt=true dropped {len(self.skipped)} unreadable files: "
                  f"{', '.join(self.skipped[:10])}{' ...' if len(self.skipped) > 10 else ''}", file=sys.stderr)
        if not self.files:
            raise DataError(f"imagefolder {root}: no readable image among {len(self.skipped)} files")
        if not (self.cfg.limit and self.cfg.limit > 0):
            _refuse_empty_classes(root, self.class_names, self.files, "have no readable image left (skip_corrupt)")

    def _load(self, path: Path):
        from PIL import Image

        try:
            with Image.open(path) as im:
                im.load()
                return _to_rgb(im)
        except Exception as e:
            hint = "" if self.cfg.skip_corrupt else "; data.skip_corrupt=true drops unreadable files instead"
            raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}{hint}") from None

    def _crop(self, im):
        from PIL import Image

        s = self.cfg.image_size
        if self.train:
            w, h = im.size
            side = min(w, h) * float(np.sqrt(np.random.uniform(self.cfg.crop_min, 1.0)))
            x0 = np.random.uniform(0, w - side)
            y0 = np.random.uniform(0, h - side)
            im = im.resize((s, s), Image.BICUBIC, box=(x0, y0, x0 + side, y0 + side))
            if self.cfg.hflip and np.random.rand() < 0.5:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            return im
        # ADM centre crop: box-downsample while the image is >= 2x, then bicubic, then crop
        while min(im.size) >= 2 * s:
            im = im.resize(tuple(x // 2 for x in im.size), Image.BOX)
        scale = s / min(im.size)
        im = im.resize(tuple(round(x * scale) for x in im.size), Image.BICUBIC)
        w, h = im.size
        l, t = (w - s) // 2, (h - s) // 2
        return im.crop((l, t, l + s, t + s))

    def __getitem__(self, i):
        path, label = self.files[i]
        im = self._load(path)   # unreadable files were dropped at construction under skip_corrupt
        arr = np.asarray(self._crop(im), dtype=np.uint8)
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        if self.cfg.channels == 1:
            x = x.mean(0, keepdim=True)
        return x, label


def _refuse_empty_classes(root: Path, classes: list[str], files: list[tuple[Path, int]], why: str) -> None:
    """A class without images would be a label the model never sees (and a class in every later count)."""
    have = {c for _, c in files}
    empty = [c for i, c in enumerate(classes) if i not in have]
    if empty:
        raise DataError(f"imagefolder {root}: class folders {empty[:20]}{' ...' if len(empty) > 20 else ''} {why}; "
                        f"remove them or add images")


def _to_rgb(im):
    """Any Pillow image as 8-bit RGB. 16/32-bit grey (``I;16*``, ``I``) is scaled to 0..255 first:
    Pillow's own convert clips it at 255, so a 16-bit image would come out almost white."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.float64)
        im = Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":   # float images: taken as 0..1
        a = np.asarray(im).astype(np.float64)
        im = Image.fromarray(np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8), "L")
    # grey, palette, CMYK, RGBA (alpha dropped over white would be a choice; we drop it)
    return im.convert("RGB")


def write_skipped(ds: Dataset, out: str | Path) -> None:
    """Write the files ``data.skip_corrupt`` dropped to ``out/skipped_files.json`` (nothing if none)."""
    skipped = getattr(ds, "skipped", None)
    if skipped:
        atomic_write_text(Path(out) / "skipped_files.json", json.dumps(
            {"count": len(skipped), "root": str(getattr(ds.cfg, "root", "")), "files": skipped}, indent=1))


def loader_batches(ds: Dataset, indices, batch_size: int):
    """Yield (images, labels) batches for ``indices`` in order: vectorised for in-memory datasets."""
    indices = list(indices)
    for a in range(0, len(indices), batch_size):
        idx = indices[a: a + batch_size]
        if hasattr(ds, "batch"):
            yield ds.batch(idx)
        else:
            items = [ds[i] for i in idx]
            yield torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)
