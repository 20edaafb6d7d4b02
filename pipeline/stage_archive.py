"""Finished stages kept in the repository, so a long comparison continues on another machine.

A study of many CPU-hours runs across sessions whose machines start empty: the repository is all that
survives. ``export_stage`` copies one finished stage folder (``<n>_<name>-<hash>/``, see
``pipeline.main.Pipeline.stage``) into the archive, keeping only its records and what a later stage
still reads from it; ``restore`` copies archived stages that the stage folder lacks back in, where
``Pipeline.stage`` finds their ``DONE.json`` and reuses them. What is kept, by stage:

- tokenizer: its records and the final checkpoint's weights (``model.safetensors`` + ``meta.json``):
  encode, stats and sampling rebuild the tokenizer from them; the optimizer state is dropped.
- encode: nothing. Token stores are large and re-encoding takes about a minute; the stage reruns.
- ar, sample: their records only (the AR run's log, its checkpoints' ``meta.json``). The caller exports
  them once every checkpoint of the run has been sampled and scored, when nothing reads the weights or
  the samples again.
- stats, eval: their records, which are all they hold that a later stage or the table reads.

Record files are the top-level ``DONE.json``, ``*.json``, ``*.jsonl``, ``*.yaml`` (and a tokenizer's
``checkpoints/latest``). Every copy is written aside and renamed into place, so a folder in the archive or
restored from it is whole or absent; a redone stage (another ``DONE.json``) replaces its archived copy.

``copy_folder_once`` copies a whole folder once; ``pipeline.compare`` keeps the domain classifier its FIDs were
computed with that way: retrained on another machine its weights differ in the last bits (bf16 training runs
other kernels on another CPU), and every FID of a study must come from one feature extractor.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

RECORDS = ("*.json", "*.jsonl", "*.yaml")
NOT_ARCHIVED = ("encode",)                    # outputs too large to keep and cheap to redo
ARCHIVED_AFTER_SCORING = ("ar", "sample")     # exported by the caller once their dependents are finished


def stage_name(d: Path) -> str:
    """``3_ar-1a2b3c`` -> ``ar``."""
    return d.name.split("_", 1)[1].rsplit("-", 1)[0]


def kept_files(d: Path) -> list[Path]:
    """The files of finished stage ``d`` that the archive keeps (paths relative to ``d``)."""
    name = stage_name(d)
    if name in NOT_ARCHIVED:
        return []
    keep = {p.relative_to(d) for pat in RECORDS for p in d.glob(pat)}
    ck = d / "checkpoints"
    if name == "tokenizer":   # later stages rebuild the tokenizer from its final weights: never archive without
        if not (ck / "latest").is_file():
            raise FileNotFoundError(f"{d}: finished tokenizer stage has no checkpoints/latest (its final weights)")
        last = ck / (ck / "latest").read_text().strip()
        keep |= {Path("checkpoints/latest")} | {p.relative_to(d) for p in (last / "meta.json",
                                                                          last / "model.safetensors")}
    elif name == "ar":
        keep |= {p.relative_to(d) for p in ck.glob("step_*/meta.json")}
    missing = [str(p) for p in keep if not (d / p).is_file()]
    if missing:
        raise FileNotFoundError(f"{d}: finished stage lacks {missing}")
    return sorted(keep)


def export_stage(d: Path, archive: Path) -> bool:
    """Copy finished stage ``d``'s kept files to ``archive/<d.name>``: once, or again after the stage was redone
    (its ``DONE.json`` differs from the archived one). Returns whether it wrote anything."""
    d, archive = Path(d), Path(archive)
    dest = archive / d.name
    done = d / "DONE.json"
    if not done.is_file():
        return False
    same = (dest / "DONE.json").is_file() and (dest / "DONE.json").read_bytes() == done.read_bytes()
    files = [] if same else kept_files(d)
    return bool(files) and _copy_atomically(d, files, dest, replace=dest.exists())


def copy_folder_once(src: Path, dest: Path) -> bool:
    """Copy every file of folder ``src`` to ``dest`` unless ``dest`` exists (whole or not at all; where two
    processes race, the first rename wins and the other's copy is dropped)."""
    src, dest = Path(src), Path(dest)
    if dest.exists() or not src.is_dir():
        return False
    return _copy_atomically(src, sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file()), dest)


def _copy_atomically(src: Path, files: list[Path], dest: Path, replace: bool = False) -> bool:
    """``files`` (relative to ``src``) into ``dest``, written aside in ``dest``'s folder and renamed into place.
    ``replace``: an existing ``dest`` is swapped out; otherwise a ``dest`` that appeared meanwhile (another
    process) wins. Returns whether this copy landed; never leaves its temporary folder behind."""
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for rel in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, tmp / rel)
        if replace and dest.exists():
            old = dest.parent / f".old-{dest.name}-{os.getpid()}"
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old)
            return True
        try:
            os.replace(tmp, dest)   # onto an existing non-empty folder this fails: someone else's copy landed
        except OSError:
            if dest.is_dir() and any(dest.iterdir()):
                return False
            raise
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def restore(archive: Path, stages: Path, log=print) -> list[str]:
    """Copy every archived stage that ``stages`` has no finished folder for into it; returns their names.
    A local unfinished folder of the same stage (an interrupted run) is set aside as ``.partial-<name>``.
    A stage with an unfinished local redo (``.old-<name>``, ``pipeline.main.Pipeline.stage``) is left alone:
    the archive holds the result that redo replaces."""
    archive, stages = Path(archive), Path(stages)
    if not archive.is_dir():
        return []
    done = []
    for a in sorted(p for p in archive.iterdir()
                    if p.is_dir() and not p.name.startswith(".") and (p / "DONE.json").is_file()):
        d = stages / a.name
        if (d / "DONE.json").is_file() or (stages / f".old-{a.name}").exists():
            continue
        if d.exists():
            aside = stages / f".partial-{a.name}"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(d, aside)
        stages.mkdir(parents=True, exist_ok=True)
        if copy_folder_once(a, d):
            done.append(a.name)
    if done:
        log(f"restored {len(done)} finished stages from {archive}")
    return done
