"""``apexctl eval digits``: generate with the teacher and the student, score with the digits judge, report.

Rows: teacher at ``teacher_steps`` (Euler, with the guidance of the teacher's own recipe), teacher at 1 step, student at each requested
step count. Every row sees the same prompts and the same seeds (image k of a prompt uses seed k).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from apexctl.atomic import write_text
from apexctl.recipe import Recipe, SampleSpec, load_recipe


def teacher_sample_spec(teacher_dir: str) -> SampleSpec:
    """The teacher's own sampling settings: the ``sample`` section of the run that trained it, when there is one."""
    rec = Path(teacher_dir).parent / "recipe.yaml"
    if Path(teacher_dir).is_dir() and rec.is_file():
        return load_recipe(rec).sample
    return SampleSpec()


def run_eval_digits(
    recipe: Recipe,
    *,
    per_prompt: int = 100,
    teacher_steps: int = 50,
    student_steps: list[int] | tuple[int, ...] = (1,),
    teacher_guidance: float | None = None,
    out: Path | None = None,
    quiet: bool = False,
) -> dict:
    from rich.console import Console

    from apexctl.data.digits import eval_prompts, load_split
    from apexctl.eval.digits import DigitsJudge, format_table, real_reference
    from apexctl.generate import generate_images
    from apexctl.images import save_grid
    from apexctl.models import load_for_recipe, resolve_model_path
    from apexctl.sampling import load_trained

    console = Console(width=None if sys.stdout.isatty() else 120)  # logs/CI: the full table, not a squeezed one
    split = load_split(holdout=recipe.data.holdout, seed=recipe.data.seed)
    judge = DigitsJudge.fit(split, seed=0)
    prompts = eval_prompts()
    texts = [p.prompt for p in prompts for _ in range(per_prompt)]
    seeds = [k for _ in prompts for k in range(per_prompt)]
    allowed = [p.allowed for p in prompts for _ in range(per_prompt)]
    kinds = [p.kind for p in prompts for _ in range(per_prompt)]
    size = recipe.data.resolution
    s = recipe.sample

    teacher_dir = resolve_model_path(recipe.model.path)
    if teacher_guidance is None:
        teacher_guidance = teacher_sample_spec(teacher_dir).guidance
    teacher = load_for_recipe(recipe.model, teacher_dir)
    student = load_trained(recipe)
    rows_spec = [
        (f"teacher {teacher_steps} steps", teacher, teacher_steps, "euler", teacher_guidance),
        ("teacher 1 step", teacher, 1, "one", 1.0),
    ]
    rows_spec += [
        (
            f"student {k} step{'s' if k > 1 else ''}",
            student,
            k,
            "one" if k == 1 else s.method if s.method != "auto" else "few",
            1.0,
        )
        for k in student_steps
    ]

    results: dict[str, dict] = {"real data (held-out)": real_reference(judge, split)}
    grids = []
    for name, model, steps, method, guidance in rows_spec:
        t0 = time.perf_counter()
        images = generate_images(
            model,
            texts,
            seeds,
            height=size,
            width=size,
            steps=steps,
            method=method,
            guidance=guidance,
            negative_prompt=s.negative_prompt,
            renoise=s.renoise,
            batch=256,
            quiet=quiet,
            label=name,
        )
        scored = judge.score(images, allowed, kinds)
        scored["seconds"] = round(time.perf_counter() - t0, 2)
        scored["steps"], scored["method"], scored["guidance"] = steps, method, guidance
        results[name] = scored
        # grid: 8 images for each prompt, one row per prompt
        pick = torch.tensor([i * per_prompt + k for i in range(len(prompts)) for k in range(min(8, per_prompt))])
        grids.append((name, images[pick]))

    folder = out or Path(recipe.output.dir) / "eval" / "digits"
    folder.mkdir(parents=True, exist_ok=True)
    summary = {
        "per_prompt": per_prompt,
        "prompts": [{"prompt": p.prompt, "kind": p.kind, "allowed": sorted(p.allowed)} for p in prompts],
        "judge_test_accuracy": judge.test_accuracy,
        "teacher": {"model": teacher_dir, "steps": teacher_steps, "guidance": teacher_guidance},
        "rows": results,
    }
    write_text(folder / "results.json", json.dumps(summary, indent=1, default=float))
    ncol = min(8, per_prompt)
    for name, imgs in grids:
        save_grid(
            imgs,
            nrow=ncol,
            path=folder / f"grid_{name.replace(' ', '_')}.png",
            upscale=4,
            labels=[p.prompt for p in prompts],
        )
    console.print(format_table(results))
    console.print(f"results: {folder / 'results.json'}; grids: {folder}/grid_*.png")
    return summary
