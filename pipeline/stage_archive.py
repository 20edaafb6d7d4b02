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
- stats, eval: everything (small JSON).

Record files are ``DONE.json``, ``*.json``, ``*.jsonl``, ``*.yaml`` and ``checkpoints/latest``.

``keep_folder`` copies a whole folder once; ``pipeline.compare`` keeps the domain classifier its FIDs were
computed with that way: retrained on another machine its weights differ in the last bits (bf16 training runs
other kernels on another CPU), and every FID of a study must come from one feature extractor.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

RECORDS = ("*.json", "*.jsonl", "*.yaml")
NEVER = ("encode",)                  # stages whose outputs are too large to keep and cheap to redo
AFTER_USE = ("ar", "sample")         # exported by the caller once their dependents are finished


def stage_name(d: Path) -> str:
    """``3_ar-1a2b3c`` -> ``ar``."""
    return d.name.split("_", 1)[1].rsplit("-", 1)[0]


def kept_files(d: Path) -> list[Path]:
    """The files of finished stage ``d`` that the archive keeps (paths relative to ``d``)."""
    name = stage_name(d)
    if name in NEVER:
        return []
    keep = {p.relative_to(d) for pat in RECORDS for p in d.glob(pat)}
    ck = d / "checkpoints"
    if name == "tokenizer" and (ck / "latest").is_file():
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
    """Copy finished stage ``d``'s kept files to ``archive/<d.name>`` (once; written aside, then renamed
    into place, so an interrupted export leaves no half folder). Returns whether it wrote anything."""
    d, archive = Path(d), Path(archive)
    dest = archive / d.name
    if not (d / "DONE.json").is_file() or (dest / "DONE.json").is_file():
        return False
    files = kept_files(d)
    if not files:
        return False
    _copy_whole(d, files, dest)
    return True


def keep_folder(src: Path, dest: Path) -> bool:
    """Copy every file of folder ``src`` to ``dest`` unless ``dest`` exists (whole or not at all)."""
    src, dest = Path(src), Path(dest)
    if dest.exists() or not src.is_dir():
        return False
    _copy_whole(src, sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file()), dest)
    return True


def _copy_whole(src: Path, files: list[Path], dest: Path) -> None:
    """``files`` (relative to ``src``) into ``dest``: written aside, then renamed into place."""
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for rel in files:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, tmp / rel)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def restore(archive: Path, stages: Path, log=print) -> list[str]:
    """Copy every archived stage that ``stages`` has no finished folder for into it; returns their names.
    A local unfinished folder of the same stage (an interrupted run) is set aside as ``.partial-<name>``."""
    archive, stages = Path(archive), Path(stages)
    if not archive.is_dir():
        return []
    done = []
    for a in sorted(p for p in archive.iterdir() if p.is_dir() and (p / "DONE.json").is_file()):
        d = stages / a.name
        if (d / "DONE.json").is_file():
            continue
        if d.exists():
            aside = stages / f".partial-{a.name}"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(d, aside)
        stages.mkdir(parents=True, exist_ok=True)
        shutil.copytree(a, d)
        done.append(a.name)
    if done:
        log(f"restored {len(done)} finished stages from {archive}")
    return done
