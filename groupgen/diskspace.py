"""Full disks as one clear line: the path, the bytes a write needs and the bytes free.

``check_free`` runs before a stage that knows its size; ``reserve`` allocates a memory-mapped file's
blocks up front (a page of a sparse mapping that cannot be backed on a full disk kills the process
with SIGBUS, which no Python code can catch); ``disk_full_guard`` turns the errors a full disk causes
deep inside writers (ENOSPC, and torch.save's ``basic_ios::clear: iostream error`` / ``unexpected
pos``, which do not carry an errno) into ``DiskFullError``.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_FULL_MESSAGES = ("iostream error", "unexpected pos", "No space left", "PytorchStreamWriter failed",
                  "file write failed")


class DiskFullError(OSError):
    """Not enough free space for a write; the message names the path, bytes needed and bytes free."""

    def __init__(self, path, need: int, free: int, what: str = "", cause: str = ""):
        self.path, self.need, self.free = str(path), int(need), int(free)
        why = f" ({cause})" if cause else ""   # e.g. a quota, when the disk itself still has room
        super().__init__(errno.ENOSPC, f"disk full: {what + ' at ' if what else ''}{path} needs {_size(need)}, "
                                       f"{_size(free)} free{why}; free space there (or write elsewhere) and "
                                       f"re-run the same command to resume")

    def __str__(self):
        return self.strerror


def _size(n: int) -> str:
    return f"{n} bytes ({n / 2**20:.1f} MiB)" if n >= 2**20 else f"{n} bytes"


def free_bytes(path: str | Path) -> int:
    p = Path(path)
    while not p.exists() and p != p.parent:   # a folder not made yet: its nearest existing parent
        p = p.parent
    return shutil.disk_usage(p).free


def check_free(path: str | Path, need: int, what: str = "") -> None:
    free = free_bytes(path)
    if need > free:
        raise DiskFullError(path, need, free, what)


def is_disk_full(e: BaseException) -> bool:
    if isinstance(e, DiskFullError):
        return False   # already explained
    if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
        return True
    if isinstance(e, Exception) and ("No space left on device" in str(e) or "os error 28" in str(e)):
        return True   # e.g. safetensors' SafetensorError, which carries no errno
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _FULL_MESSAGES)


def as_disk_full(e: BaseException, path: str | Path, need: int, what: str = "") -> DiskFullError | None:
    """``e`` explained as a DiskFullError, or None where it is something else."""
    if not is_disk_full(e):
        return None
    free = free_bytes(path)
    if isinstance(e, RuntimeError) and free >= need and "No space left" not in str(e):
        return None   # a writer's message that only looks like a full disk
    return DiskFullError(path, need, free, what, f"{type(e).__name__}: {e}"[:200])


@contextlib.contextmanager
def disk_full_guard(path: str | Path, need: int, what: str = ""):
    """Re-raise a disk-full failure inside the block as DiskFullError (chained to the original)."""
    try:
        yield
    except BaseException as e:
        full = as_disk_full(e, path, need, what)
        if full is None:
            raise
        raise full from e


def reserve(file: str | Path, what: str = "") -> None:
    """Allocate every block of ``file`` now (its current size), so writes through a memory map of it
    cannot hit a full disk later. Filesystems without fallocate keep the plain free-space check."""
    file = Path(file)
    size = file.stat().st_size
    if size == 0:
        return
    need = max(0, size - file.stat().st_blocks * 512)   # what is not allocated yet (a sparse file: most)
    fd = os.open(file, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in _FULL_ERRNOS:
            raise DiskFullError(file, need, free_bytes(file), what) from None
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    finally:
        os.close(fd)


def reserved_memmap(file: str | Path, dtype, shape: tuple, what: str = ""):
    """``np.lib.format.open_memmap(file, "w+")`` with its blocks allocated (``reserve``); on a full disk
    the file is removed again and DiskFullError raised, before any data went in."""
    import numpy as np

    arr = np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=shape)
    try:
        reserve(file, what)
    except DiskFullError:
        del arr
        Path(file).unlink(missing_ok=True)
        raise
    return arr
