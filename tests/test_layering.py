"""Package layering (../shared/DESIGN.md, "Direction"): the contracts (groupgen) import no stage, no
stage imports the recipes on top (pipeline), and the commands users type keep working after the move."""
import ast
import subprocess
import sys

import pytest
from _env import REPO, child_env

STAGES = ("tokenizer", "ar_model", "sampling", "eval")


def imported_packages(pkg: str) -> dict[str, set[str]]:
    """Top-level packages imported anywhere in ``pkg`` (function-level imports included) -> the files."""
    out: dict[str, set[str]] = {}
    for f in sorted((REPO / pkg).rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                out.setdefault(n.split(".")[0], set()).add(str(f.relative_to(REPO)))
    return out


def test_contracts_import_no_stage_and_no_stage_imports_the_pipeline():
    up = {k: v for k, v in imported_packages("groupgen").items() if k in STAGES + ("pipeline",)}
    assert not up, f"groupgen (the contracts) imports stages or the pipeline: {up}"
    for s in STAGES:
        assert "pipeline" not in imported_packages(s), s
    # tokenizer evaluation has one owner (eval.reconstruction): eval imports tokenizer, never the reverse
    assert "eval" not in imported_packages("tokenizer"), imported_packages("tokenizer").get("eval")
    assert "tokenizer" in imported_packages("eval")
    used = imported_packages("pipeline")
    assert {"tokenizer", "ar_model", "sampling", "eval"} <= set(used)   # the recipe orchestrates every stage


@pytest.mark.parametrize("old,new", [("groupgen.main", "pipeline.main"), ("eval.compare", "pipeline.compare"),
                                     ("tokenizer.evaluate", "eval.reconstruction")])
def test_old_commands_forward_to_the_pipeline(old, new):
    r = subprocess.run([sys.executable, "-m", old, "--help"], cwd=REPO, env=child_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(f"usage: python -m {new} ")
