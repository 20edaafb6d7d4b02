"""The one checkpoint format: a directory written atomically.

    <root>/step_00001000/
        model.safetensors      # each named tensor group as its own safetensors file
        ema.safetensors ...
        meta.json              # config, layout, step, anything JSON-serialisable
        state.pt               # optimizer / scheduler / RNG state, read with weights_only=True
    <root>/latest              # text file naming the newest complete step directory

A checkpoint is written to a temporary directory, fsynced and renamed into place; only then is
``latest`` replaced (also by rename). A crash at any point leaves the previous checkpoint and a valid
``latest``. Retention never deletes the directory that ``latest`` names.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .diskspace import as_disk_full


class CheckpointError(RuntimeError):
    pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0)   # the only way to read it; set straight back
    os.umask(mask)
    return mask


def _atomic_replace(path: Path, fill) -> None:
    """``fill(tmp)`` writes a temporary file beside ``path``; it is fsynced and renamed over ``path``,
    so ``path`` is old or new, never torn; the temporary file is removed on any failure."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        # mkstemp makes 0600 files: give the mode a plain open() would (0666 less the umask), so on
        # a cluster's shared filesystem others can read samples, metrics and store headers
        os.chmod(tmp, 0o666 & ~_umask())
        fill(tmp)
        _fsync_file(Path(tmp))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_replace(Path(path), lambda tmp: Path(tmp).write_text(text))


def atomic_copyfile(src: str | Path, dst: str | Path) -> None:
    """Copy ``src`` to ``dst`` atomically (a temporary copy, then a rename)."""
    _atomic_replace(Path(dst), lambda tmp: shutil.copyfile(src, tmp))


def _plain(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage and non-contiguous tensors: store independent copies.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def write_checkpoint_dir(path: str | Path, tensors: dict[str, dict[str, torch.Tensor]], meta: dict,
                         state: dict | None = None) -> Path:
    """Write one checkpoint directory atomically at ``path`` (replacing nothing that exists)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tmp-{path.name}-"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())   # mkdtemp's 0700 would hide the checkpoint from the others
        for name, sd in tensors.items():
            f = tmp / f"{name}.safetensors"
            save_file(_plain(sd), str(f))
            _fsync_file(f)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
        _fsync_file(tmp / "meta.json")
        if state is not None:
            torch.save(state, tmp / "state.pt")
            _fsync_file(tmp / "state.pt")
        _fsync_dir(tmp)
        if path.exists():
            old = path.parent / f".old-{path.name}-{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        need = sum(t.numel() * t.element_size() for sd in tensors.values() for t in sd.values())
        full = as_disk_full(e, path.parent, 3 * need if state is not None else need, f"checkpoint {path.name}")
        if full is not None:   # torch.save on a full disk says only "iostream error" / "unexpected pos"
            raise full from e
        raise
    return path


def save_checkpoint(root: str | Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], meta: dict,
                    state: dict | None = None, keep_last: int = 3) -> Path:
    """Save ``step_<step>`` under ``root``, point ``latest`` at it, prune to ``keep_last``."""
    root = Path(root)
    # half-written directories of a process killed mid-save (a clean failure removes its own): one
    # writer per root, so any present now are dead
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    path = write_checkpoint_dir(root / f"step_{step:08d}", tensors, dict(meta, step=step), state)
    atomic_write_text(root / "latest", path.name + "\n")
    if keep_last > 0:
        steps = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.startswith("."))
        for old in steps[:-keep_last]:
            if old.name != path.name:
                shutil.rmtree(old, ignore_errors=True)
    return path


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (following ``latest``), or None."""
    root = Path(root)
    ptr = root / "latest"
    if ptr.is_file():
        p = root / ptr.read_text().strip()
        if (p / "meta.json").is_file():
            return p
    # ``latest`` missing or stale: fall back to the newest directory that has its meta written last.
    cands = sorted(p for p in root.glob("step_*") if (p / "meta.json").is_file())
    return cands[-1] if cands else None


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory or a run/checkpoint root holding ``latest``."""
    p = Path(path)
    if (p / "meta.json").is_file():
        return p
    for root in (p, p / "checkpoints"):
        if root.is_dir():
            found = latest_checkpoint(root)
            if found is not None:
                return found
    raise CheckpointError(f"no checkpoint at {str(p)!r} (expected a directory with meta.json, "
                          f"or a folder whose 'latest' file names one)")


def load_meta(path: str | Path) -> dict:
    p = resolve_checkpoint(path)
    try:
        return json.loads((p / "meta.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p / 'meta.json'} is not valid JSON: {e}") from None


def load_tensors(path: str | Path, name: str = "model", finite: bool = True) -> dict[str, torch.Tensor]:
    """One tensor group of a checkpoint; non-finite weights are refused unless ``finite=False``."""
    p = resolve_checkpoint(path)
    f = p / f"{name}.safetensors"
    if not f.is_file():
        have = sorted(x.stem for x in p.glob("*.safetensors"))
        raise CheckpointError(f"{p}: no tensor file {f.name!r}; have {have}")
    try:
        sd = load_file(str(f))
    except (SafetensorError, OSError) as e:   # truncated or not safetensors: its message names no file
        raise CheckpointError(f"{f}: cannot read the weights ({type(e).__name__}: {e}); the file is damaged "
                              f"or truncated") from None
    if finite:
        bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise CheckpointError(f"{f}: {len(bad)} of {len(sd)} tensors hold NaN or Inf (e.g. {bad[:3]}); "
                                  f"refusing weights that would produce garbage")
    return sd


def load_state(path: str | Path) -> dict:
    """Trainer state; ``weights_only=True`` so a crafted pickle cannot run code."""
    p = resolve_checkpoint(path)
    f = p / "state.pt"
    if not f.is_file():
        return {}
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler refuses anything but tensors and plain containers
        raise CheckpointError(f"{f}: refused to load trainer state ({type(e).__name__}: {e})") from None


def checkpoint_hash(path: str | Path, name: str = "model") -> str:
    """sha256 (first 16 hex) of a checkpoint's weights file: names the exact weights used."""
    p = resolve_checkpoint(path)
    h = hashlib.sha256()
    with open(p / f"{name}.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    """Every RNG a trainer uses, as tensors and plain types (weights_only-loadable)."""
    import random

    import numpy as np

    np_state = np.random.get_state()
    st = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy_keys": torch.from_numpy(np_state[1].astype("int64")),
        "numpy_pos": int(np_state[2]),
        # the Box-Muller spare: standard_normal() draws pairs and returns the cached one next
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(st["torch"])
    random.setstate((st["python_version"], tuple(st["python"]), st["python_gauss"]))
    np.random.set_state(("MT19937", st["numpy_keys"].numpy().astype("uint32"), st["numpy_pos"],
                         st.get("numpy_has_gauss", 0), st.get("numpy_gauss", 0.0)))  # .get: older checkpoints
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
