"""What a run hands to users: the LoRA (diffusers, optionally ComfyUI) or a complete model folder — written at the
end of training and, by ``apexctl export``, from any complete checkpoint (by default the newest one that loads).

A checkpoint is accelerate's ``save_state`` folder: ``model.safetensors`` (the denoiser's state dict, adapter keys
included; the adapter alone for a run with a quantised base) and one pickle per registered object; the EMA is found
by its content (``{"decay", "shadow"}``), not by its registration index, so the export does not depend on the
trainer's registration order.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

from apexctl.errors import BadInput
from apexctl.recipe import Recipe
from apexctl.training import checkpoint as ckpt

Weights = Literal["ema", "live"]


def write_export(backbone, recipe: Recipe, folder: Path, model_dir: str | Path) -> Path:
    """LoRA runs: the adapter in diffusers format (+ ComfyUI when asked), the base's quantisation recorded in its
    ``apexctl_lora.json`` (the LoRA itself is a plain one); full runs: a complete model folder."""
    if recipe.model.lora is not None:
        info = {"trained_on_quantized_base": recipe.model.quantize} if recipe.model.quantize != "none" else None
        return backbone.save_lora(folder, comfyui="comfyui" in recipe.output.lora_formats, info=info)
    backbone.save_pretrained(folder, source=model_dir)
    return folder


def find_checkpoint(run: Path, which: str) -> tuple[int, Path]:
    """``step-N`` / ``N``, or a checkpoint folder → (step, folder) of that complete checkpoint (``latest``: the newest
    complete one; :func:`export_checkpoint` then passes over any that does not load)."""
    done = ckpt.complete_checkpoints(run)
    if which == "latest":
        if not done:
            raise BadInput(f"{run}: no complete checkpoint under {run / 'checkpoints'}")
        return done[-1]
    p = Path(which)
    if p.is_dir():
        if not (p / ckpt.COMPLETE).is_file():
            raise BadInput(f"--checkpoint {which}: not a complete checkpoint (no {ckpt.COMPLETE} marker)")
        step = int(p.name.removeprefix("step-")) if p.name.removeprefix("step-").isdigit() else 0
        return step, p
    step = which.removeprefix("step-")
    if not step.isdigit():
        raise BadInput(f"--checkpoint {which!r}: expected latest, step-N, N or a checkpoint folder")
    for s, folder in done:
        if s == int(step):
            return s, folder
    have = ", ".join(str(s) for s, _ in done) or "none"
    raise BadInput(f"--checkpoint {which}: no complete checkpoint at step {int(step)} in {run} (complete: {have})")


def _ema_state(folder: Path) -> dict | None:
    for pkl in sorted(folder.glob("custom_checkpoint_*.pkl")):
        state = torch.load(pkl, map_location="cpu", weights_only=False)
        if isinstance(state, dict) and set(state) >= {"decay", "shadow"}:
            return state
    return None


@torch.no_grad()
def _load_into(transformer: torch.nn.Module, folder: Path, weights: Weights, *, trained_only: bool = False) -> None:
    """The checkpoint's live weights, then (``ema``) its EMA shadows, into ``transformer``; BadInput when the
    checkpoint is not this run's model; any reader error for a damaged file. ``trained_only``: a run with a quantised
    base, whose checkpoints hold the trained tensors alone (training/checkpoint.py); they go onto the unquantised
    base, which a LoRA export does not write anyway."""
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    result = transformer.load_state_dict(state, strict=False)
    if trained_only:
        missing = [n for n, p in transformer.named_parameters() if p.requires_grad and n not in state]
    else:
        missing = result.missing_keys
    if missing or result.unexpected_keys:
        what = "of its trained tensors " if trained_only else ""
        raise BadInput(
            f"{folder}/model.safetensors does not match the run's model ({len(missing)} {what}missing, "
            f"{len(result.unexpected_keys)} unexpected keys, e.g. {(missing or result.unexpected_keys)[0]!r})"
        )
    _load_ema(transformer, folder, weights)


@torch.no_grad()
def _load_ema(transformer: torch.nn.Module, folder: Path, weights: Weights) -> None:
    """``ema``: the checkpoint's EMA shadows over ``transformer``'s trained parameters."""
    if weights == "ema":
        ema = _ema_state(folder)
        if ema is None:
            raise BadInput(f"{folder}: this run kept no EMA (train.ema_decay unset); use --weights live")
        trained = [p for p in transformer.parameters() if p.requires_grad]
        if len(trained) != len(ema["shadow"]):
            raise BadInput(f"{folder}: the EMA holds {len(ema['shadow'])} tensors, the model trains {len(trained)}")
        for p, s in zip(trained, ema["shadow"], strict=True):
            p.copy_(s.to(p.dtype))


def _problem(load: Callable[[Path], None], folder: Path) -> str | None:
    """None when ``folder`` passes the cheap check and ``load(folder)`` succeeds, else why not."""
    problem = ckpt.check_loadable(folder)
    if problem is not None:
        return problem
    try:
        load(folder)
    except BadInput:
        raise
    except Exception as exc:  # a damaged or vanished file (e.g. pruned by a running training meanwhile)
        first = str(exc).splitlines()[0] if str(exc) else ""
        return f"{type(exc).__name__}: {first}".rstrip(": ")
    return None


def load_checkpoint(run: Path, which: str, load: Callable[[Path], None]) -> tuple[int, Path]:
    """Run ``load`` on the checkpoint ``which`` names; returns its (step, folder).

    ``latest`` takes the newest checkpoint that loads: a damaged one (truncated, or left without weights) is passed
    over with a warning naming it; the list is read again after each failure, so a checkpoint a running training
    wrote meanwhile is seen, and one it pruned meanwhile is skipped. A named checkpoint that does not load is bad
    input."""
    if which != "latest":
        step, folder = find_checkpoint(run, which)
        problem = _problem(load, folder)
        if problem is not None:
            raise BadInput(f"--checkpoint {which}: {folder} does not load ({problem})")
        return step, folder
    tried: set[Path] = set()
    bad: list[str] = []
    while todo := [c for c in reversed(ckpt.complete_checkpoints(run)) if c[1] not in tried]:
        step, folder = todo[0]
        tried.add(folder)
        problem = _problem(load, folder)
        if problem is None:
            return step, folder
        bad.append(f"{folder.name}: {problem}")
        ckpt.warn(f"checkpoint {folder} does not load ({problem}); trying the next newest")
    if not bad:
        raise BadInput(f"{run}: no complete checkpoint under {run / 'checkpoints'}")
    raise BadInput(f"{run}: no checkpoint loads ({'; '.join(bad)})")


def export_checkpoint(run: Path, which: str = "latest", weights: Weights = "ema", out: Path | None = None) -> Path:
    """Rebuild the trained denoiser of ``run`` at a checkpoint (live or EMA weights) and write its export."""
    from apexctl.lora import make_trainable
    from apexctl.models import load_for_recipe, resolve_model_path
    from apexctl.recipe import load_recipe

    run = Path(run)
    if not (run / "recipe.yaml").is_file():
        raise BadInput(f"{run}: not a run folder (no recipe.yaml)")
    if weights not in ("ema", "live"):
        raise BadInput(f"--weights {weights!r}: expected ema or live")
    recipe = load_recipe(run / "recipe.yaml")
    find_checkpoint(run, which)  # no checkpoint, or a bad --checkpoint, is refused before the model is loaded
    model_dir = resolve_model_path(recipe.model.path)
    backbone = load_for_recipe(recipe.model, model_dir, load_text_encoder=False, load_codec=False)
    make_trainable(backbone, recipe.model.lora)  # as trained: the same parameters, the same dtypes
    # a quantised base is not in the checkpoint, and not needed here
    trained_only = recipe.model.quantize != "none"
    step, _ = load_checkpoint(
        run, which, lambda folder: _load_into(backbone.transformer, folder, weights, trained_only=trained_only)
    )
    kind = "lora" if recipe.model.lora is not None else "model"
    out = Path(out) if out is not None else run / "exports" / f"step-{step:06d}-{kind}-{weights}"
    return write_export(backbone, recipe, out, model_dir)
