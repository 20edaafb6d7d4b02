"""The shards folder of a sampling run (``DIR/shards``): one atomic ``.npz`` file a chunk, the fingerprint
that keys a folder's chunks (a run resumes into it only with the same settings, checkpoint and tokenizer),
and waiting for the chunks other ranks write."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from groupgen.checkpoint import atomic_write_text
from groupgen.config import config_hash


class SamplingError(RuntimeError):
    """A sampling run that cannot go on as asked (bad settings, a foreign shards folder, missing chunks)."""


# Settings that only change how results are presented (not the samples): excluded from the
# fingerprint that guards resuming into an existing shards/ folder.
PRESENTATION = ("save_png", "grid_per_class", "grid_max_rows", "wait_timeout_s", "device",
                "allow_tokenizer_mismatch")   # the tokenizer's own hash is in the fingerprint


def chunk_path(out: Path, c: int) -> Path:
    """Chunk ``c``'s file (every rank agrees on it: the chunks are cut the same way everywhere)."""
    return out / "shards" / f"chunk_{c:05d}.npz"


def write_npz(path: Path, **arrays) -> None:
    """Write an .npz atomically: straight into a temp file in the same folder (no in-memory copy of
    the archive), fsync, then rename."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def chunk_ok(path: Path, labels: np.ndarray) -> bool:
    """A chunk file counts as done only if it loads and holds exactly the expected labels."""
    if not path.is_file():
        return False
    try:
        with np.load(path) as z:
            return (z["arr_0"].dtype == np.uint8 and z["arr_0"].shape[0] == len(labels)
                    and np.array_equal(z["labels"], labels))
    except Exception:
        return False


def canonical_settings(config: dict) -> dict:
    """The settings a shards folder is keyed by. Settings added after such folders were first
    written are left out where they hold their default meaning, so those folders still resume: the
    KV cache at the precision's own dtype ("auto" and that dtype are one setting, and folders from
    before the setting lack it) and the model's own weights (``weights=model``)."""
    d = {k: v for k, v in config.items() if k not in PRESENTATION}
    if d.get("kv_cache", "auto") in ("auto", d.get("precision", "fp32")):
        d.pop("kv_cache", None)
    if d.get("weights", "model") == "model":
        d.pop("weights", None)
    return d


def shards_key(config: dict, ckpt_hash, tokenizer_hash) -> str:
    return config_hash({"c": config, "a": ckpt_hash, "t": tokenizer_hash})


def claim_shards_dir(out: Path, fp: dict) -> None:
    """Create DIR/shards with our fingerprint, or check an existing one matches (safe resume)."""
    shards = out / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    f = shards / "fingerprint.json"
    if f.is_file():
        old = json.loads(f.read_text())
        # re-keyed from its settings: a folder written before canonical_settings existed stored the raw ones
        old_cfg = canonical_settings(old.get("config", {}))
        if shards_key(old_cfg, old.get("ckpt_hash"), old.get("tokenizer_hash")) != fp["key"]:
            diff = sorted(k for k in set(old_cfg) | set(fp["config"]) if old_cfg.get(k) != fp["config"].get(k))
            for k in ("ckpt_hash", "tokenizer_hash"):
                if old.get(k) != fp[k]:
                    diff.append(k)
            raise SamplingError(f"{shards} holds chunks from different settings (differ: {diff}); "
                                f"use another --out or remove {shards}")
    else:
        atomic_write_text(f, json.dumps(fp, indent=1, sort_keys=True))


def wait_for_chunks(out: Path, num_chunks: int, timeout_s: float) -> None:
    """Until every chunk file exists (other ranks write theirs), or SamplingError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [c for c in range(num_chunks) if not chunk_path(out, c).is_file()]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise SamplingError(f"{out / 'shards'}: {len(missing)} chunks still missing after {timeout_s:.0f} s "
                                f"(e.g. {missing[:5]}); rerun the same command to resume")
        time.sleep(0.5)
