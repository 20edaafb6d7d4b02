"""Test-only launcher for the reliability tests (tests/_campaign.py): run a CLI under fault injection, or many CLIs in one process.

    python tests/_kill_helpers.py [--delay DOTTED=SECONDS ...] [--hang-save N MARKER] -m MODULE [ARGS ...]
    python tests/_kill_helpers.py --batch CASES.json RESULTS.json

``-m MODULE ARGS`` runs the module exactly as ``python -m MODULE ARGS`` would (runpy, ``__main__``).
``--delay groupgen.runs.MetricsLog.write=0.15`` sleeps before every call of that function, so a test can
SIGKILL inside a window of known length (sleeping changes no numbers). ``--hang-save N MARKER`` makes
the N-th checkpoint write block right after ``state.pt`` is written into its temporary directory (before
the rename that publishes it), touching MARKER first, so the test can SIGKILL in the middle of a save.
``--batch`` runs each case ``{"module", "argv", "env"}`` in turn as ``python -m`` would and records the
exit status and stderr: one interpreter start for many bad-input cases instead of one each.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import runpy
import sys
import time
import traceback
from pathlib import Path


def _resolve(dotted: str):
    """(owner, attribute name) for ``pkg.module.Class.attr``: the longest importable module prefix."""
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for p in parts[i:-1]:
            owner = getattr(owner, p)
        return owner, parts[-1]
    raise SystemExit(f"_kill_helpers: cannot resolve {dotted!r}")


def add_delay(dotted: str, seconds: float) -> None:
    owner, name = _resolve(dotted)
    real = getattr(owner, name)

    def slowed(*a, **kw):
        time.sleep(seconds)
        return real(*a, **kw)

    setattr(owner, name, slowed)


def hang_on_save(n: int, marker: str) -> None:
    import groupgen.checkpoint as ck

    real, count = ck._fsync_file, {"n": 0}

    def fsync(path):
        real(path)
        if Path(path).name == "state.pt":
            count["n"] += 1
            if count["n"] == n:
                Path(marker).write_text(str(path))
                time.sleep(600)   # the test SIGKILLs us here

    ck._fsync_file = fsync


def run_module(module: str, argv: list[str]) -> None:
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def run_batch(cases_file: str, results_file: str) -> None:
    results = []
    for case in json.loads(Path(cases_file).read_text()):
        saved = {k: os.environ.get(k) for k in case.get("env", {})}
        os.environ.update(case.get("env", {}))
        buf, code = io.StringIO(), 0
        with contextlib.redirect_stderr(buf):
            try:
                run_module(case["module"], case["argv"])
            except SystemExit as e:   # what the interpreter would turn into the exit status
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = 1 if isinstance(e.code, str) else (e.code or 0)
            except BaseException:     # an uncaught exception: traceback on stderr, status 1
                traceback.print_exc()
                code = 1
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        results.append({"name": case.get("name", case["module"]), "code": code, "stderr": buf.getvalue()})
        Path(results_file).write_text(json.dumps(results, indent=1))


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--batch"]:
        return run_batch(args[1], args[2])
    while args and args[0] != "-m":
        flag = args.pop(0)
        if flag == "--delay":
            dotted, secs = args.pop(0).rsplit("=", 1)
            add_delay(dotted, float(secs))
        elif flag == "--hang-save":
            hang_on_save(int(args.pop(0)), args.pop(0))
        else:
            raise SystemExit(f"_kill_helpers: unknown option {flag!r}")
    if not args:
        raise SystemExit("_kill_helpers: missing -m MODULE")
    run_module(args[1], args[2:])


if __name__ == "__main__":
    main()
