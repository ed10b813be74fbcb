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

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from apexctl.atomic import write_text
from apexctl.errors import BadInput
from apexctl.ranks import Ranks
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
    quantize: str = "none"  # --quantize: the base's transformer blocks quantised (inference/models.quantized)

    @property
    def label(self) -> str:
        cfg = f", CFG {self.guidance:g}" if self.guidance > 1.0 else ""
        base = f", {self.quantize} base" if self.quantize != "none" else ""
        return f"{self.role} {self.steps} step{'s' if self.steps > 1 else ''}{cfg}{base}"

    def sampler_kwargs(self) -> dict:
        keys = ("steps", "method", "guidance", "negative_prompt", "renoise", "height", "width", "grid_power")
        return {k: getattr(self, k) for k in keys}


def _spec(role: str, model: str, s, quantize: str) -> SetSpec:
    return SetSpec(
        role,
        model,
        s.steps,
        s.method,
        s.guidance,
        s.negative_prompt,
        s.renoise,
        s.height,
        s.width,
        s.grid_power,
        quantize,
    )


def student_spec(recipe: Recipe, steps: int, quantize: str = "none") -> SetSpec:
    from apexctl.inference import ModelInfo, is_distilled, resolve_model, resolve_sample_settings

    model = resolve_model(recipe, None)
    if recipe.model.lora is not None:
        model += f" + LoRA {Path(recipe.output.dir) / 'lora'}"
    info = ModelInfo(distilled=is_distilled(recipe))
    return _spec("student", model, resolve_sample_settings(recipe, info, steps=steps), quantize)


def teacher_spec(recipe: Recipe, steps: int | None, guidance: float | None, quantize: str = "none") -> SetSpec:
    from apexctl.inference import teacher_settings
    from apexctl.models import resolve_model_path

    path = resolve_model_path(recipe.model.path)
    return _spec("teacher", str(path), teacher_settings(recipe, steps=steps, guidance=guidance), quantize)


def _load(recipe: Recipe, spec: SetSpec, device):
    from apexctl.inference import load_trained
    from apexctl.inference.models import quantized
    from apexctl.models import load_for_recipe

    if spec.role == "student":
        return load_trained(recipe, quantize=spec.quantize, device=device)
    return quantized(load_for_recipe(recipe.model, spec.model), spec.quantize, device)


def set_folder(run: Path, spec: SetSpec, prompts: list[str], seeds: list[int]) -> Path:
    fields = asdict(spec)
    if spec.quantize == "none":
        del fields["quantize"]  # the folders drawn before --quantize keep their names
    key = json.dumps({"spec": fields, "prompts": prompts, "seeds": seeds}, sort_keys=True)
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
    ranks: Ranks | None = None,
    quiet: bool = False,
) -> Path:
    """The folder of ``spec``'s images for ``prompts`` × ``per_prompt``; only missing images are generated, split
    across ``ranks`` (inference/draw.py: the same images on any number of processes)."""
    from apexctl.inference.draw import ImageJob, draw_jobs

    ranks = ranks or Ranks()
    texts = [p for p in prompts for _ in range(per_prompt)]
    seeds = [seed + k for _ in prompts for k in range(per_prompt)]
    folder = set_folder(Path(recipe.output.dir), spec, texts, seeds)
    names = [f"{i:05d}.png" for i in range(len(texts))]
    jobs = [ImageJob(folder / n, t, s) for n, t, s in zip(names, texts, seeds, strict=True)]

    def record() -> None:
        meta = {**asdict(spec), "n": len(texts), "per_prompt": per_prompt}
        write_text(folder / "meta.json", json.dumps(meta, indent=1))

    draw_jobs(
        jobs,
        load=lambda: _load(recipe, spec, ranks.device),
        sampler_kwargs=spec.sampler_kwargs(),
        batch=batch,
        ranks=ranks,
        label=spec.label,
        quiet=quiet,
        before_drawing=record,
    )
    if ranks.main:
        rows = [json.dumps({"file": n, "prompt": t, "seed": s}) for n, t, s in zip(names, texts, seeds, strict=True)]
        write_text(folder / "samples.jsonl", "\n".join(rows) + "\n")
    ranks.barrier()  # every rank can read the finished folder
    return folder
