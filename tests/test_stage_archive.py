"""pipeline.stage_archive: which files of a finished stage are kept, export once and whole, restore."""
import json
from pathlib import Path

import pytest

from pipeline.stage_archive import export_stage, kept_files, restore, stage_name


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
