"""GenEval report: the per-task table as the paper's Table 2 prints it, notes on what was measured, task grids.

Table columns: Single, Two, Counting, Colors, Position, Attr., Overall (accuracies, two decimals; ``–`` for a task
with no images). Grids: one PNG per task, up to ``max_prompts`` prompts of the task (lowest indices) as rows of
their images, each with a ✓ (correct) / ✗ (wrong) mark.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from rich.table import Table

from apexctl.eval.geneval.prompts import TASKS


def format_table(summary: Mapping[str, Any], name: str) -> Table:
    """One row for ``name``: the six task accuracies and the overall (mean of the tasks)."""
    title = summary.get("label", "GenEval")
    if not summary.get("complete", False):
        title += " — PARTIAL"
    table = Table(title=title)
    table.add_column("Model")
    for header in [*TASKS.values(), "Overall"]:
        table.add_column(header, justify="right")
    tasks = summary.get("tasks", {})
    cells = [f"{tasks[t]['accuracy']:.2f}" if t in tasks else "–" for t in TASKS]
    overall = summary.get("overall")
    table.add_row(name, *cells, f"{overall:.2f}" if overall is not None else "–")
    return table


def notes(summary: Mapping[str, Any]) -> list[str]:
    """The lines printed under the table: counts, micro rates, and anything that makes the number not comparable."""
    lines = [
        f"{summary['images']} images, {summary['prompts']} prompts; correct images {summary['correct_images']:.2%}, "
        f"correct prompts {summary['correct_prompts']:.2%}; overall {summary['overall']:.5f} (mean of the tasks)"
        if summary.get("images")
        else "no images scored"
    ]
    miss = summary.get("missing") or {}
    if miss.get("prompt_indices"):
        lines.append(
            f"PARTIAL: {miss['images']} images missing, prompt indices {miss['prompt_indices_text']} "
            "(per-task denominators differ from the full benchmark; not comparable to published numbers)"
        )
    elif not summary.get("complete", False):
        lines.append(
            f"PARTIAL: {summary.get('selected_prompts')} of 553 prompts × {summary.get('per_prompt')} images "
            "(the protocol is 553 × 4); not comparable to published numbers"
        )
    if summary.get("rewritten_prompts"):
        lines.append(
            f"REWRITTEN PROMPTS: {len(summary['rewritten_prompts'])} image folders were generated from a prompt text "
            "other than GenEval's (prompt rewriting inflates scores)"
        )
    return lines


def _thumb(path: Path, cell: int) -> np.ndarray:
    """An image file as a ``[3, cell, cell]`` array in [−1, 1] (letterboxed to a square)."""
    with Image.open(path) as im:
        img = ImageOps.pad(ImageOps.exif_transpose(im).convert("RGB"), (cell, cell), color=(0, 0, 0))
    return np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0


def save_task_grids(
    results: Sequence[Mapping[str, Any]], root: Path, out: Path, max_prompts: int = 8, cell: int = 128
) -> list[Path]:
    """``out/grid_<tag>.png`` per task present in ``results``; rows are prompts, marks are correctness."""
    from apexctl.images import save_grid

    written = []
    for tag in TASKS:
        rows = [r for r in results if r["tag"] == tag]
        if not rows:
            continue
        by_index: dict[int, list[Mapping[str, Any]]] = {}
        for r in rows:
            by_index.setdefault(r["index"], []).append(r)
        picked = sorted(by_index)[:max_prompts]
        ncol = max(len(by_index[i]) for i in picked)
        cells, marks, labels = [], [], []
        for i in picked:
            imgs = by_index[i]
            for j in range(ncol):
                if j < len(imgs):
                    cells.append(_thumb(root / imgs[j]["filename"], cell))
                    marks.append(bool(imgs[j]["correct"]))
                else:  # a missing image (partial run): an empty grey cell
                    cells.append(np.zeros((3, cell, cell), dtype=np.float32))
                    marks.append(None)
            labels.append(f"{i:05d} {imgs[0]['prompt']}"[:60])
        path = out / f"grid_{tag}.png"
        save_grid(np.stack(cells), path, nrow=ncol, labels=labels, marks=marks, mark_style="glyph")
        written.append(path)
    return written
