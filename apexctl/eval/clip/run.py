"""``apexctl eval clip-score``: CLIP score of image sets against the prompts they were made from.

Sets: each ``--images DIR`` (prompts from its ``samples.jsonl`` / ``metadata.jsonl``), or, without them, the run's
student on ``--prompts`` (and with ``--teacher`` the teacher on the same prompts and seeds: the same folders that
``eval fid`` draws, reused when present). Writes ``RUN/eval/clip_score.json`` (or ``--out``; without a run,
``clip_score.json`` in the first images folder) atomically.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from apexctl.atomic import write_text
from apexctl.errors import BadInput
from apexctl.ranks import job_ranks


def run_eval_clip_score(
    run: Path | None,
    *,
    clip: Path | None = None,
    images: list[Path] | None = None,
    prompts_file: Path | None = None,
    num: int | None = None,
    per_prompt: int = 1,
    steps: int = 1,
    teacher: bool = False,
    teacher_steps: int | None = None,
    teacher_guidance: float | None = None,
    seed: int = 0,
    batch: int = 16,
    out: Path | None = None,
    quiet: bool = False,
    quantize: str = "none",
    check_only: bool = False,
) -> dict[str, Any] | None:
    """Returns the summary (None on a rank > 0 of a launched job: it only helps draw the image sets).
    ``check_only``: check every input (weights, run, folders, prompts) and return None (before a launch)."""
    from rich.console import Console
    from rich.table import Table

    from apexctl.eval.clip.model import load_clip
    from apexctl.eval.clip.score import clip_score
    from apexctl.eval.imagesets import image_prompts, read_prompts
    from apexctl.eval.sample_sets import ensure_set, load_run, student_spec, teacher_spec

    ranks = job_ranks() if not check_only else None
    # the missing-weights error comes before any generation; a rank > 0 only checks them (the GPU is rank 0's)
    clip_model = load_clip(clip, device=ranks.device if ranks is not None and ranks.main else "cpu")
    recipe = load_run(run) if run is not None else None
    sets: list[tuple[str, Path]] = [(str(d), d) for d in images or []]
    for _, folder in sets:
        image_prompts(folder)  # every folder must say which prompt made each image
    if not sets:
        if recipe is None or prompts_file is None:
            raise BadInput("nothing to score: pass --images DIR, or a RUN and --prompts FILE to generate images")
        prompts = read_prompts(prompts_file, num)
    if ranks is None:
        return None
    if not images:
        specs = [student_spec(recipe, steps, quantize)]
        if teacher:
            specs.append(teacher_spec(recipe, teacher_steps, teacher_guidance, quantize))
        for spec in specs:
            folder = ensure_set(
                recipe, spec, prompts, per_prompt=per_prompt, seed=seed, batch=batch, ranks=ranks, quiet=quiet
            )
            sets.append((spec.label, folder))

    if not ranks.main:
        return None
    rows: dict[str, dict[str, Any]] = {}
    for label, folder in sets:
        t0 = time.perf_counter()
        pairs = image_prompts(folder)
        value = clip_score(clip_model, [p for p, _ in pairs], [t for _, t in pairs], batch=batch)
        rows[label] = {
            "clip_score": value,
            "n": len(pairs),
            "path": str(folder),
            "seconds": round(time.perf_counter() - t0, 2),
        }
    import torchmetrics

    summary = {
        "metric": "clip_score",
        "definition": "torchmetrics CLIPScore: max(100 * mean cos(image embedding, prompt embedding), 0)",
        "clip": clip_model.source,
        "rows": rows,
        "torchmetrics": torchmetrics.__version__,
    }
    dest = out or (Path(run) / "eval" / "clip_score.json" if run is not None else sets[0][1] / "clip_score.json")
    write_text(dest, json.dumps(summary, indent=1) + "\n")

    table = Table(title=f"CLIP score ↑ ({clip_model.source})")
    table.add_column("images")
    table.add_column("n", justify="right")
    table.add_column("CLIP score", justify="right")
    for label, r in rows.items():
        table.add_row(label, str(r["n"]), f"{r['clip_score']:.3f}")
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(table)
    console.print(f"summary: {dest}")
    return summary
