"""Recipes: typed, strict (unknown keys are errors), loaded from YAML with ``--set a.b=value`` overrides.

Sections: model, data, method, train, hardware, sample, output. Every bad value becomes a one-line
:class:`~apexctl.errors.BadInput` naming the file, the key path, the value and what is allowed (exit 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from apexctl.errors import BadInput, read_text
from apexctl.recipe_method import (
    DEFAULT_OBJECTIVE,
    SECTIONS,
    ApexFullMethod,  # noqa: F401  (re-exported: the method sections are part of the recipe)
    ApexMethod,  # noqa: F401
    ApexPaperMethod,  # noqa: F401
    FlowMatchingMethod,  # noqa: F401
    MethodSpec,
    _Strict,
    flat_method,
    switch_objective,
)


def torch_dtype(name: str):
    """``fp32 | bf16 | fp16`` → the torch dtype (imported lazily: reading a recipe needs no torch)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


class LoraSpec(_Strict):
    rank: int = Field(32, gt=0)
    alpha: float = Field(32.0, gt=0)
    targets: list[str] | None = Field(None, description="module names; null = the family's default targets")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init: Literal["default", "gaussian"] = "default"


class ModelSpec(_Strict):
    path: str = Field(description="local model folder, hub id, or tiny:<preset> (built in code, no download)")
    family: Literal["auto", "qwen_image", "sana", "sd3", "flux", "z_image"] = "auto"
    dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="dtype the model loads in; trained weights are kept in fp32 (mixed precision via autocast)"
    )

    lora: LoraSpec | None = Field(None, description="train a LoRA adapter instead of all weights")
    quantize: Literal["none", "int8", "fp8", "nf4"] = Field(
        "none",
        description="LoRA runs: store the frozen base's transformer-block Linear weights in int8 / fp8 (torchao) or "
        "nf4 (bitsandbytes), dequantised in each matmul to model.dtype; the adapter stays fp32 "
        "(docs/quantization.md)",
    )

    @property
    def torch_dtype(self):
        return torch_dtype(self.dtype)


class SynthesizeSpec(_Strict):
    """Teacher synthesis for prompt-only data: each image is the teacher's own multi-step sample (docs/design.md §7)."""

    steps: int = Field(50, gt=0, description="teacher sampler steps")
    guidance: float = Field(4.0, ge=1.0, description="teacher CFG scale")
    negative_prompt: str = ""
    images_per_prompt: int = Field(1, gt=0)
    seed: int = Field(0, description="image k of prompt i uses seed + images_per_prompt·i + k (recorded per sample)")
    batch: int = Field(8, gt=0)
    export_dir: str | None = Field(None, description="also write the images as a metadata.jsonl image folder")
    quantize: Literal["none", "int8", "fp8", "nf4"] = Field(
        "none",
        description="draw with the teacher's transformer blocks quantised (as model.quantize; part of the cache)",
    )
    offload_text_encoder: bool = Field(
        False,
        description="once the prompts are encoded, keep the text encoders in host memory while the teacher draws "
        "(the teacher's prompts are encoded there, the embeddings moved to the GPU): the GPU never holds them and the "
        "denoiser together; not part of the cache",
    )


class DataSpec(_Strict):
    source: Literal["digits", "scenes", "folder", "parquet", "datasets", "hub", "prompts"] = Field(
        "digits",
        description="digits (built in) | scenes (built in: coloured digits at positions, 16×16) | folder (images + metadata.jsonl) | parquet (files/glob) | datasets "
        "(load_from_disk folder) | hub (dataset id) | prompts (.txt/.jsonl; needs data.synthesize)",
    )
    path: str | None = Field(None, description="where the source lives (not used by digits / scenes)")
    split: str = Field("train", description="split of a datasets folder or hub dataset")
    image_column: str = "image"
    text_column: str = "text"
    cache_dir: str = "cache/digits"
    cache_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="storage dtype of latents/embeddings; auto = fp32 for digits, bf16 otherwise"
    )
    shard_size: int = Field(1024, gt=0, description="items per cache shard (the unit of resume)")
    encode_batch: int = Field(64, gt=0, description="images / prompts per encoder call in prepare")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes decoding images in prepare")
    resolution: int = Field(8, gt=0)
    buckets: list[tuple[int, int]] | None = Field(
        None, description="aspect-ratio buckets as [width, height] pairs; null = square crops at resolution"
    )
    min_image_size: int = Field(0, ge=0, description="skip images whose shorter side is smaller")
    max_caption_tokens: int | None = Field(None, gt=0, description="skip captions longer than this; null = family max")
    limit: int | None = Field(None, gt=0, description="encode at most this many items")
    synthesize: SynthesizeSpec | None = Field(None, description="prompt-only data: the teacher makes the images")
    holdout: int = Field(397, gt=0, description="held-out real images for evaluation (digits)")
    cond_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="probability a training prompt is replaced by ''")
    seed: int = 0

    @model_validator(mode="after")
    def _source_fields(self) -> DataSpec:
        if self.source == "scenes" and self.resolution != 16:
            raise ValueError(f"data.resolution = {self.resolution}: data.source = 'scenes' is 16×16 (set 16)")
        if self.source not in ("digits", "scenes") and not self.path:
            raise ValueError(f"data.source = '{self.source}' needs data.path")
        if self.source == "prompts" and self.synthesize is None:
            raise ValueError("data.source = 'prompts' needs data.synthesize (the teacher makes the images)")
        if self.synthesize is not None and self.source != "prompts":
            raise ValueError("data.synthesize is only for data.source = 'prompts'")
        for w, h in self.buckets or []:
            if w <= 0 or h <= 0:
                raise ValueError(f"data.buckets: [{w}, {h}] must be positive")
        return self


class TrainSpec(_Strict):
    steps: int = Field(1000, gt=0)
    micro_batch: int = Field(64, gt=0)
    grad_accum: int = Field(1, gt=0)
    global_batch: int | None = Field(None, gt=0, description="checked against micro_batch × grad_accum × processes")
    lr: float = Field(1e-4, gt=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_min_ratio: float = Field(0.0, ge=0.0, le=1.0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = Field(1.0, gt=0)
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0, description="keep an EMA of the trained weights")
    ema_warmup: bool = Field(
        False, description="ramp the EMA decay from 0 toward ema_decay (d ← d + (1 − d)(target − d)/2 per update)"
    )
    export: Literal["ema", "live", "both"] = Field(
        "ema",
        description="with an EMA: model/ holds the EMA weights (ema), the live ones (live), or EMA + model-live/ (both)",
    )
    seed: int = 0
    optimizer: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="adamw8bit: bitsandbytes' 8-bit AdamW (optimizer states in 8 bits; needs bitsandbytes)"
    )
    skip_nonfinite: bool = Field(
        False, description="skip the optimizer step on a NaN/inf loss or gradient instead of stopping the run"
    )
    max_consecutive_skips: int = Field(10, gt=0, description="with skip_nonfinite: stop after more skips in a row")
    log_every: int = Field(10, gt=0)
    log_with: Literal["none", "tensorboard", "wandb", "mlflow", "trackio"] = Field(
        "none",
        description="also send the metrics, sample grids and eval summaries to a tracker (accelerate's): "
        "tensorboard (RUN/tensorboard), wandb, mlflow (RUN/mlflow unless MLFLOW_TRACKING_URI) or trackio; "
        "needs its package",
    )
    diag_every: int | None = Field(
        None, gt=0, description="every N steps: the critic lag (diag/critic_lag in metrics.jsonl; apex objectives)"
    )
    sample_every: int | None = Field(
        None, gt=0, description="every N steps: 1-step samples of the current model to RUN/samples/step-N.png"
    )
    sample_prompts: list[str] | None = Field(
        None, description="prompts of the sample grids (must be in the cache); null = the cache's first 4 prompts"
    )
    sample_images: int = Field(4, gt=0, description="images per prompt in a sample grid (seeds sample.seed + k)")
    checkpoint_every: int = Field(500, gt=0)
    keep_last: int = Field(2, gt=0)

    @model_validator(mode="after")
    def _warmup(self) -> TrainSpec:
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must not exceed steps ({self.steps})")
        return self


class HardwareSpec(_Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    processes: int = Field(1, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="auto/ddp: replicated weights (DDP when launched on several processes); "
        "fsdp: sharded (torch FSDP2, 2+ processes)",
    )
    gradient_checkpointing: bool = False
    offload: bool = Field(False, description="CPU offload of parameters under FSDP")
    threads: int | None = Field(None, gt=0, description="torch CPU threads")
    offload_activations: bool = Field(
        False,
        description="keep the tensors the training forward saves for backward in (pinned) CPU memory, copied back "
        "in backward (the weights stay; docs/training.md)",
    )
    ema_on_cpu: bool = Field(False, description="keep the EMA shadow in CPU memory and update it there")
    offload_base: bool = Field(
        False,
        description="LoRA runs: keep the frozen base's transformer-block weights in CPU memory and stream each "
        "block to the device for its forward (needs gradient_checkpointing; slower: docs/training.md)",
    )


class SampleSpec(_Strict):
    """How ``apexctl sample``, ``eval *`` and the benches draw this recipe's model (one resolver for all of them:
    ``apexctl.inference.resolve_sample_settings``; command options win over these keys)."""

    steps: int = Field(1, gt=0)
    method: Literal["auto", "one", "few", "euler"] = Field(
        "auto",
        description="auto: 1 step without guidance = one-step; N > 1 steps = few-step for a model trained by an apex* "
        "objective (this run's student), the family's Euler otherwise (a teacher, base model or flow_matching run); "
        "guidance > 1 = Euler with CFG",
    )
    renoise: Literal["stochastic", "deterministic"] = Field(
        "stochastic", description="few-step re-noising: fresh noise from the image's own seed, or the model's ẑ"
    )
    grid_power: float = Field(
        1.0, gt=0.0, description="few-step times t_i = (1 − i/N)^p: 1 = uniform; > 1 puts the later steps at low noise"
    )
    guidance: float = Field(1.0, ge=1.0)
    negative_prompt: str = ""
    height: int | None = Field(None, gt=0, description="null = data.resolution")
    width: int | None = Field(None, gt=0, description="null = data.resolution")
    seed: int = Field(0, description="image k of a prompt uses seed + k (apexctl sample)")
    batch: int = Field(64, gt=0, description="images per forward pass")


class OutputSpec(_Strict):
    dir: str = "runs/digits"
    lora_formats: list[Literal["diffusers", "comfyui"]] = Field(
        default_factory=lambda: ["diffusers"], description="LoRA runs: files written to RUN/lora/ (diffusers always)"
    )


#: ``method.reference: ema`` without ``train.ema_decay``: the reference needs an EMA, kept with this decay
REFERENCE_EMA_DECAY = 0.99


class Recipe(_Strict):
    model: ModelSpec
    data: DataSpec = DataSpec()
    method: MethodSpec = Field(default_factory=ApexFullMethod)
    train: TrainSpec = TrainSpec()
    hardware: HardwareSpec = HardwareSpec()
    sample: SampleSpec = SampleSpec()
    output: OutputSpec = OutputSpec()

    @model_validator(mode="before")
    @classmethod
    def _flat_method(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("method"), dict):
            data = {**data, "method": flat_method(data["method"])}
        return data

    @model_validator(mode="after")
    def _combinations(self) -> Recipe:
        """Settings that are valid alone but not together: refused with one line naming the key (recipe_checks.py)."""
        from apexctl.recipe_checks import check_combinations

        check_combinations(self)
        return self

    @property
    def ema_decay(self) -> float | None:
        """The decay of the EMA training keeps: ``train.ema_decay``; else :data:`REFERENCE_EMA_DECAY` when
        ``method.reference`` is ``ema`` (the reference reads the EMA); else None (no EMA)."""
        if self.train.ema_decay is not None:
            return self.train.ema_decay
        return REFERENCE_EMA_DECAY if "ema" in self.method.references else None

    def dump(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------------------------------------------------------
def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for i, k in enumerate(keys[:-1]):
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        elif not isinstance(nxt, dict):
            raise BadInput(f"--set {dotted}: '{'.'.join(keys[: i + 1])}' is a value, not a section")
        node = nxt
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` → (``a.b``, YAML-typed value)."""
    if "=" not in text:
        raise BadInput(f"--set {text!r}: expected KEY=VALUE, e.g. train.steps=100")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise BadInput(f"--set {text!r}: bad key path {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _allowed(err: dict) -> str:
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        return f"expected {ctx['expected']}"
    msg = err["msg"]
    return msg[0].lower() + msg[1:] if msg else msg


def _section(model: Any, loc: tuple) -> Any:
    """The model class of the section at ``loc`` (the method union resolved by its tag), or None."""
    cls: Any = model
    for part in loc:
        if cls is Recipe and part == "method":
            cls = SECTIONS
            continue
        if isinstance(cls, dict):  # the method union: the tag names the section
            cls = cls.get(part)
            continue
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        cls = ann
    return cls if isinstance(cls, type) else None


def _key_path(loc: tuple) -> str:
    """Dotted key path of an error location; the method union's tag (``method.apex.x``) is not a key."""
    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] == "method" and parts[1] in SECTIONS:
        del parts[1]
    return ".".join(parts)


def _blame(path: str, source: str, overrides: dict[str, str]) -> str:
    """``--set KEY=VALUE`` when that override set the key at fault (or a section around it), else the file."""
    for key, text in overrides.items():
        if path and (path == key or path.startswith(key + ".") or key.startswith(path + ".")):
            return f"--set {text}"
    return source


def validate_recipe(tree: dict, source: str = "recipe", overrides: dict[str, str] | None = None) -> Recipe:
    """A recipe from its YAML tree; any bad value → one-line :class:`BadInput` naming the key and what is allowed,
    blamed on ``--set KEY=VALUE`` when one of ``overrides`` (key → its ``--set`` text) set that key."""
    overrides = overrides or {}
    try:
        return Recipe.model_validate(tree)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        path = _key_path(loc)
        more = f" (and {len(exc.errors()) - 1} more error(s))" if len(exc.errors()) > 1 else ""
        if err["type"] == "extra_forbidden":
            section = _section(Recipe, loc[:-1])
            keys = ", ".join(section.model_fields) if section is not None else ""
            where = _blame(path, source, overrides)
            raise BadInput(f"{where}: unknown key '{path}'" + (f"; allowed here: {keys}" if keys else "")) from None
        if err["type"] == "missing":
            raise BadInput(f"{source}: missing required key '{path}'") from None
        if err["type"] == "union_tag_invalid":  # method.objective
            path = f"{path}.objective" if path else "objective"
            expected = err["ctx"]["expected_tags"].rsplit(", ", 1)
            allowed = " or ".join(expected)
            value = err["ctx"]["tag"]
            raise BadInput(f"{_blame(path, source, overrides)}: {path} = {value!r}: expected {allowed}") from None
        if err["type"] == "value_error":  # a cross-key check: its message already names the keys
            msg = err["msg"].removeprefix("Value error, ")
            cause = (err.get("ctx") or {}).get("error")
            where = _blame(getattr(cause, "path", None) or path, source, overrides)  # path: the section checked
            raise BadInput(f"{where}: {msg}{more}") from None
        value = err.get("input")
        raise BadInput(f"{_blame(path, source, overrides)}: {path} = {value!r}: {_allowed(err)}{more}") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply ``--set`` overrides, validate strictly.

    ``--set method.objective=X`` on a recipe written for another objective drops the file's keys that X has not
    (they configure the objective being replaced); keys given with ``--set`` are always checked."""
    p = Path(path)
    if p.is_dir():
        raise BadInput(f"recipe {p}: is a directory (expected a YAML file, e.g. recipes/digits.yaml)")
    if not p.is_file():
        raise BadInput(f"recipe not found: {p}")
    try:
        tree = yaml.safe_load(read_text(p, "recipe")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise BadInput(f"{p}:{where} is not valid YAML") from None
    if not isinstance(tree, dict):
        raise BadInput(f"{p}: a recipe must be a mapping of sections (model, data, method, train, ...)")
    method = tree.get("method")
    file_keys = set(method) if isinstance(method, dict) else set()
    file_objective = method.get("objective", DEFAULT_OBJECTIVE) if isinstance(method, dict) else DEFAULT_OBJECTIVE
    given: dict[str, str] = {}
    for item in overrides or []:
        key, value = parse_override(item)
        _set_path(tree, key, value)
        given[key] = item
    method = tree.get("method")
    if "method.objective" in given and isinstance(method, dict) and method.get("objective") != file_objective:
        set_keys = {k.split(".")[1] for k in given if k.startswith("method.")}
        switch_objective(method, file_keys, set_keys)
    return validate_recipe(tree, str(p), given)
