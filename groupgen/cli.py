"""What the command-line entry points share: mistakes of the user's making end as one line, not a traceback.

    def main():
        with user_errors("python -m tokenizer.train"):
            ...

A config mistake (ConfigError, exit 2 as argparse's), a run folder owned by another process, a full disk
(DiskFullError, or any error that says ENOSPC) or unreadable data (exit 1) print ``<prog>: error: <message>``; any other exception keeps its traceback
(it is a bug to report, and the traceback is what the report needs).
"""
from __future__ import annotations

import contextlib
import sys

from .config import ConfigError
from .data import DataError
from .diskspace import DiskFullError, free_bytes, is_disk_full
from .runlock import RunLockedError

USER_ERRORS = (ConfigError, RunLockedError, DiskFullError, DataError)


@contextlib.contextmanager
def user_errors(prog: str, extra: tuple[type[BaseException], ...] = ()):
    try:
        yield
    except USER_ERRORS + extra as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(e, ConfigError) else 1)
    except Exception as e:
        if not is_disk_full(e):
            raise
        # a write without its own size estimate (a log line, a PNG) met a full disk
        where = getattr(e, "filename", None)
        free = f", {free_bytes(where)} bytes free there" if where else ""
        print(f"{prog}: error: disk full writing {where or '(unknown file)'}{free} ({type(e).__name__}: {e}); "
              f"free space and re-run the same command to resume", file=sys.stderr, flush=True)
        sys.exit(1)
