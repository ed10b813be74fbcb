"""Student and teacher image sets for FID / CLIP score: the same prompts and seeds, written as PNG folders.

A set lives in ``RUN/eval/samples/<role>-<steps>step-<hash>/``: ``00000.png``…, ``samples.jsonl`` (file, prompt,
seed per image) and ``meta.json`` (model, sampler settings, prompts). The hash covers every setting and the prompt
list, so a folder only ever holds images of one configuration; rerunning resumes it (existing PNGs are kept).
Image ``k`` of prompt ``j`` uses seed ``seed + k`` for both student and teacher (as ``apexctl sample`` does).

Student: the run's trained model (``model/``, or the base with ``lora/``) with the recipe's ``sample`` settings at
the requested steps, resolved as every command resolves them (``method: auto``: 1 step = the one-step map, more
steps the few-step sampler of a distilled student). Teacher: ``teacher_settings`` — the recipe's ``model.path``
with multi-step Euler and classifier-free guidance: by default the steps/guidance of ``data.synthesize`` when the
run was trained on teacher samples, else 50 steps and the guidance of the teacher run's own recipe (as ``eval
digits``).
"""

from __future__ import annotations

import gc
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from apexctl.atomic import write_text
from apexctl.errors import BadInput
from apexctl.recipe import Recipe


def load_run(run: Path) -> Recipe:
    """The recipe of the run folder ``run``, with ``output.dir`` pointing at it (wherever it was trained)."""
    run = Path(run)
    if not (run / "recipe.yaml").is_file():
        raise BadInput(f"{run}: not a run folder (no recipe.yaml)")
    from apexctl.inference import run_recipe

    return run_recipe(run)


@dataclass(frozen=True)
class SetSpec:
    """How one image set is drawn."""

    role: str  # "student" | "teacher"
    model: str
    steps: int
    method: str
    guidance: float
    negative_prompt: str
    renoise: str
    height: int
    width: int
    grid_power: float = 1.0

    @property
    def label(self) -> str:
        cfg = f", CFG {self.guidance:g}" if self.guidance > 1.0 else ""
        return f"{self.role} {self.steps} step{'s' if self.steps > 1 else ''}{cfg}"

    def sampler_kwargs(self) -> dict:
        keys = ("steps", "method", "guidance", "negative_prompt", "renoise", "height", "width", "grid_power")
        return {k: getattr(self, k) for k in keys}


def _spec(role: str, model: str, s) -> SetSpec:
    return SetSpec(
        role, model, s.steps, s.method, s.guidance, s.negative_prompt, s.renoise, s.height, s.width, s.grid_power
    )


def student_spec(recipe: Recipe, steps: int) -> SetSpec:
    from apexctl.inference import ModelInfo, is_distilled, resolve_model, resolve_sample_settings

    model = resolve_model(recipe, None)
    if recipe.model.lora is not None:
        model += f" + LoRA {Path(recipe.output.dir) / 'lora'}"
    info = ModelInfo(distilled=is_distilled(recipe))
    return _spec("student", model, resolve_sample_settings(recipe, info, steps=steps))


def teacher_spec(recipe: Recipe, steps: int | None, guidance: float | None) -> SetSpec:
    from apexctl.inference import teacher_settings
    from apexctl.models import resolve_model_path

    path = resolve_model_path(recipe.model.path)
    return _spec("teacher", str(path), teacher_settings(recipe, steps=steps, guidance=guidance))


def _load(recipe: Recipe, spec: SetSpec):
    from apexctl.inference import load_trained
    from apexctl.models import load_for_recipe

    return load_trained(recipe) if spec.role == "student" else load_for_recipe(recipe.model, spec.model)


def set_folder(run: Path, spec: SetSpec, prompts: list[str], seeds: list[int]) -> Path:
    key = json.dumps({"spec": asdict(spec), "prompts": prompts, "seeds": seeds}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return Path(run) / "eval" / "samples" / f"{spec.role}-{spec.steps}step-{digest}"


def ensure_set(
    recipe: Recipe,
    spec: SetSpec,
    prompts: list[str],
    *,
    per_prompt: int = 1,
    seed: int = 0,
    batch: int = 16,
    quiet: bool = False,
) -> Path:
    """The folder of ``spec``'s images for ``prompts`` × ``per_prompt``; only missing images are generated."""
    from apexctl.images import save_png
    from apexctl.inference import generate_images
    from apexctl.progress import progress

    texts = [p for p in prompts for _ in range(per_prompt)]
    seeds = [seed + k for _ in prompts for k in range(per_prompt)]
    folder = set_folder(Path(recipe.output.dir), spec, texts, seeds)
    names = [f"{i:05d}.png" for i in range(len(texts))]
    todo = [i for i, n in enumerate(names) if not (folder / n).is_file()]
    if todo:
        write_text(
            folder / "meta.json", json.dumps({**asdict(spec), "n": len(texts), "per_prompt": per_prompt}, indent=1)
        )
        model = _load(recipe, spec)
        with progress(quiet) as bar:
            task = bar.add_task(spec.label, total=len(todo))
            for start in range(0, len(todo), batch):  # save each batch: an interrupted run keeps what it drew
                idx = todo[start : start + batch]
                images = generate_images(
                    model, [texts[i] for i in idx], [seeds[i] for i in idx], batch=batch, **spec.sampler_kwargs()
                )
                for j, i in enumerate(idx):
                    save_png(images[j], folder / names[i])
                bar.advance(task, len(idx))
        del model  # student and teacher may each be a 20B model: never hold both
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    rows = [json.dumps({"file": n, "prompt": t, "seed": s}) for n, t, s in zip(names, texts, seeds, strict=True)]
    write_text(folder / "samples.jsonl", "\n".join(rows) + "\n")
    return folder
