"""One owner per run folder: an advisory lock that every writing entry point holds for its run.

    lock = hold_run_folder(out, "tokenizer.train")   # raises RunLockedError naming the holder
    ...
    lock.release()                                    # also on garbage collection / process exit

The lock is ``fcntl.flock`` on ``<folder>/.groupgen.lock``; the file holds a JSON record (pid, host,
start time, command) of the holder, so a refused process can say who owns the folder. The kernel drops
a flock when its holder dies (even by SIGKILL), so a dead process's lock is taken over by the next run;
its record is then overwritten. A record left by a holder that did not release cleanly is reported.

Guarantees: on a local filesystem, and on NFS where Linux maps ``flock`` to POSIX locks held by the
server (NFSv4; NFSv3 with lockd), two holders are excluded across hosts. On mounts with
``local_lock=flock|all`` or ``nolock`` the kernel only excludes processes of the same host. Where the
filesystem refuses locks (ENOLCK/EOPNOTSUPP) the record file itself is the lock (created with
O_EXCL): a record of a dead process on this host is taken over; one from another host must be removed
by hand (the error names the file). A process holding a folder may hold it again (nested calls).

Distributed runs: only global rank 0 takes the lock (a run folder shared by several nodes has one
owner; a per-node local rank 0 would refuse its own job's other nodes). Where a process group is up, rank
0 broadcasts the outcome so every rank fails with the same message instead of waiting in a collective.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from . import distributed

LOCK_NAME = ".groupgen.lock"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_held: dict[str, list] = {}   # realpath -> [fd or None (record mode), count]: re-entrant per process


class RunLockedError(RuntimeError):
    """Another live process owns the run folder."""


def _record(what: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "what": what, "argv": sys.argv[:8]}


def _read_record(path: Path) -> dict:
    for _ in range(5):   # the holder may be between truncating and writing its record
        try:
            text = path.read_text()
            return json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            time.sleep(0.05)
    return {}


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True   # exists under another user (or unreadable record): assume alive
    return True


def _refusal(folder: Path, rec: dict, lock_file: Path) -> RunLockedError:
    who = (f"pid {rec.get('pid', '?')} on host {rec.get('host', '?')} ({rec.get('what', '?')}, started "
           f"{rec.get('started', '?')})") if rec else "another process (no record yet)"
    return RunLockedError(f"run folder {folder} is in use by {who}; wait for it to finish or choose another "
                          f"output folder (lock file {lock_file})")


class RunLock:
    """A held lock on one folder; ``release()`` (or garbage collection) gives it back."""

    def __init__(self, folder: Path, key: str):
        self.folder, self._key, self.released = folder, key, False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        entry = _held.get(self._key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _held[self._key]
        fd, lock_file = entry[0], self.folder / LOCK_NAME
        try:
            if fd is None:                       # record mode: the file is the lock
                lock_file.unlink(missing_ok=True)
            else:
                os.ftruncate(fd, 0)              # an empty record = released cleanly
        except OSError:
            pass
        finally:
            if fd is not None:
                os.close(fd)                     # drops the flock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass


def acquire(folder: str | Path, what: str) -> RunLock:
    """Take the folder (created if missing) or raise RunLockedError naming the live holder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(folder)
    if key in _held:
        _held[key][1] += 1
        return RunLock(folder, key)
    lock_file = folder / LOCK_NAME
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise _refusal(folder, _read_record(lock_file), lock_file) from None
        if e.errno in _NO_LOCKS:
            return _acquire_record_only(folder, key, what)
        raise
    old = _read_record(lock_file)
    if old and old.get("pid") != os.getpid():
        print(f"note: {folder} was last owned by pid {old.get('pid')} on host {old.get('host')}, which did not "
              f"release it cleanly (killed?); taking it over", file=sys.stderr)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_record(what)).encode(), 0)
    _held[key] = [fd, 1]
    return RunLock(folder, key)


def _acquire_record_only(folder: Path, key: str, what: str) -> RunLock:
    """No flock on this filesystem: an O_EXCL-created record is the lock."""
    lock_file = folder / LOCK_NAME
    for _ in range(3):
        try:
            fd = os.open(lock_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            rec = _read_record(lock_file)
            if not rec:   # an empty file: an earlier flock holder released it
                lock_file.unlink(missing_ok=True)
                continue
            if rec.get("host") == socket.gethostname() and not _pid_alive(rec.get("pid")):
                # stale: its process is gone. Rename first, so of two racing takers only one wins.
                try:
                    os.replace(lock_file, folder / f"{LOCK_NAME}.stale-{os.getpid()}")
                    (folder / f"{LOCK_NAME}.stale-{os.getpid()}").unlink(missing_ok=True)
                except FileNotFoundError:
                    pass
                continue
            err = _refusal(folder, rec, lock_file)
            if rec.get("host") != socket.gethostname():
                err = RunLockedError(f"{err}; this filesystem has no locks, so if that process is gone, "
                                     f"remove {lock_file} by hand")
            raise err
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(_record(what)))
        _held[key] = [None, 1]
        return RunLock(folder, key)
    raise RunLockedError(f"run folder {folder}: could not take {lock_file} (other processes keep racing for it)")


def hold_run_folder(folder: str | Path, what: str, rank: int | None = None) -> RunLock | None:
    """``acquire`` on global rank 0 only; with a process group up, every rank learns rank 0's outcome
    (one broadcast) and raises the same error, so no rank waits in a later collective for a rank that left."""
    if rank is None:
        rank = int(os.environ.get("RANK", 0))
    lock, msg = None, ""
    if rank == 0:
        try:
            lock = acquire(folder, what)
        except RunLockedError as e:
            msg = str(e)
    msg = distributed.broadcast_object(msg)   # every rank learns rank 0's outcome (on its own GPU under NCCL)
    if msg:
        raise RunLockedError(msg)
    return lock
