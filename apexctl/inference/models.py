"""Which model a command samples, and which recipe's ``sample`` settings go with it.

A command names its model with ``--recipe R`` (R's trained ``output.dir/model``, or its base with
``output.dir/lora``), ``--model X`` (a model folder, a run folder, ``RUN/model`` — the run's ``recipe.yaml`` is then
used — or ``tiny:<preset>``), ``--lora`` (a LoRA run or folder), or nothing (the newest run under ``./runs``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from apexctl.errors import BadInput
from apexctl.recipe import Recipe, load_recipe


class Loaded(NamedTuple):
    backbone: Any  # apexctl.models.Backbone (not imported here: loading is lazy)
    description: str
    trained: bool  # the recipe's own training result (its model/, or its base with its lora/)


def run_recipe(run: Path, overrides: list[str] | None = None) -> Recipe:
    """The recipe of run folder ``run`` with ``output.dir`` pointing at it (wherever it was trained)."""
    recipe = load_recipe(run / "recipe.yaml", overrides)
    recipe.output.dir = str(run)
    return recipe


def is_run(folder: Path) -> bool:
    """A run folder: ``recipe.yaml`` and a trained ``model/`` or ``lora/``."""
    return (folder / "recipe.yaml").is_file() and ((folder / "model").is_dir() or (folder / "lora").is_dir())


def run_of(model: str) -> Path | None:
    """The run folder ``--model`` names: the folder itself (``RUN``) or its parent (``RUN/model``)."""
    path = Path(model)
    if model.startswith("tiny:") or not path.is_dir():
        return None
    if is_run(path):
        return path
    if path.name == "model" and (path.parent / "recipe.yaml").is_file():
        return path.parent
    return None


def newest_run(root: Path = Path("runs")) -> Path:
    """The run under ``root`` trained last: a folder with ``model/`` (full runs) or ``lora/`` (LoRA runs)."""

    def trained(run: Path) -> Path | None:
        return next((run / d for d in ("model", "lora") if (run / d).is_dir()), None)

    runs = [p for p in root.glob("*") if trained(p) is not None] if root.is_dir() else []
    if not runs:
        raise BadInput(f"no trained model found under ./{root}; pass --model FOLDER or --recipe RECIPE")
    return max(runs, key=lambda p: trained(p).stat().st_mtime)  # type: ignore[union-attr]


def check_model_folder(model: str, option: str = "--model") -> None:
    """A one-line error for a ``--model`` folder that does not exist or is empty (before anything loads)."""
    if model.startswith("tiny:"):
        return
    path = Path(model)
    if not path.exists():
        raise BadInput(f"{option} {model}: no such folder")
    if not path.is_dir():
        raise BadInput(f"{option} {model}: not a folder (a model is a diffusers folder with model_index.json)")
    if not any(path.iterdir()):
        raise BadInput(f"{option} {model}: the folder is empty (expected a diffusers model folder)")


def locate(
    recipe: Recipe | None, model: str | None, overrides: list[str] | None = None
) -> tuple[Recipe | None, str | None]:
    """(recipe, model) for a command: ``--model RUN`` / ``RUN/model`` becomes that run's recipe (model None: its
    trained model); no recipe and no model is the newest run under ``./runs``; a plain folder is checked."""
    if recipe is None and model is None:
        run = newest_run()
        if (run / "recipe.yaml").is_file():
            return run_recipe(run, overrides), None
        return None, str(run / "model")
    if recipe is None and model is not None:
        run = run_of(model)
        if run is not None:
            return run_recipe(run, overrides), None
        check_model_folder(model)
    return recipe, model


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


def quantized(backbone, quantize: str, device=None):
    """``backbone`` with its transformer blocks quantised by ``quantize`` (``--quantize``: none | int8 | fp8 | nf4,
    docs/quantization.md), each layer quantised on ``device`` (the bf16 blocks never need to fit there together);
    before any LoRA is attached, which then goes on top of the quantised layers as in a quantised training run."""
    from apexctl.models.quantize import quantize_backbone

    quantize_backbone(backbone, quantize, key="--quantize", device=device)
    return backbone


def describe_base(description: str, quantize: str) -> str:
    """A model's description with its base's quantisation (what a folder's record tells apart)."""
    return description if quantize == "none" else f"{description} ({quantize} base)"


def load_trained(recipe: Recipe, model: str | None = None, *, quantize: str = "none", device=None):
    """The recipe's trained model as a Backbone: ``model/``, or the base with ``lora/`` attached; ``quantize``:
    its transformer blocks (a LoRA's base) quantised first (:func:`quantized`)."""
    from apexctl.models import load_for_recipe

    backbone = quantized(load_for_recipe(recipe.model, resolve_model(recipe, model)), quantize, device)
    if model is None and recipe.model.lora is not None:
        backbone.load_lora(Path(recipe.output.dir) / "lora")
    return backbone


def samples_trained(recipe: Recipe | None, model: str | None, lora: Path | None = None) -> bool:
    """Whether ``load_sampling_model`` gives the recipe's own training result (a student when it is distilled)."""
    if recipe is None:
        return False
    if lora is not None:
        return (Path(lora) / "recipe.yaml").is_file() or model is None
    return model is None or Path(model).absolute() == (Path(recipe.output.dir) / "model").absolute()


def load_sampling_model(
    recipe: Recipe | None, model: str | None, lora: Path | None = None, *, quantize: str = "none", device=None
) -> Loaded:
    """The model to sample: ``--lora`` (a run folder, base from its recipe, or a LoRA folder with the base from
    ``--model`` or the recipe), else ``load_trained`` for a recipe, else the ``--model`` folder itself; ``quantize``:
    the base's transformer blocks quantised on ``device`` before any LoRA goes on (:func:`quantized`)."""
    from apexctl.models import load_backbone, load_for_recipe

    trained = samples_trained(recipe, model, lora)
    if lora is not None:
        from apexctl.merge import resolve_lora

        base = model or (recipe.model.path if recipe is not None else None)
        if base is None and not (Path(lora) / "lora").is_dir():
            raise BadInput(f"--lora {lora}: a LoRA folder without its run needs --model BASE")
        folder, base = resolve_lora(Path(lora), base)
        backbone = load_for_recipe(recipe.model, base) if recipe is not None else load_backbone(base)
        quantized(backbone, quantize, device).load_lora(folder)
        return Loaded(backbone, describe_base(f"{base} + LoRA {folder}", quantize), trained)
    path = resolve_model(recipe, model)
    if recipe is not None:
        backbone = load_trained(recipe, model, quantize=quantize, device=device)
    else:
        backbone = quantized(load_backbone(path), quantize, device)
    lora_dir = Path(recipe.output.dir) / "lora" if recipe is not None and recipe.model.lora and model is None else None
    return Loaded(backbone, describe_base(f"{path} + LoRA {lora_dir}" if lora_dir else path, quantize), trained)
