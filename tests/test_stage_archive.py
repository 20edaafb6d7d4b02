"""pipeline.stage_archive: which files of a finished stage are kept, export once and whole (again after a
redo), restore, copies that are whole or absent."""
import json
import shutil
from pathlib import Path

import pytest

from pipeline import stage_archive
from pipeline.stage_archive import copy_folder_once, export_stage, kept_files, restore, stage_name


def _stage(root: Path, name: str, files: dict[str, str], done=True) -> Path:
    d = root / name
    for rel, text in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text)
    if done:
        (d / "DONE.json").write_text(json.dumps({"seconds": 1.0}))
    return d


def test_kept_files_by_stage(tmp_path):
    tok = _stage(tmp_path, "1_tokenizer-aa", {
        "metrics.jsonl": "{}", "config.yaml": "a: 1", "checkpoints/latest": "step_00000020\n",
        "checkpoints/step_00000010/model.safetensors": "old", "checkpoints/step_00000010/meta.json": "{}",
        "checkpoints/step_00000020/model.safetensors": "w", "checkpoints/step_00000020/meta.json": "{}",
        "checkpoints/step_00000020/state.pt": "opt", "samples/step_10.png": "png"})
    assert stage_name(tok) == "tokenizer"
    assert [p.as_posix() for p in kept_files(tok)] == [
        "DONE.json", "checkpoints/latest", "checkpoints/step_00000020/meta.json",
        "checkpoints/step_00000020/model.safetensors", "config.yaml", "metrics.jsonl"]
    ar = _stage(tmp_path, "3_ar-bb", {"metrics.jsonl": "{}", "checkpoints/step_00000010/meta.json": "{}",
                                      "checkpoints/step_00000010/model.safetensors": "w",
                                      "checkpoints/step_00000010/engine/x.pt": "ds"})
    assert [p.as_posix() for p in kept_files(ar)] == ["DONE.json", "checkpoints/step_00000010/meta.json",
                                                        "metrics.jsonl"]
    enc = _stage(tmp_path, "2_encode-cc", {"train.bin": "tokens", "train.json": "{}"})
    assert kept_files(enc) == []                                  # re-encoded, never kept
    smp = _stage(tmp_path, "4_sample-dd", {"samples.npz": "x", "shards/fingerprint.json": "{}"})
    assert [p.as_posix() for p in kept_files(smp)] == ["DONE.json"]
    broken = _stage(tmp_path, "1_tokenizer-ee", {"checkpoints/latest": "step_00000005\n"})
    with pytest.raises(FileNotFoundError, match="1_tokenizer-ee.*step_00000005/meta.json"):
        kept_files(broken)
    no_weights = _stage(tmp_path, "1_tokenizer-ff", {"metrics.jsonl": "{}"})
    with pytest.raises(FileNotFoundError, match="1_tokenizer-ff.*no checkpoints/latest"):
        kept_files(no_weights)                                    # a tokenizer is never archived without them


def test_export_once_and_only_finished(tmp_path):
    arc = tmp_path / "archive"
    unfinished = _stage(tmp_path / "s", "5_eval-aa", {"x.json": "{}"}, done=False)
    assert not export_stage(unfinished, arc) and not (arc / "5_eval-aa").exists()
    d = _stage(tmp_path / "s", "5_eval-bb", {"x.json": "1"})
    assert export_stage(d, arc)
    (d / "x.json").write_text("2")
    assert not export_stage(d, arc)                               # already archived: left as it was
    assert (arc / "5_eval-bb" / "x.json").read_text() == "1"
    assert not [p for p in arc.iterdir() if p.name.startswith(".tmp")]
    (d / "DONE.json").write_text(json.dumps({"seconds": 2.0}))     # the stage was redone: the archive follows
    assert export_stage(d, arc)
    assert (arc / "5_eval-bb" / "x.json").read_text() == "2"
    assert sorted(p.name for p in arc.iterdir()) == ["5_eval-bb"]   # no temporary or replaced folder left


def test_copies_are_whole_or_absent(tmp_path, monkeypatch):
    arc = tmp_path / "archive"
    d = _stage(tmp_path / "s", "5_eval-aa", {"a.json": "1", "b.json": "2", "c.json": "3"})
    copy2, calls = shutil.copy2, []

    def fail_on_third(src, dst):
        calls.append(src)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return copy2(src, dst)

    monkeypatch.setattr(stage_archive.shutil, "copy2", fail_on_third)
    with pytest.raises(OSError, match="No space"):
        export_stage(d, arc)                                      # interrupted after DONE.json and a.json
    assert list(arc.iterdir()) == []                              # nothing half-copied, no temporary folder
    monkeypatch.setattr(stage_archive.shutil, "copy2", copy2)
    # two processes racing for one folder: the first rename wins, the later copy is dropped, not merged
    src = _stage(tmp_path, "clf", {"model.safetensors": "mine"}, done=False)
    (arc / "extractor" / "clf").mkdir(parents=True)
    (arc / "extractor" / "clf" / "model.safetensors").write_text("theirs")
    assert not stage_archive._copy_atomically(src, [Path("model.safetensors")], arc / "extractor" / "clf")
    assert (arc / "extractor" / "clf" / "model.safetensors").read_text() == "theirs"
    assert [p.name for p in (arc / "extractor").iterdir()] == ["clf"]
    assert not copy_folder_once(src, arc / "extractor" / "clf")   # exists: left alone
    assert copy_folder_once(src, arc / "extractor" / "clf2")
    assert (arc / "extractor" / "clf2" / "model.safetensors").read_text() == "mine"


def test_restore_brings_back_missing_stages_and_sets_a_partial_aside(tmp_path):
    arc, stages = tmp_path / "archive", tmp_path / "stages"
    export_stage(_stage(tmp_path / "a", "5_eval-aa", {"r.json": "archived"}), arc)
    export_stage(_stage(tmp_path / "a", "5_eval-bb", {"r.json": "archived"}), arc)
    _stage(stages, "5_eval-aa", {"r.json": "local"})                         # finished here: kept
    _stage(stages, "5_eval-bb", {"r.json": "half"}, done=False)              # interrupted here
    assert restore(arc, stages, log=lambda m: None) == ["5_eval-bb"]
    assert (stages / "5_eval-aa" / "r.json").read_text() == "local"
    assert (stages / "5_eval-bb" / "r.json").read_text() == "archived"
    assert (stages / ".partial-5_eval-bb" / "r.json").read_text() == "half"
    assert restore(tmp_path / "none", stages) == []


def test_restore_leaves_an_unfinished_redo_and_temporary_folders_alone(tmp_path):
    arc, stages = tmp_path / "archive", tmp_path / "stages"
    export_stage(_stage(tmp_path / "a", "3_ar-aa", {"metrics.jsonl": "archived"}), arc)
    _stage(arc, ".tmp-3_ar-bb-123", {"metrics.jsonl": "half"})               # a killed export's leftover
    _stage(stages, ".old-3_ar-aa", {"metrics.jsonl": "before the redo"})      # redo=[ar] interrupted here
    _stage(stages, "3_ar-aa", {"metrics.jsonl": "redo, half"}, done=False)
    assert restore(arc, stages, log=lambda m: None) == []                      # the redo resumes, not undone
    assert (stages / "3_ar-aa" / "metrics.jsonl").read_text() == "redo, half"
    assert sorted(p.name for p in stages.iterdir()) == [".old-3_ar-aa", "3_ar-aa"]
