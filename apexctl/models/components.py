"""A Backbone made of a stock diffusers pipeline's components, each family declaring them as a table
(docs/design.md §4).

A family adapter lists its folder's components as ``Part`` rows (subfolder, library and class; tokenizer size
floor; whether a local folder may lack it); ``PipelineBackbone`` derives from that table the constructor, loading
(``from_pretrained``), saving (``_write_components``: frozen parts hard-linked, ``model_index.json`` for the stock
pipeline), the frozen set and a components-only stock pipeline for prompt encoding. The adapter keeps only what
really differs: conventions (packing, timestep scale, sign), prompt encoding, guidance and schedule.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from apexctl.errors import BadInput
from apexctl.hub import link_tree, load_component, load_tokenizer, write_json
from apexctl.models.base import Backbone

#: roles whose components stay frozen (hard-linked from a source folder on save, eval mode always)
FROZEN_ROLES = ("text_encoder", "tokenizer", "vae")
#: roles loaded only with ``load_text_encoder``
TEXT_ROLES = ("text_encoder", "tokenizer")


def prompt_list(prompts: str | list[str]) -> list[str]:
    """A fresh list of prompts (some pipelines rewrite the list they are given in place)."""
    return [prompts] if isinstance(prompts, str) else list(prompts)


@dataclass(frozen=True)
class Part:
    """One component of a family's pipeline folder.

    ``name`` is the subfolder and the ``model_index.json`` key; its role is the name without a ``_2``/``_3``
    suffix (``transformer``, ``scheduler``, ``text_encoder``, ``tokenizer`` or ``vae``). The adapter holds it as
    the attribute ``name`` (the ``vae`` as ``codec``).
    """

    name: str
    library: str  # "diffusers" | "transformers"
    cls: str  # the class in that library that loads it
    #: tokenizers: one with at most this many tokens is refused (an uncached hub id loads empty offline)
    min_tokens: int = 100
    #: a local folder without this subfolder has no such part (SD3 runs without T5); None: required
    present_if: str | None = None
    #: schedulers: other classes a folder may name (any other is refused); empty: always load ``cls``
    alternatives: tuple[str, ...] = ()

    @property
    def role(self) -> str:
        return self.name.rstrip("_0123456789")

    @property
    def attr(self) -> str:
        return "codec" if self.role == "vae" else self.name

    def klass(self, name: str | None = None) -> Any:
        return getattr(importlib.import_module(self.library), name or self.cls)

    def load(self, path: str, dtype: torch.dtype) -> Any:
        """This part of the folder or hub id ``path``, or None where ``present_if`` says a local folder lacks it.

        Raises ``BadInput`` (one line naming ``path`` and the subfolder) when it cannot be loaded."""
        if self.present_if and Path(path).is_dir() and not (Path(path) / self.present_if).is_dir():
            return None
        sub = self.name
        if self.role == "tokenizer":
            return load_tokenizer(path, sub, lambda: self.klass().from_pretrained(path, subfolder=sub), self.min_tokens)
        if self.role == "scheduler":
            config = load_component(path, sub, lambda: self.klass().load_config(path, subfolder=sub))
            name = config.get("_class_name")
            if not self.alternatives:
                name = self.cls  # as ``<cls>.from_pretrained`` would, whatever the folder names
            elif name not in (self.cls, *self.alternatives):
                allowed = ", ".join((self.cls, *self.alternatives))
                raise BadInput(f"{path}: scheduler {name!r} is not supported (allowed: {allowed})")
            return self.klass(name).from_config(config)
        dtype_key = "torch_dtype" if self.library == "diffusers" else "dtype"
        return load_component(
            path, sub, lambda: self.klass().from_pretrained(path, subfolder=sub, **{dtype_key: dtype})
        )


class PipelineBackbone(Backbone):
    """A Backbone holding the components of ``pipeline_class``, declared in ``components``.

    ``transformer`` is trainable; text encoders, tokenizers and the codec are frozen and may be ``None`` when loaded
    without them (``load_text_encoder`` / ``load_codec`` False).
    """

    #: the family's pipeline folder, one row per component (the load order)
    components: ClassVar[tuple[Part, ...]] = ()
    scheduler: Any
    text_encoder: nn.Module | None  # and text_encoder_2/_3, tokenizer_2/_3 where the table has them
    tokenizer: Any
    codec: nn.Module | None
    #: components the stock pipeline takes that apexctl never ships (``[null, null]`` in model_index.json)
    absent_parts: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        transformer: nn.Module,
        scheduler: Any,
        *,
        codec: nn.Module | None = None,
        codec_config: dict | None = None,
        **text: Any,
    ):
        """``text``: the text encoders and tokenizers by ``Part`` name. ``codec_config``: the codec's config dict,
        taken from ``codec`` when not given (it lets ``latent_shape`` work when the codec itself was not loaded)."""
        super().__init__()
        names = [p.attr for p in self.components if p.role in TEXT_ROLES]
        unknown = sorted(set(text) - set(names))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown component {unknown[0]!r} (allowed: {', '.join(names)})")
        self.transformer = transformer
        for name in names:
            setattr(self, name, text.get(name))
        self.codec = codec
        self.scheduler = scheduler
        self._finish_init(codec, codec_config)

    @classmethod
    def parts(cls, *roles: str) -> list[Part]:
        return [p for p in cls.components if p.role in roles]

    def frozen_components(self) -> list[nn.Module]:
        return [m for p in self.parts("text_encoder", "vae") if (m := getattr(self, p.attr)) is not None]

    # -- loading / saving ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        load_text_encoder: bool = True,
        load_codec: bool = True,
        **options: Any,
    ) -> PipelineBackbone:
        """Each component with its own class ``from_pretrained(path, subfolder=...)``; local folder or hub id.
        ``options``: the family's own constructor arguments (FLUX: ``embedded_guidance``).

        Raises ``BadInput`` (one line, naming ``path``) when a component cannot be loaded or a tokenizer is empty.
        """
        path = str(path)
        loaded: dict[str, Any] = {}
        for part in cls.components:
            if part.role != "vae" and (load_text_encoder or part.role not in TEXT_ROLES):
                loaded[part.attr] = part.load(path, dtype)
        codec, codec_config = cls._load_codec(path, dtype, load_codec)
        transformer, scheduler = loaded.pop("transformer"), loaded.pop("scheduler")
        return cls(transformer, scheduler, codec=codec, codec_config=codec_config, **loaded, **options)

    @classmethod
    def _load_codec(cls, path: str, dtype: torch.dtype, load_codec: bool) -> tuple[nn.Module | None, dict]:
        """``(codec, its config)``; without ``load_codec`` only the config is read."""
        (vae,) = cls.parts("vae")
        if load_codec:
            codec = load_component(
                path, vae.name, lambda: vae.klass().from_pretrained(path, subfolder=vae.name, torch_dtype=dtype)
            )
            return codec, dict(codec.config)
        return None, dict(load_component(path, vae.name, lambda: vae.klass().load_config(path, subfolder=vae.name)))

    def _write_components(self, out: Path, src: Path | None, dest: Path) -> None:
        """Every part into ``out`` and ``model_index.json``; a part that ``present_if`` lets a folder lack stays
        absent when it is neither loaded nor in ``src`` (e.g. SD3 without T5, also when loaded without text
        encoders for an export)."""
        frozen: dict[str, Any] = {}
        index: dict[str, tuple[str | None, str | None]] = {name: (None, None) for name in self.absent_parts}
        for part in self.components:
            value = getattr(self, part.attr)
            if part.present_if and getattr(self, part.present_if) is None:
                if src is None or not (src / part.present_if).is_dir():
                    index[part.name] = (None, None)
                    continue
            if part.role in FROZEN_ROLES:
                frozen[part.name] = value
            index[part.name] = (part.library, type(value).__name__ if part.role == "scheduler" else part.cls)
        self._place_components(out, src, dest, frozen)
        self._write_index(out, index)

    def _place_components(self, out: Path, src: Path | None, dest: Path, frozen: dict) -> None:
        """Save the transformer and scheduler; hard-link each frozen component from ``src`` when it has it, else save
        it from memory (a component neither loaded nor in ``src`` is a one-line error)."""
        self.transformer.save_pretrained(out / "transformer")
        self.scheduler.save_pretrained(out / "scheduler")
        for name, component in frozen.items():
            if src is not None and (src / name).is_dir():
                link_tree(src / name, out / name)
            elif component is not None:
                component.save_pretrained(out / name)
            else:
                raise BadInput(f"{dest}: cannot write {name}/: it was not loaded and no local source folder has it")

    def _write_index(self, out: Path, components: dict) -> None:
        """``model_index.json`` for ``pipeline_class`` (what stock ``DiffusionPipeline.from_pretrained`` reads)."""
        import diffusers

        index = {"_class_name": self.pipeline_class, "_diffusers_version": diffusers.__version__}
        index.update({k: list(v) for k, v in components.items()})
        write_json(out / "model_index.json", index)

    # -- shared pieces of the adapters --------------------------------------------------------------------------
    def _text_pipeline(self) -> Any:
        """A components-only ``pipeline_class`` (no VAE; built in under a millisecond): the family's own templates,
        tokenisation and padding then encode prompts."""
        import diffusers

        if self.text_encoder is None or self.tokenizer is None:
            raise RuntimeError(f"this {type(self).__name__} was loaded without its text encoders")
        text = {p.attr: getattr(self, p.attr) for p in self.parts(*TEXT_ROLES)}
        pipeline = getattr(diffusers, self.pipeline_class)
        return pipeline(transformer=self.transformer, scheduler=self.scheduler, vae=None, **text)

    def _text_device(self) -> torch.device | None:
        return next(self.text_encoder.parameters()).device if self.text_encoder is not None else None

    def _require_codec(self) -> nn.Module:
        if self.codec is None:
            raise RuntimeError(f"this {type(self).__name__} was loaded without its codec (load_codec=False)")
        return self.codec

    @staticmethod
    def _check_size(height: int, width: int, multiple: int) -> None:
        if height % multiple or width % multiple:
            raise BadInput(
                f"image size {height}x{width}: height and width must be multiples of {multiple} for this model"
            )

    def _shift_mu(self, calculate_shift: Any, seq_len: int, max_shift: float = 1.15) -> float:
        """The pipeline's ``calculate_shift(seq_len, …)`` with the scheduler config's values (its defaults else)."""
        cfg = self.scheduler.config
        return calculate_shift(
            seq_len,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", max_shift),
        )

    def _scheduler_sigmas(self, num_steps: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The σ grid of ``scheduler.set_timesteps(*args, **kwargs)`` on a copy (``set_timesteps`` mutates the
        scheduler; ours stays stateless), ``num_steps + 1`` values from 1 down to 0."""
        cfg = self.scheduler.config
        scheduler = copy.deepcopy(self.scheduler)
        if num_steps == 1 and cfg.get("shift_terminal"):
            # diffusers' terminal stretch divides by 1 − σ_last = 0 for a single step (the stock pipeline returns
            # NaN there); one Euler step from σ = 1 to 0 is the only sensible schedule.
            scheduler = type(self.scheduler).from_config(cfg, shift_terminal=None)
        scheduler.set_timesteps(*args, **kwargs)
        return scheduler.sigmas.detach().to("cpu", torch.float32).clone()
