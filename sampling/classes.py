"""Which classes to sample, and their names.

``classes`` in the sampling config is one of
  * ``"balanced"``: every class, the samples spread evenly (class-major order, for grids and FID),
  * ``"random"``: labels drawn uniformly from all classes (LlamaGen's FID protocol), seeded,
  * an explicit list of class ids and/or names (``[207, "tench"]`` or ``"tench,goldfish"``).
Everything is resolved and checked here before any model runs.
"""
from __future__ import annotations

import difflib
from pathlib import Path

import numpy as np

_BUILTIN = Path(__file__).parent / "class_names"


class ClassError(ValueError):
    pass


def builtin_names(name: str) -> list[str]:
    """A known class-name list: ``imagenet`` (1000, standard index order: torchvision's own list,
    which ships offline with the package and has 1000 distinct names) or ``fmnist`` (10, bundled)."""
    if name == "imagenet":
        from torchvision.models import ResNet50_Weights   # metadata only: no weights are loaded
        return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    f = _BUILTIN / f"{name}.txt"
    if not f.is_file():
        have = sorted({"imagenet", *(p.stem for p in _BUILTIN.glob("*.txt"))})
        raise ClassError(f"no bundled class-name list {name!r}; have {have} (or give a path to a .txt file)")
    return [ln.strip() for ln in f.read_text().splitlines() if ln.strip()]


def class_names_for(num_classes: int, from_ckpt: list[str] | None, override: str = "") -> list[str]:
    """Names for ``num_classes`` classes: an override (bundled list or .txt path), the checkpoint's,
    ImageNet's when there are 1000 classes and none were saved, else the ids as strings."""
    if override:
        p = Path(override)
        names = ([ln.strip() for ln in p.read_text().splitlines() if ln.strip()] if p.is_file()
                 else builtin_names(override))
    elif from_ckpt:
        names = list(from_ckpt)
    elif num_classes == 1000:
        names = builtin_names("imagenet")
    else:
        names = [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ClassError(f"class names: got {len(names)} names ({override or 'from checkpoint'}) but the "
                         f"model has num_classes={num_classes}")
    return names


def _lookup(token, names: list[str], num_classes: int) -> int:
    if isinstance(token, (int, np.integer)) and not isinstance(token, bool):
        cid = int(token)
    else:
        s = str(token).strip()
        if s.lstrip("-").isdigit():
            cid = int(s)
        else:
            low = [n.lower() for n in names]
            # exact case first: ImageNet has "Cardigan" (the corgi, 264) and "cardigan" (474)
            hits = [i for i, n in enumerate(names) if n == s] or [i for i, n in enumerate(low) if n == s.lower()]
            if len(hits) > 1:
                raise ClassError(f"class name {s!r} is ambiguous: ids {hits}; give the id instead")
            if not hits:
                close = difflib.get_close_matches(s.lower(), low, n=5, cutoff=0.5)
                hint = (f"closest: {', '.join(repr(names[low.index(c)]) + f' ({low.index(c)})' for c in close)}"
                        if close else f"{num_classes} classes, e.g. {names[:5]}")
                raise ClassError(f"unknown class name {s!r}; {hint}")
            return hits[0]
    if not 0 <= cid < num_classes:
        raise ClassError(f"class id {cid} out of range: the model has {num_classes} classes "
                         f"(ids 0..{num_classes - 1}; {num_classes} is the null class)")
    return cid


def resolve_classes(classes, names: list[str], num_classes: int) -> list[int] | str:
    """``"balanced"`` / ``"random"`` unchanged, or the list of explicit class ids (checked)."""
    if isinstance(classes, str):
        key = classes.strip()
        if key.lower() in ("balanced", "random", "all"):
            return "balanced" if key.lower() == "all" else key.lower()
        # A whole string that is a class name wins over splitting at commas.
        low = [n.lower() for n in names]
        tokens = [key] if key.lower() in low else [t for t in key.split(",") if t.strip()]
    else:
        tokens = list(classes)
    if not tokens:
        raise ClassError("classes: empty list; give ids/names, 'balanced' or 'random'")
    return [_lookup(t, names, num_classes) for t in tokens]


def sample_labels(selection: list[int] | str, num_classes: int, num_samples: int, per_class: int,
                  seed: int) -> np.ndarray:
    """The global label list ``[N]`` int64; identical for every process (depends on the seed only).

    ``num_samples > 0`` fixes N (spread over the classes); otherwise N = per_class * classes.
    """
    pool = list(range(num_classes)) if isinstance(selection, str) else list(selection)
    n = num_samples if num_samples > 0 else per_class * len(pool)
    if n <= 0:
        raise ClassError("nothing to sample: set num_samples > 0 or per_class > 0")
    if selection == "random":
        rng = np.random.default_rng([int(seed), 0x5EED])
        return rng.integers(0, num_classes, size=n).astype(np.int64)
    # Balanced over the pool, class-major: class pool[j] gets the slots i with i * len(pool) // n == j.
    slot = (np.arange(n) * len(pool)) // n
    return np.asarray(pool, dtype=np.int64)[slot]
