"""FLUX.1 adapter (schnell and dev): the stock diffusers components behind the Backbone interface (DESIGN §4).

Native conventions translated here (``FluxPipeline``, diffusers 0.42):

- latents are ``[B, C, h, w]`` on our side; the transformer takes them packed into 2×2 patches
  (``FluxPipeline._pack_latents`` → ``[B, (h/2)(w/2), 4C]``) with ``img_ids`` (``_prepare_latent_image_ids``) and
  ``txt_ids`` (zeros ``[L, 3]``); its output is unpacked back;
- the transformer takes ``timestep = σ`` (the pipeline passes ``scheduler.timesteps / 1000``), so our ``t ∈ [0, 1]``
  goes in as is;
- it predicts ``noise − x0``, already our ``v = z − x`` (the scheduler's Euler step is ``x + (σ_next − σ) · v``);
- text: T5 last hidden state (``max_sequence_length`` tokens, padding included, no attention mask) →
  ``Cond.embeds``; CLIPTextModel's pooled output → ``Cond.pooled``;
- dev (``guidance_embeds``): the distilled guidance is an input, ``guidance = embedded_guidance`` (the pipeline's
  ``guidance_scale``, default 3.5) on every row; schnell has none;
- true CFG (the pipeline's ``true_cfg_scale`` with a negative prompt) is plain ``u + s(c − u)``: the base default;
- VAE latents are normalised ``(mode − shift_factor) · scaling_factor``; decoding inverts it;
- schedule: ``sigmas = linspace(1, 1/N, N)`` through ``set_timesteps(sigmas=…, mu=…)`` with ``mu = calculate_shift``
  of the packed sequence length (the scheduler uses it only when ``use_dynamic_shifting``), then 0.

diffusers / transformers are imported inside the functions that need them, so ``import apexctl.models`` stays cheap.
"""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from apexctl.errors import BadInput
from apexctl.hub import load_component, load_tokenizer
from apexctl.models.base import Backbone, Cond, ScaledKLCodec

#: model_index.json entries (the layout of the hub FLUX.1-schnell / FLUX.1-dev repositories)
_COMPONENTS = {
    "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "text_encoder_2": ("transformers", "T5EncoderModel"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "tokenizer_2": ("transformers", "T5TokenizerFast"),
    "transformer": ("diffusers", "FluxTransformer2DModel"),
    "vae": ("diffusers", "AutoencoderKL"),
}
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
_TOKENIZERS = ("tokenizer", "tokenizer_2")


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` → ``[B, (h/2)(w/2), 4C]``, exactly ``FluxPipeline._pack_latents``."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of ``pack_latents`` for latents ``h × w`` (``FluxPipeline._unpack_latents`` in latent units)."""
    b, _, channels = latents.shape
    latents = latents.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, h, w)


def latent_image_ids(h: int, w: int, device=None, dtype=None) -> torch.Tensor:
    """``FluxPipeline._prepare_latent_image_ids`` for latents ``h × w``: ``[(h/2)(w/2), 3]`` (0, row, col)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxBackbone(ScaledKLCodec, Backbone):
    """FLUX.1 schnell / dev (``FluxPipeline``'s components). ``transformer`` is trainable; the CLIP and T5 text
    encoders and the VAE are frozen. Text encoders / codec may be ``None`` when loaded without them."""

    family = "flux"
    projection_cancels_scalar_bias = True  # the text stream is read through LayerNorms only
    pipeline_class = "FluxPipeline"
    comfyui = True
    lora_targets = [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
        "proj_mlp",
        "proj_out",
    ]
    #: FluxPipeline.__call__'s default max_sequence_length (T5 tokens)
    max_sequence_length = 512

    def __init__(
        self,
        transformer: nn.Module,
        scheduler: Any,
        *,
        text_encoder: nn.Module | None = None,
        text_encoder_2: nn.Module | None = None,
        tokenizer: Any = None,
        tokenizer_2: Any = None,
        codec: nn.Module | None = None,
        codec_config: dict | None = None,
        embedded_guidance: float = 3.5,
    ):
        """``codec_config``: the VAE config dict; taken from ``codec`` when not given. ``embedded_guidance``: the
        distilled guidance value dev models take as input (the pipeline's ``guidance_scale``); unused by schnell."""
        super().__init__()
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.codec = codec
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.scheduler = scheduler
        self.embedded_guidance = float(embedded_guidance)
        self._finish_init(codec, codec_config)

    def _frozen(self) -> list[nn.Module]:
        return [m for m in (self.text_encoder, self.text_encoder_2, self.codec) if m is not None]

    @property
    def guidance_embeds(self) -> bool:
        """True for guidance-distilled (dev) transformers, which take ``embedded_guidance`` as an input."""
        return bool(self.transformer.config.get("guidance_embeds", False))

    # -- loading / saving ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        load_text_encoder: bool = True,
        load_codec: bool = True,
        embedded_guidance: float = 3.5,
    ) -> FluxBackbone:
        """Each component with its own class ``from_pretrained(path, subfolder=...)``; local folder or hub id.

        Raises ``BadInput`` (one line, naming ``path``) when a component cannot be loaded or a tokenizer is empty.
        """
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        path = str(path)

        load = partial(load_component, path)

        transformer = load(
            "transformer",
            lambda: FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype),
        )
        scheduler = load(
            "scheduler", lambda: FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        )

        text: dict[str, Any] = {}
        if load_text_encoder:
            text["text_encoder"] = load(
                "text_encoder", lambda: CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
            )
            text["text_encoder_2"] = load(
                "text_encoder_2", lambda: T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype)
            )
            text["tokenizer"] = load_tokenizer(
                path, "tokenizer", lambda: CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"), min_tokens=10
            )
            text["tokenizer_2"] = load_tokenizer(
                path,
                "tokenizer_2",
                lambda: T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_2"),
                min_tokens=10,
            )

        codec = None
        if load_codec:
            codec = load("vae", lambda: AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype))
            codec_config = dict(codec.config)
        else:
            codec_config = dict(load("vae", lambda: AutoencoderKL.load_config(path, subfolder="vae")))
        return cls(
            transformer,
            scheduler,
            codec=codec,
            codec_config=codec_config,
            embedded_guidance=embedded_guidance,
            **text,
        )

    def _write_components(self, out: Path, src: Path | None, dest: Path) -> None:
        frozen: dict[str, Any] = {name: getattr(self, name) for name in (*_TEXT_ENCODERS, *_TOKENIZERS)}
        frozen["vae"] = self.codec
        self._place_components(out, src, dest, frozen)
        self._write_index(out, {**_COMPONENTS, "image_encoder": (None, None), "feature_extractor": (None, None)})

    # -- conditioning --------------------------------------------------------------------------------------------
    def _text_pipeline(self):
        from diffusers import FluxPipeline

        if self.text_encoder is None or self.tokenizer is None:
            raise RuntimeError("this Flux backbone was loaded without its text encoders")
        # A components-only pipeline (no VAE): its own CLIP/T5 tokenisation and padding encode prompts.
        return FluxPipeline(
            scheduler=self.scheduler,
            vae=None,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2,
            transformer=self.transformer,
        )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """``FluxPipeline.encode_prompt`` → ``Cond(prompt_embeds, mask = ones, pooled_prompt_embeds)``.

        ``embeds [B, max_sequence_length, joint_attention_dim]`` (T5), ``pooled [B, pooled_projection_dim]`` (CLIP).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        device = next(self.text_encoder.parameters()).device if self.text_encoder is not None else None
        embeds, pooled, _ = self._text_pipeline().encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            device=device,
            max_sequence_length=self.max_sequence_length,
        )
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return Cond(embeds=embeds, mask=mask, pooled=pooled)

    def condition_site(self) -> nn.Module:
        """``transformer.context_embedder``: the DiT's projection of the T5 embeddings to its width."""
        return self.transformer.context_embedder

    @property
    def embed_dim(self) -> int:
        return int(self.transformer.config.joint_attention_dim)

    @property
    def pooled_dim(self) -> int:
        return int(self.transformer.config.pooled_projection_dim)

    # -- images <-> latents --------------------------------------------------------------------------------------
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor * 2  # 2×2 packing
        if height % f or width % f:
            raise BadInput(f"image size {height}x{width}: height and width must be multiples of {f} for this model")
        channels = int(self.transformer.config.in_channels) // 4
        return channels, height // self.vae_scale_factor, width // self.vae_scale_factor

    # -- the denoiser --------------------------------------------------------------------------------------------
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Packs ``x_t``, calls the transformer with ``timestep = t`` (σ), ``img_ids``/``txt_ids`` and, for dev,
        ``guidance = embedded_guidance``; unpacks its output, which is already ``z − x``.

        ``cond.mask`` is not used: the Flux transformer has no attention mask (all tokens attend, as in the pipeline).
        """
        if cond.pooled is None:
            raise ValueError("Flux needs pooled text embeddings (Cond.pooled), got None")
        b, _, h, w = x_t.shape
        dtype = self.transformer.x_embedder.weight.dtype
        device = x_t.device
        t = torch.as_tensor(t, device=device).reshape(-1).expand(b).float()
        # the pipeline passes (σ · 1000 in fp32, cast to the latents' dtype) / 1000
        timestep = (t * float(self.scheduler.config.num_train_timesteps)).to(dtype) / float(
            self.scheduler.config.num_train_timesteps
        )
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full([b], self.embedded_guidance, device=device, dtype=torch.float32)
        text_dtype = self.text_encoder.dtype if self.text_encoder is not None else self.transformer.dtype
        out = self.denoiser(
            hidden_states=pack_latents(x_t.to(dtype)),
            timestep=timestep,
            guidance=guidance,
            pooled_projections=cond.pooled.to(dtype),
            encoder_hidden_states=cond.embeds.to(dtype),
            txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=device, dtype=text_dtype),
            img_ids=latent_image_ids(h, w, device=device, dtype=dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w).to(x_t.dtype)

    def teacher_sigmas(self, num_steps: int, latent_shape: tuple[int, int, int]) -> torch.Tensor:
        """The pipeline's schedule: ``set_timesteps(sigmas=linspace(1, 1/N, N), mu=calculate_shift(seq_len))``
        (``mu`` is used only when the scheduler has ``use_dynamic_shifting``), then 0."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        _, h, w = latent_shape
        cfg = self.scheduler.config
        mu = calculate_shift(
            (h // 2) * (w // 2),
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if cfg.get("use_flow_sigmas", None):
            sigmas = None
        scheduler = copy.deepcopy(self.scheduler)  # set_timesteps mutates the scheduler; keep ours stateless
        if sigmas is None:
            scheduler.set_timesteps(num_steps, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, mu=mu)
        return scheduler.sigmas.detach().to("cpu", torch.float32).clone()
