"""``apexctl eval digits`` / ``eval scenes``: generate with the teacher and the student, score with the setting's
judge, report. One loop (:func:`run_eval`) serves both settings; an :class:`EvalSetting` brings the prompts, the
judge and the real-data row.

Rows: teacher at ``teacher_steps`` (Euler, with the guidance of the teacher's own recipe: ``teacher_settings``),
teacher at 1 step, student at each requested step count (the recipe's ``sample`` settings, resolved as every command
resolves them). Every row sees the same prompts and the same seeds (image k of a prompt uses seed k).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from apexctl.atomic import write_text
from apexctl.recipe import Recipe


@dataclass
class EvalSetting:
    """What :func:`run_eval` needs from a setting: ``prompts`` (each with ``.prompt``, ``.allowed``, ``.kind``), a
    ``judge`` with ``score(images, allowed, kinds, prompts)`` and ``test_accuracy``, the real-data row, and ``describe``
    turning a prompt's ``allowed`` into JSON for results.json."""

    name: str
    prompts: Sequence[Any]
    judge: Any
    reference: dict
    reference_label: str
    describe: Callable[[Any], Any]


def digits_setting(recipe: Recipe) -> EvalSetting:
    from apexctl.data.digits import eval_prompts, load_split
    from apexctl.eval.toy.digits import DigitsJudge, real_reference

    split = load_split(holdout=recipe.data.holdout, seed=recipe.data.seed)
    judge = DigitsJudge.fit(split, seed=0)
    return EvalSetting("digits", eval_prompts(), judge, real_reference(judge, split), "real data (held-out)", sorted)


def scenes_setting(recipe: Recipe) -> EvalSetting:
    from apexctl.data.digits import load_split
    from apexctl.data.scenes import eval_prompts
    from apexctl.eval.toy.scenes import SceneJudge, real_reference

    split = load_split(holdout=recipe.data.holdout, seed=recipe.data.seed)
    prompts = eval_prompts()
    judge = SceneJudge.fit(split, prompts, seed=0)
    reference = real_reference(judge, split, prompts)

    def describe(rule) -> dict:
        return {
            "classes": sorted(rule.classes),
            "colours": sorted(rule.colours),
            "positions": sorted(rule.positions),
            "count": rule.count,
            "pair_sum": rule.pair_sum,
        }

    return EvalSetting("scenes", prompts, judge, reference, "real data (held-out digits)", describe)


def run_eval(
    recipe: Recipe,
    setting: EvalSetting,
    *,
    per_prompt: int = 100,
    teacher_steps: int | None = None,
    student_steps: list[int] | tuple[int, ...] = (1,),
    teacher_guidance: float | None = None,
    out: Path | None = None,
    quiet: bool = False,
) -> dict:
    from dataclasses import replace

    from rich.console import Console

    from apexctl.eval.toy.digits import format_table
    from apexctl.images import save_grid
    from apexctl.inference import (
        ModelInfo,
        generate_images,
        is_distilled,
        load_trained,
        resolve_sample_settings,
        teacher_settings,
    )
    from apexctl.models import load_for_recipe, resolve_model_path
    from apexctl.training.trackers import log_eval_summary, require_package

    require_package(recipe.train.log_with)  # a missing tracker package: exit 2 before anything loads
    console = Console(width=None if sys.stdout.isatty() else 120)  # logs/CI: the full table, not a squeezed one
    judge, prompts = setting.judge, setting.prompts
    texts = [p.prompt for p in prompts for _ in range(per_prompt)]
    seeds = [k for _ in prompts for k in range(per_prompt)]
    allowed = [p.allowed for p in prompts for _ in range(per_prompt)]
    kinds = [p.kind for p in prompts for _ in range(per_prompt)]

    teacher_dir = resolve_model_path(recipe.model.path)
    t = teacher_settings(recipe, steps=teacher_steps, guidance=teacher_guidance, seed=0, batch=256)
    from apexctl.ranks import job_ranks

    device = job_ranks().device  # the GPU when there is one
    teacher = load_for_recipe(recipe.model, teacher_dir).to(device)
    student = load_trained(recipe).to(device)
    rows_spec = [
        (f"teacher {t.steps} steps", teacher, t),
        ("teacher 1 step", teacher, replace(t, steps=1, method="one", guidance=1.0)),
    ]
    info = ModelInfo(distilled=is_distilled(recipe))
    rows_spec += [
        (f"student {k} step{'s' if k > 1 else ''}", student, resolve_sample_settings(recipe, info, steps=k, batch=256))
        for k in student_steps
    ]

    results: dict[str, dict] = {setting.reference_label: setting.reference}
    grids = []
    for name, model, s in rows_spec:
        t0 = time.perf_counter()
        images = generate_images(model, texts, seeds, quiet=quiet, label=name, **s.sampler_kwargs())
        scored = judge.score(images, allowed, kinds, texts)  # prompts: seed_diversity / fd_single group by them
        scored["seconds"] = round(time.perf_counter() - t0, 2)
        scored["steps"], scored["method"], scored["guidance"] = s.steps, s.method, s.guidance
        results[name] = scored
        # grid: 8 images for each prompt, one row per prompt
        pick = torch.tensor([i * per_prompt + k for i in range(len(prompts)) for k in range(min(8, per_prompt))])
        grids.append((name, images[pick]))

    folder = out or Path(recipe.output.dir) / "eval" / setting.name
    folder.mkdir(parents=True, exist_ok=True)
    summary = {
        "per_prompt": per_prompt,
        "prompts": [{"prompt": p.prompt, "kind": p.kind, "allowed": setting.describe(p.allowed)} for p in prompts],
        "judge_test_accuracy": judge.test_accuracy,
        "teacher": {"model": teacher_dir, "steps": t.steps, "guidance": t.guidance},
        "rows": results,
    }
    write_text(folder / "results.json", json.dumps(summary, indent=1, default=float))
    log_eval_summary(recipe, f"eval/{setting.name}", results)  # train.log_with's tracker run, if any
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
