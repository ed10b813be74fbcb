"""One meaning for the sample settings: every command and bench that draws images resolves them here.

Precedence, field by field: the command's own option, then the recipe's ``sample`` section, then the model.
Without a recipe the ``sample`` section's defaults apply (``SampleSpec()``), so a bare model folder and a recipe
that leaves a key out mean the same thing.

- size: ``--size`` (height = width), else ``sample.height`` and ``sample.width``, each defaulting to the recipe's
  ``data.resolution`` (the size it trained at); without a recipe, the model's native size (what its stock diffusers
  pipeline draws, ``Backbone.native_size``).
- ``method: auto`` (:func:`resolve_method`): 1 step without guidance → the one-step map; more steps without guidance
  → the few-step sampler for a distilled student (a model trained by an ``apex*`` objective: the run's own
  ``model/`` or ``lora/``), the family's Euler for anything else (a teacher, a base model, a ``flow_matching`` run);
  guidance > 1 → Euler with classifier-free guidance (the teacher rows of every eval).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from apexctl.engine.sampler import Method, Renoise
from apexctl.errors import BadInput
from apexctl.recipe import Recipe, SampleSpec, load_recipe

#: objectives whose trained model is a one/few-step student (``auto`` → few-step for N > 1 steps)
DISTILLED_OBJECTIVES = ("apex", "apex_full", "apex_paper")
#: Euler steps of an eval's teacher row when neither the command nor ``data.synthesize`` gives them
TEACHER_STEPS = 50


@dataclass(frozen=True)
class ModelInfo:
    """What the defaults need from the model being sampled."""

    native_size: int | None = None  # image side its stock pipeline defaults to (None: unknown)
    distilled: bool = False  # trained by an apex* objective


@dataclass(frozen=True)
class SampleSettings:
    """Resolved settings: every field set, ``method`` never ``auto``."""

    height: int
    width: int
    steps: int
    method: Method
    guidance: float
    negative_prompt: str
    renoise: Renoise
    grid_power: float
    seed: int
    batch: int

    def sampler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``generate_images`` (everything but the seed)."""
        kw = asdict(self)
        kw.pop("seed")
        return kw


def is_distilled(recipe: Recipe | None) -> bool:
    """Whether the recipe trains a one/few-step student."""
    return recipe is not None and recipe.method.objective in DISTILLED_OBJECTIVES


def model_info(backbone: Any, *, distilled: bool) -> ModelInfo:
    """``ModelInfo`` of a loaded Backbone (``native_size`` from its configs)."""
    native = getattr(backbone, "native_size", None)
    return ModelInfo(native_size=native() if callable(native) else None, distilled=distilled)


METHODS = ("auto", "one", "few", "euler")


def check_method(method: str | None, guidance: float | None = None, where: str = "--method") -> None:
    """A method name (``None``: not given) is one of :data:`METHODS`; the one- and few-step samplers take no
    guidance, so with ``guidance > 1`` only ``euler`` or ``auto`` is accepted (else the images would be unguided
    while their settings say guided)."""
    if method is None:
        return
    if method not in METHODS:
        raise BadInput(f"{where} {method!r}: expected one of {', '.join(METHODS)}")
    if method in ("one", "few") and guidance is not None and guidance > 1.0:
        raise BadInput(f"{where} {method} with guidance {guidance:g}: only euler (or auto) uses guidance")


def resolve_method(method: str, steps: int, guidance: float, distilled: bool) -> Method:
    """The one meaning of ``auto`` (module docstring); any other method is checked and returned as given."""
    if method != "auto":
        check_method(method, guidance, "sample method")
        return method  # type: ignore[return-value]
    if guidance > 1.0:
        return "euler"
    if steps == 1:
        return "one"
    return "few" if distilled else "euler"


def resolve_sample_settings(
    recipe: Recipe | None,
    model: ModelInfo,
    *,
    size: int | None = None,
    steps: int | None = None,
    method: str | None = None,
    guidance: float | None = None,
    negative_prompt: str | None = None,
    renoise: Renoise | None = None,
    seed: int | None = None,
    batch: int | None = None,
    what: str = "the model",
) -> SampleSettings:
    """Settings for one command: its options (None = not given), then ``recipe.sample``, then ``model``
    (``what`` names the model in the error when no size can be found)."""
    spec = recipe.sample if recipe is not None else SampleSpec()
    fallback = recipe.data.resolution if recipe is not None else model.native_size
    height, width = (size, size) if size is not None else (spec.height or fallback, spec.width or fallback)
    if height is None or width is None:
        raise BadInput(f"{what}: pass --size (no recipe next to it, and its configs name no native image size)")
    steps = steps or spec.steps
    guidance = guidance if guidance is not None else spec.guidance
    return SampleSettings(
        height=int(height),
        width=int(width),
        steps=steps,
        method=resolve_method(method or spec.method, steps, guidance, model.distilled),
        guidance=guidance,
        negative_prompt=negative_prompt if negative_prompt is not None else spec.negative_prompt,
        renoise=renoise or spec.renoise,
        grid_power=spec.grid_power,
        seed=seed if seed is not None else spec.seed,
        batch=batch or spec.batch,
    )


def teacher_run_sample(teacher_dir: str | Path) -> SampleSpec:
    """The teacher's own ``sample`` section: that of the run that trained it (``RUN/recipe.yaml`` next to
    ``RUN/model``), else the defaults."""
    rec = Path(teacher_dir).parent / "recipe.yaml"
    if Path(teacher_dir).is_dir() and rec.is_file():
        return load_recipe(rec).sample
    return SampleSpec()


def teacher_settings(
    recipe: Recipe,
    *,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int | None = None,
    batch: int | None = None,
) -> SampleSettings:
    """An eval's teacher row for ``recipe``: ``model.path`` drawn with the family's Euler and CFG at the student's
    size, negative prompt and seeds. Defaults: ``data.synthesize``'s steps and guidance when the run trained on
    teacher samples, else ``TEACHER_STEPS`` and the guidance of the teacher run's own recipe."""
    from apexctl.models import resolve_model_path

    synth = recipe.data.synthesize
    if steps is None:
        steps = synth.steps if synth is not None else TEACHER_STEPS
    if guidance is None:
        guidance = (
            synth.guidance if synth is not None else teacher_run_sample(resolve_model_path(recipe.model.path)).guidance
        )
    student = resolve_sample_settings(recipe, ModelInfo(), seed=seed, batch=batch)
    return replace(student, steps=steps, method="euler", guidance=guidance)
