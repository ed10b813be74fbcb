"""``apexctl sample``: prompts → PNGs and a grid, from a trained run, a model folder or a recipe."""

from __future__ import annotations

import json
import re
from pathlib import Path

from apexctl.errors import BadInput
from apexctl.recipe import Recipe


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "empty"


def resolve_model(recipe: Recipe | None, model: str | None) -> str:
    """The model folder to sample: ``--model``, else the recipe's trained ``model/`` (or its base for a LoRA run)."""
    if model is not None:
        return model
    assert recipe is not None
    run = Path(recipe.output.dir)
    if recipe.model.lora is not None:
        if not (run / "lora").is_dir():
            raise BadInput(f"{run / 'lora'}: no trained LoRA yet for this recipe; run `apexctl distill` first")
        return recipe.model.path
    trained = run / "model"
    if not trained.is_dir():
        raise BadInput(f"{trained}: no trained model yet for this recipe; run `apexctl distill` first or pass --model")
    return str(trained)


def load_trained(recipe: Recipe, model: str | None = None):
    """The recipe's trained model as a Backbone: ``model/``, or the base with ``lora/`` attached."""
    from apexctl.models import load_for_recipe

    backbone = load_for_recipe(recipe.model, resolve_model(recipe, model))
    if model is None and recipe.model.lora is not None:
        backbone.load_lora(Path(recipe.output.dir) / "lora")
    return backbone


def load_sampling_model(recipe: Recipe | None, model: str | None, lora: Path | None = None):
    """(Backbone, description) to sample: ``--lora`` (a run folder, base from its recipe, or a LoRA folder with the
    base from ``--model`` or the recipe), else ``load_trained`` for a recipe, else the ``--model`` folder itself."""
    from apexctl.models import load_backbone, load_for_recipe

    if lora is not None:
        from apexctl.merge import resolve_lora

        base = model or (recipe.model.path if recipe is not None else None)
        if base is None and not (Path(lora) / "lora").is_dir():
            raise BadInput(f"--lora {lora}: a LoRA folder without its run needs --model BASE")
        folder, base = resolve_lora(Path(lora), base)
        backbone = load_for_recipe(recipe.model, base) if recipe is not None else load_backbone(base)
        backbone.load_lora(folder)
        return backbone, f"{base} + LoRA {folder}"
    path = resolve_model(recipe, model)
    backbone = load_trained(recipe, model) if recipe is not None else load_backbone(path)
    lora_dir = Path(recipe.output.dir) / "lora" if recipe is not None and recipe.model.lora and model is None else None
    return backbone, f"{path} + LoRA {lora_dir}" if lora_dir else path


def run_sample(
    prompts: list[str],
    *,
    recipe: Recipe | None,
    model: str | None,
    steps: int | None,
    method: str | None,
    guidance: float | None,
    seed: int,
    num_images: int,
    out: Path | None,
    size: int | None,
    quiet: bool = False,
) -> Path:
    from apexctl.generate import generate_images
    from apexctl.images import save_grid, save_png

    spec = recipe.sample if recipe is not None else None
    path = resolve_model(recipe, model)
    if size is None:
        if spec is not None and spec.height:
            size = spec.height
        elif recipe is not None:
            size = recipe.data.resolution
        else:
            raise BadInput("--size is needed when the model has no recipe next to it")
    steps = steps or (spec.steps if spec else 1)
    guidance = guidance if guidance is not None else (spec.guidance if spec else 1.0)
    backbone, _ = load_sampling_model(recipe, model)
    all_prompts = [p for p in prompts for _ in range(num_images)]
    seeds = [seed + k for _ in prompts for k in range(num_images)]
    images = generate_images(
        backbone,
        all_prompts,
        seeds,
        height=size,
        width=size,
        steps=steps,
        method=method or (spec.method if spec else "auto"),
        guidance=guidance,
        negative_prompt=spec.negative_prompt if spec else "",
        renoise=spec.renoise if spec else "stochastic",
        quiet=quiet,
    )
    if out is not None:
        folder = out
    elif recipe is not None and model is None:
        folder = Path(recipe.output.dir) / "samples"
    else:
        folder = Path(path).parent / "samples" if Path(path).is_dir() else Path("samples")
    folder.mkdir(parents=True, exist_ok=True)
    for i, (p, s) in enumerate(zip(all_prompts, seeds, strict=True)):
        save_png(images[i], folder / f"{i:03d}_{_slug(p)}_seed{s}.png")
    upscale = max(1, 64 // size)
    save_grid(images, nrow=num_images, path=folder / "grid.png", upscale=upscale, labels=list(prompts))
    (folder / "samples.json").write_text(
        json.dumps({"model": path, "steps": steps, "guidance": guidance, "prompts": prompts, "seeds": seeds}, indent=1)
    )
    return folder
