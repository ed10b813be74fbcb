"""The training package's shape (docs/design.md §2): one concern per module, none over 300 lines, and only the
session setup touches models, data, LoRA and the export."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "apexctl"
TRAINING = PACKAGE / "training"
#: what only ``training/session.py`` may import (any import statement, function-level ones included)
SETUP_ONLY = ("apexctl.models", "apexctl.data", "apexctl.lora", "apexctl.export")


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def test_only_the_session_setup_imports_models_data_lora_and_export():
    offenders = {
        path.name: sorted(m for m in _imports(path) if m.startswith(SETUP_ONLY))
        for path in sorted(TRAINING.glob("*.py"))
        if path.name != "session.py"
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    assert any(m.startswith("apexctl.models") for m in _imports(TRAINING / "session.py"))  # the rule is not vacuous


def test_training_modules_stay_small_and_the_loop_reads_in_one_go():
    sizes = {p.name: len(p.read_text().splitlines()) for p in TRAINING.glob("*.py")}
    assert {k: n for k, n in sizes.items() if n > 300} == {}
    loop = ast.parse((TRAINING / "loop.py").read_text())
    body = {n.name: n.end_lineno - n.lineno + 1 for n in loop.body if isinstance(n, ast.FunctionDef)}
    assert body["train"] + body["_loop"] <= 80, body  # train() and its loop: two screens


def test_the_trainer_left_the_engine():
    moved = {f"apexctl.engine.{m}" for m in ("trainer", "checkpoint", "lock", "fsdp")}
    assert not any((PACKAGE / "engine" / f"{m.rsplit('.', 1)[1]}.py").exists() for m in moved)
    root = PACKAGE.parent
    for path in [*PACKAGE.rglob("*.py"), *(root / "bench").glob("*.py"), *(root / "tests").glob("*.py")]:
        assert not (_imports(path) & moved), path
