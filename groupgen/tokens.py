"""The token store: a dataset's codes in one memory-mapped array, written in resumable chunks.

    DIR/codes.npy     [N, V, L, G]   smallest unsigned dtype that holds max(K)   (np.load mmap_mode="r")
    DIR/labels.npy    [N] int64
    DIR/header.json   layout, N, V, dtype, classes, tokenizer checkpoint + hash, views, complete flag
    DIR/done/<chunk>  one empty marker per finished chunk (so an interrupted encode resumes)

The header is validated against the arrays whenever a store is opened.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .checkpoint import atomic_write_text
from .diskspace import check_free, reserve, reserved_memmap
from .layout import LayoutError, TokenLayout


class TokenStoreError(ValueError):
    pass


class TokenStoreWriter:
    """Create (or reopen, to resume) a token store and fill it chunk by chunk."""

    def __init__(self, root: str | Path, layout: TokenLayout, n: int, views: int, num_classes: int,
                 chunk_size: int = 1024, meta: dict | None = None, class_names: list[str] | None = None):
        self.root = Path(root)
        self.layout, self.n, self.views, self.chunk_size = layout, n, views, chunk_size
        self.dtype = layout.code_dtype()
        header = {
            "format": "groupgen-token-store-v1", "layout": layout.to_dict(), "N": n, "V": views,
            "dtype": self.dtype.name, "num_classes": num_classes, "class_names": class_names or [],
            "chunk_size": chunk_size, "complete": False, **(meta or {}),
        }
        hfile = self.root / "header.json"
        if hfile.is_file():
            old = json.loads(hfile.read_text())
            diffs = [f"{k}: existing {old.get(k)!r} vs new {v!r}" for k, v in header.items()
                     if k != "complete" and old.get(k) != v]
            if diffs:
                raise TokenStoreError(f"{self.root}: an existing token store with a different header is in the "
                                      f"way ({'; '.join(diffs)}); remove it or write elsewhere")
            self.header = old
            for f in ("codes.npy", "labels.npy"):   # a store begun before stores were preallocated
                reserve(self.root / f, "token store")
            self.codes = np.load(self.root / "codes.npy", mmap_mode="r+")
            self.labels = np.load(self.root / "labels.npy", mmap_mode="r+")
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            check_free(self.root, n * views * layout.L * layout.G * self.dtype.itemsize + n * 8 + 4096,
                       "token store")
            (self.root / "done").mkdir(exist_ok=True)
            self.codes = reserved_memmap(self.root / "codes.npy", self.dtype, (n, views, layout.L, layout.G),
                                         "token store")
            self.labels = reserved_memmap(self.root / "labels.npy", np.int64, (n,), "token store")
            self.header = header
            atomic_write_text(hfile, json.dumps(header, indent=1))

    @property
    def num_chunks(self) -> int:
        return (self.n + self.chunk_size - 1) // self.chunk_size

    def chunk_range(self, ci: int) -> tuple[int, int]:
        return ci * self.chunk_size, min(self.n, (ci + 1) * self.chunk_size)

    def is_done(self, ci: int) -> bool:
        return (self.root / "done" / f"{ci:06d}").exists()

    def pending_chunks(self, rank: int = 0, world: int = 1) -> list[int]:
        return [c for c in range(rank, self.num_chunks, world) if not self.is_done(c)]

    def write_chunk(self, ci: int, codes: np.ndarray, labels: np.ndarray) -> None:
        a, b = self.chunk_range(ci)
        want = (b - a, self.views, self.layout.L, self.layout.G)
        if tuple(codes.shape) != want:
            raise TokenStoreError(f"chunk {ci}: codes shape {list(codes.shape)}, expected {list(want)}")
        self.layout.check_codes(codes, what=f"chunk {ci}")
        self.codes[a:b] = codes.astype(self.dtype)
        self.labels[a:b] = labels.astype(np.int64)
        self.codes.flush()
        self.labels.flush()
        # marker only after the data is flushed; it keeps the chunk's per-group maximum, so the
        # finished header can say what the store holds without a scan of every code
        hi = codes.reshape(-1, self.layout.G).max(0) if len(codes) else np.zeros(self.layout.G, np.int64)
        (self.root / "done" / f"{ci:06d}").write_text(json.dumps([int(v) for v in hi]))

    def finalize(self) -> None:
        missing = [c for c in range(self.num_chunks) if not self.is_done(c)]
        if missing:
            raise TokenStoreError(f"{self.root}: chunks {missing[:5]}... not written yet")
        self.header["code_max"] = [int(v) for v in np.max([self._chunk_max(c) for c in range(self.num_chunks)], 0)]
        self.header["codes_stamp"] = _stamp(self.root / "codes.npy")
        self.header["complete"] = True
        atomic_write_text(self.root / "header.json", json.dumps(self.header, indent=1))

    def _chunk_max(self, ci: int) -> np.ndarray:
        try:
            hi = json.loads((self.root / "done" / f"{ci:06d}").read_text())
            if isinstance(hi, list) and len(hi) == self.layout.G:
                return np.asarray(hi, dtype=np.int64)
        except (OSError, json.JSONDecodeError):
            pass
        a, b = self.chunk_range(ci)   # a marker from before maxima were kept: read the chunk once
        return np.asarray(self.codes[a:b].reshape(-1, self.layout.G).max(0) if b > a else np.zeros(self.layout.G),
                          dtype=np.int64)


def _stamp(path: Path) -> dict:
    """Size and modification time: a codes.npy written after the header (replaced, edited) is scanned."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


class TokenStore:
    """Read-only view of a finished token store; validates header against arrays on open."""

    def __init__(self, root: str | Path, require_complete: bool = True):
        self.root = Path(root)
        hfile = self.root / "header.json"
        if not hfile.is_file():
            raise TokenStoreError(f"{self.root}: not a token store (no header.json)")
        try:
            self.header = json.loads(hfile.read_text())
        except json.JSONDecodeError as e:
            raise TokenStoreError(f"{hfile}: invalid JSON ({e})") from None
        for key in ("layout", "N", "V", "dtype", "num_classes"):
            if key not in self.header:
                raise TokenStoreError(f"{hfile}: missing key {key!r}")
        if require_complete and not self.header.get("complete"):
            raise TokenStoreError(f"{self.root}: token store is incomplete (encoding was interrupted); "
                                  f"re-run the encode command to resume it")
        try:
            self.layout = TokenLayout.from_dict(self.header["layout"])
        except (LayoutError, TypeError) as e:
            raise TokenStoreError(f"{hfile}: bad layout: {e}") from None
        try:
            self.codes = np.load(self.root / "codes.npy", mmap_mode="r", allow_pickle=False)
            self.labels = np.load(self.root / "labels.npy", mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise TokenStoreError(f"{self.root}: cannot read codes.npy/labels.npy ({type(e).__name__}: {e})") from None
        n, v = int(self.header["N"]), int(self.header["V"])
        want = (n, v, self.layout.L, self.layout.G)
        if tuple(self.codes.shape) != want:
            raise TokenStoreError(f"{self.root}/codes.npy: shape {list(self.codes.shape)} does not match header "
                                  f"{list(want)}")
        if self.codes.dtype.name != self.header["dtype"]:
            raise TokenStoreError(f"{self.root}/codes.npy: dtype {self.codes.dtype} vs header {self.header['dtype']}")
        if tuple(self.labels.shape) != (n,) or self.labels.dtype != np.int64:
            raise TokenStoreError(f"{self.root}/labels.npy: expected int64 [{n}], got {self.labels.dtype} "
                                  f"{list(self.labels.shape)}")
        if n and (self.labels.min() < 0 or self.labels.max() >= self.header["num_classes"]):
            raise TokenStoreError(f"{self.root}/labels.npy: labels outside [0, {self.header['num_classes']})")
        # The writer kept each group's maximum (checked chunk by chunk as it wrote): no start-up scan,
        # which on every rank of a ten-crop ImageNet store would read 26 GB. Older stores are scanned.
        if n:
            hi = self.header.get("code_max")
            if not (isinstance(hi, list) and len(hi) == self.layout.G and all(isinstance(v, int) for v in hi)
                    and self.header.get("codes_stamp") == _stamp(self.root / "codes.npy")):
                hi = self.codes.reshape(-1, self.layout.G).max(0)   # older, or codes.npy rewritten since
            for g, k in enumerate(self.layout.K):
                if hi[g] >= k:
                    raise TokenStoreError(f"{self.root}/codes.npy: group {g} holds index {int(hi[g])} >= K={k}")

    def __len__(self) -> int:
        return int(self.header["N"])

    @property
    def num_classes(self) -> int:
        return int(self.header["num_classes"])

    @property
    def views(self) -> int:
        return int(self.header["V"])
