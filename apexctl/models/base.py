"""The Backbone interface: what the engine needs from a model family (docs/design.md §4).

Conventions (docs/design.md §3): time ``t ∈ [0, 1]`` with ``t = 1`` pure noise; ``x_t = t·z + (1−t)·x``; the network
predicts the velocity ``v = z − x``. Latents are ``[B, C, H, W]`` after the family's own normalisation.
An adapter translates to its family's native layout (packing), timestep scale and velocity sign.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from apexctl.engine.cond import Cond
from apexctl.errors import BadInput
from apexctl.hub import quiet_hub_progress, write_json
from apexctl.models.quantize import silence_import_noise

__all__ = ["Backbone", "Cond", "PixelCodec", "ScaledKLCodec"]

silence_import_noise()  # the quantisation libraries' import-time warnings, when installed (models/quantize.py)


#: marks a folder written by apexctl and names its family
MODEL_MARKER = "apexctl_model.json"


class Backbone(ABC, nn.Module):
    """A model family behind one small interface. ``transformer`` is the trainable denoiser F.

    Subclasses hold the stock diffusers/transformers components and implement the conversions. The engine never
    touches a family's native layout or timestep scale.
    """

    family: str = "base"
    #: default LoRA target module names for this family
    lora_targets: list[str] = []
    #: every later read of the condition site's output goes through a LayerNorm, which removes a constant b·1
    #: exactly: a scalar shift's b is then a no-op at the ``projection`` site (checked per family in
    #: tests/test_shift_sites.py)
    projection_cancels_scalar_bias: bool = False

    transformer: nn.Module

    # -- loading / saving ---------------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def from_pretrained(cls, path: str | Path, **options: Any) -> Backbone:
        """Load from a local diffusers-style folder or a hub id. Every family takes ``dtype`` (default fp32),
        ``load_text_encoder`` and ``load_codec`` (default True; without them prompts / images cannot be encoded)."""

    def save_pretrained(self, path: str | Path, *, source: str | Path | None = None) -> None:
        """Write a complete model folder atomically (temp sibling, then rename; an existing folder is replaced last)
        that ``from_pretrained`` and the family's stock diffusers pipeline load. Frozen components are hard-linked
        from ``source`` when it is a local folder that has them, else saved from memory."""
        from apexctl.atomic import atomic_dir

        dest = Path(path).absolute()
        src = Path(source) if source is not None and Path(source).is_dir() else None
        with atomic_dir(dest) as tmp, quiet_hub_progress():
            self._write_components(tmp, src, dest)
            write_json(tmp / MODEL_MARKER, {"family": self.family})

    @abstractmethod
    def _write_components(self, out: Path, src: Path | None, dest: Path) -> None:
        """Write every component into ``out`` (``src``: local folder to hard-link frozen parts from)."""

    # -- conditioning --------------------------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Text → Cond, exactly as the family's stock pipeline encodes prompts."""

    @abstractmethod
    def condition_site(self) -> nn.Module:
        """The module inside the denoiser whose output is the text condition the shift applies to."""

    #: the denoiser's submodule whose output is the time embedding ``[B, D]`` (``apex_full``'s target-time input
    #: is added there); None: the family has no such single site
    time_embedding_name: str | None = "time_text_embed"

    def time_embedding_site(self) -> nn.Module:
        """The module whose output is the time embedding (a forward hook adds e(tt) there)."""
        name = self.time_embedding_name
        if name is None or not hasattr(self.transformer, name):
            raise BadInput(
                f"method.target_time = 'embed' is not supported for the {self.family} family (no single time-"
                "embedding module); use method.target_time = 'none'"
            )
        return getattr(self.transformer, name)

    def time_embedding_dim(self) -> int:
        """Width of the time embedding: the last Linear of :meth:`time_embedding_site`."""
        linears = [m for m in self.time_embedding_site().modules() if isinstance(m, nn.Linear)]
        return int(linears[-1].out_features)

    #: the denoiser's attribute holding its list of transformer blocks (the GAN head reads the middle one)
    feature_blocks_name: str = "transformer_blocks"
    #: which element of a block's tuple output is the image stream; None: the output is the image stream itself
    feature_output_index: int | None = 1

    def feature_site(self, module: nn.Module | None = None) -> tuple[nn.Module, Callable[[Any], torch.Tensor]]:
        """``(block, extract)``: the middle transformer block (index ``len(blocks) // 2``) of ``module`` (default
        the denoiser; e.g. a separate critic copy of it) and the map from that block's forward output to its
        image-token hidden states ``[B, N_image, D]`` (the features DMD2's GAN head reads, docs/design.md §5)."""
        blocks = getattr(self.transformer if module is None else module, self.feature_blocks_name)
        index = self.feature_output_index

        def extract(output: Any) -> torch.Tensor:
            return output if index is None else output[index]

        return blocks[len(blocks) // 2], extract

    def feature_dim(self) -> int:
        """D of :meth:`feature_site`'s features: the DiT's width, ``num_attention_heads · attention_head_dim``."""
        cfg = self.transformer.config
        return int(cfg.num_attention_heads * cfg.attention_head_dim)

    def condition_dim(self) -> int:
        """Feature size at ``condition_site()`` (for a ``diag`` shift)."""
        site = self.condition_site()
        return int(site.out_features)  # type: ignore[union-attr]

    @property
    def embed_dim(self) -> int:
        """Feature size of ``Cond.embeds`` (the text encoder's output)."""
        raise NotImplementedError

    # -- images <-> latents --------------------------------------------------------------------------------------
    @abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [−1, 1] → normalised latents ``[B, C, h, w]``."""

    @abstractmethod
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents → ``[B, 3, H, W]`` in [−1, 1] (not clamped)."""

    @abstractmethod
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of the latents for an image of ``height × width`` pixels."""

    # -- the denoiser --------------------------------------------------------------------------------------------
    @abstractmethod
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """F(x_t, t, c) in our convention: ``x_t [B, C, h, w]``, ``t [B]`` in [0, 1] → ``v ≈ z − x``."""

    def guidance_combine(self, v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """Classifier-free guidance as the family's stock pipeline combines it (plain CFG by default)."""
        return v_uncond + scale * (v_cond - v_uncond)

    @abstractmethod
    def teacher_sigmas(self, num_steps: int, latent_shape: tuple[int, int, int]) -> torch.Tensor:
        """The family's native Euler schedule: ``num_steps + 1`` times from 1 (noise) down to 0, as its pipeline uses."""

    #: the family's diffusers pipeline class name (LoRA export/import uses its loader mixin)
    pipeline_class: str = ""

    #: whether core ComfyUI maps this family's diffusers-named LoRA keys onto its own model (see lora.to_comfyui)
    comfyui: bool = False

    def save_lora(self, path: str | Path, *, comfyui: bool = False, info: dict | None = None) -> Path:
        """Write the denoiser's ``default`` adapter in the family pipeline's diffusers LoRA format (alpha kept), and
        with ``comfyui`` also ``comfyui_lora.safetensors`` beside it; ``info`` is added to ``apexctl_lora.json``."""
        from apexctl.lora import check_lora_formats, save_comfyui, save_diffusers_lora

        check_lora_formats(self, ["comfyui"] if comfyui else [])
        out = save_diffusers_lora(self.transformer, self.pipeline_class, path, family=self.family, info=info)
        if comfyui:
            save_comfyui(self.transformer, out)
        return out

    def load_lora(self, path: str | Path) -> None:
        """Attach a LoRA written by ``save_lora`` (or any diffusers-format LoRA for this family) to the denoiser."""
        from apexctl.lora import load_diffusers_lora

        load_diffusers_lora(self.transformer, path, self.family)

    def _finish_init(self, codec: nn.Module | None, codec_config: dict | None) -> None:
        """Shared tail of every adapter's ``__init__``: ``codec_config`` taken from ``codec`` when not given (it lets
        ``latent_shape`` work without the codec loaded), and the frozen components put in eval mode."""
        if codec_config is None:
            if codec is None:
                raise ValueError("codec_config is required when no codec is given")
            codec_config = codec.config() if isinstance(codec, PixelCodec) else dict(codec.config)
        self.codec_config = dict(codec_config)
        for frozen in self.frozen_components():
            frozen.requires_grad_(False).eval()

    def frozen_components(self) -> list[nn.Module]:
        """The frozen components (text encoders, codec) that stay in eval mode; the default covers the usual two."""
        return [m for m in (getattr(self, "text_encoder", None), getattr(self, "codec", None)) if m is not None]

    def train(self, mode: bool = True) -> Backbone:
        """Train mode for the denoiser only: frozen encoders and the codec stay in eval mode (no dropout)."""
        super().train(mode)
        for frozen in self.frozen_components():
            frozen.eval()
        return self

    def set_forward_module(self, module: nn.Module | None) -> None:
        """Route forward passes through ``module`` (e.g. the DDP/FSDP-wrapped transformer); None restores it.

        Stored outside nn.Module's registry so the wrapper is not saved as a second copy of the weights.
        """
        object.__setattr__(self, "_forward_module", module)

    @property
    def denoiser(self) -> nn.Module:
        """The module to call for F (the wrapped transformer during distributed training)."""
        return self.__dict__.get("_forward_module") or self.transformer

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    #: the base's quantisation scheme (``model.quantize``; set by apexctl.models.quantize), "none" when unquantised
    quantization: str = "none"
    _compute_dtype: torch.dtype | None = None

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the denoiser computes in, which every caller casts its inputs to: the one recorded by
        :meth:`set_compute_dtype` (a quantised base, whose weights are stored as int8 / float8 / packed 4-bit
        codes), else the dtype of the denoiser's first floating-point weight outside the adapter (the dtype it was
        loaded in; fp32 once full tuning has cast it)."""
        if self._compute_dtype is not None:
            return self._compute_dtype
        for name, p in self.transformer.named_parameters():
            if p.is_floating_point() and "lora_" not in name:
                return p.dtype
        return torch.float32

    def set_compute_dtype(self, dtype: torch.dtype | None) -> None:
        """Record the compute dtype (None: read it from the weights again)."""
        self._compute_dtype = dtype

    def native_size(self) -> int | None:
        """The image side (pixels) the family's stock pipeline draws when given no height/width; None: unknown.
        ``apexctl sample`` uses it when neither ``--size`` nor a recipe gives one."""
        return None


class PixelCodec(nn.Module):
    """Identity "codec" for pixel-space models (the embedded digits default): latents are the pixels in [−1, 1].

    ``channels == 1``: encode = mean over RGB, decode repeats the channel 3 times; ``channels == 3``: identity.
    ``patch > 1`` (the scenes model): then a space-to-depth by ``patch`` (``pixel_unshuffle``), so a 16×16 RGB image
    is ``[12, 8, 8]`` latents and the 2×2-packing transformer sees 16 tokens; decode undoes it (``pixel_shuffle``).
    Saved as ``apexctl_codec.json`` ``{"type": "pixel", "channels": C}`` (+ ``"patch": p`` when p > 1) in place of a
    ``vae/`` folder.
    """

    CONFIG_NAME = "apexctl_codec.json"

    def __init__(self, channels: int = 1, patch: int = 1):
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"pixel codec channels must be 1 or 3, got {channels}")
        if patch < 1:
            raise ValueError(f"pixel codec patch must be >= 1, got {patch}")
        self.channels, self.patch = channels, patch

    def config(self) -> dict:
        cfg = {"type": "pixel", "channels": self.channels}
        if self.patch > 1:
            cfg["patch"] = self.patch
        return cfg

    @property
    def latent_channels(self) -> int:
        return self.channels * self.patch**2

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels == 3:
            x = images
        else:
            # the RGB mean, written so that equal channels (a grey image) give back exactly that channel
            r, g, b = images[:, 0:1], images[:, 1:2], images[:, 2:3]
            x = r + ((g - r) + (b - r)) / 3
        return nn.functional.pixel_unshuffle(x, self.patch) if self.patch > 1 else x

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.patch > 1:
            latents = nn.functional.pixel_shuffle(latents, self.patch)
        return latents.repeat(1, 3, 1, 1) if self.channels == 1 else latents


class ScaledKLCodec:
    """Mixin for families whose codec is an ``AutoencoderKL`` normalised by ``scaling_factor`` / ``shift_factor``
    (SD3, FLUX, Z-Image): latents = (mode − shift) · scale, decode = vae.decode(latents / scale + shift). The host
    class provides ``_require_codec`` (``PipelineBackbone`` does)."""

    codec: nn.Module | None
    codec_config: dict
    _require_codec: Callable[[], nn.Module]

    def _scale_shift(self) -> tuple[float, float]:
        shift = self.codec_config.get("shift_factor")
        return float(self.codec_config.get("scaling_factor", 1.0)), float(shift) if shift is not None else 0.0

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [−1, 1] → ``(mode − shift_factor) · scaling_factor``, ``[B, C, H/f, W/f]``."""
        codec = self._require_codec()
        raw = codec.encode(images.to(codec.dtype)).latent_dist.mode()
        scale, shift = self._scale_shift()
        return (raw - shift) * scale

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``vae.decode(latents / scaling_factor + shift_factor)``, as the pipelines do → ``[B, 3, H, W]``."""
        codec = self._require_codec()
        scale, shift = self._scale_shift()
        return codec.decode(latents.to(codec.dtype) / scale + shift, return_dict=False)[0]

    @property
    def vae_scale_factor(self) -> int:
        """``2 ** (len(block_out_channels) − 1)``, as the pipelines compute it."""
        return 2 ** (len(self.codec_config["block_out_channels"]) - 1)
