"""Checkpoint folders ``RUN/checkpoints/step-NNNNNN/``: complete or absent, newest-first lookup, pruning."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

_NAME = re.compile(r"^step-(\d{6,})$")
COMPLETE = "COMPLETE"  # written last inside the folder: a folder without it is ignored (half-written)


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:06d}"


def complete_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / COMPLETE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run: Path) -> tuple[int, Path] | None:
    found = complete_checkpoints(run)
    return found[-1] if found else None


def prune(run: Path, keep_last: int) -> None:
    for _, p in complete_checkpoints(run)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
