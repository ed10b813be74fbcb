"""Stable Diffusion 3 / 3.5 adapter: the stock diffusers components behind the Backbone interface (DESIGN §4).

Native conventions translated here (``StableDiffusion3Pipeline``, diffusers 0.42):

- latents are unpacked ``[B, C, h, w]`` (the transformer patchifies itself); no packing needed;
- the transformer takes ``timestep = σ · num_train_timesteps`` (the pipeline passes the scheduler's timesteps,
  ``σ · 1000``), so our ``t ∈ [0, 1]`` becomes ``t · 1000``;
- it predicts ``noise − x0``, which is already our ``v = z − x`` (the scheduler's Euler step is
  ``x + (σ_next − σ) · v``);
- text: two CLIP encoders (penultimate hidden states, concatenated on features, zero-padded to the T5 width) and
  T5 (last hidden state) concatenated along tokens; the pooled CLIP projections concatenated →
  ``Cond(embeds, mask = all ones, pooled)``. The SD3 transformer takes no attention mask: every token is attended,
  including the tokenizers' own padding, exactly as in the pipeline;
- VAE latents are normalised ``(mode − shift_factor) · scaling_factor``; decoding inverts it;
- schedule: ``set_timesteps(N)`` with the config's static ``shift`` (``mu`` only when ``use_dynamic_shifting``);
- guidance: plain CFG (the base class default).

diffusers / transformers are imported inside the functions that need them, so ``import apexctl.models`` stays cheap.
"""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from apexctl.errors import BadInput
from apexctl.hub import load_component, load_tokenizer
from apexctl.models.base import Backbone, Cond, ScaledKLCodec

#: model_index.json entries (the layout of the hub SD3 / SD3.5 repositories)
_COMPONENTS = {
    "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
    "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
    "text_encoder_3": ("transformers", "T5EncoderModel"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "tokenizer_2": ("transformers", "CLIPTokenizer"),
    "tokenizer_3": ("transformers", "T5TokenizerFast"),
    "transformer": ("diffusers", "SD3Transformer2DModel"),
    "vae": ("diffusers", "AutoencoderKL"),
}
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
_TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")


class SD3Backbone(ScaledKLCodec, Backbone):
    """Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``'s components). ``transformer`` is trainable; the
    three text encoders and the VAE are frozen. Text encoders / codec may be ``None`` when loaded without them
    (``text_encoder_3`` may also be absent from a folder: the pipeline then uses zeros for the T5 tokens)."""

    family = "sd3"
    projection_cancels_scalar_bias = True  # the text stream is read through LayerNorms only
    pipeline_class = "StableDiffusion3Pipeline"
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
    ]
    #: StableDiffusion3Pipeline.__call__'s default max_sequence_length (T5 tokens)
    max_sequence_length = 256

    def __init__(
        self,
        transformer: nn.Module,
        scheduler: Any,
        *,
        text_encoder: nn.Module | None = None,
        text_encoder_2: nn.Module | None = None,
        text_encoder_3: nn.Module | None = None,
        tokenizer: Any = None,
        tokenizer_2: Any = None,
        tokenizer_3: Any = None,
        codec: nn.Module | None = None,
        codec_config: dict | None = None,
    ):
        """``codec_config``: the VAE config dict; taken from ``codec`` when not given."""
        super().__init__()
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.text_encoder_3 = text_encoder_3
        self.codec = codec
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.tokenizer_3 = tokenizer_3
        self.scheduler = scheduler
        self._finish_init(codec, codec_config)

    def _frozen(self) -> list[nn.Module]:
        return [m for m in (self.text_encoder, self.text_encoder_2, self.text_encoder_3, self.codec) if m is not None]

    # -- loading / saving ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        load_text_encoder: bool = True,
        load_codec: bool = True,
    ) -> SD3Backbone:
        """Each component with its own class ``from_pretrained(path, subfolder=...)``; local folder or hub id.

        Raises ``BadInput`` (one line, naming ``path``) when a component cannot be loaded or a tokenizer is empty.
        """
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        path = str(path)

        load = partial(load_component, path)

        transformer = load(
            "transformer",
            lambda: SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype),
        )
        scheduler = load(
            "scheduler", lambda: FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        )

        text: dict[str, Any] = {}
        if load_text_encoder:
            for sub in ("text_encoder", "text_encoder_2"):
                text[sub] = load(
                    sub, lambda sub=sub: CLIPTextModelWithProjection.from_pretrained(path, subfolder=sub, dtype=dtype)
                )
            for sub in ("tokenizer", "tokenizer_2"):
                text[sub] = load_tokenizer(
                    path, sub, lambda sub=sub: CLIPTokenizer.from_pretrained(path, subfolder=sub), min_tokens=10
                )
            # SD3 runs without T5 (the pipeline then feeds zeros): only a local folder may omit it
            if Path(path).is_dir() and not (Path(path) / "text_encoder_3").is_dir():
                text["text_encoder_3"] = text["tokenizer_3"] = None
            else:
                text["text_encoder_3"] = load(
                    "text_encoder_3",
                    lambda: T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", dtype=dtype),
                )
                text["tokenizer_3"] = load_tokenizer(
                    path,
                    "tokenizer_3",
                    lambda: T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_3"),
                    min_tokens=10,
                )

        codec = None
        if load_codec:
            codec = load("vae", lambda: AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype))
            codec_config = dict(codec.config)
        else:
            codec_config = dict(load("vae", lambda: AutoencoderKL.load_config(path, subfolder="vae")))
        return cls(transformer, scheduler, codec=codec, codec_config=codec_config, **text)

    def _write_components(self, out: Path, src: Path | None, dest: Path) -> None:
        frozen: dict[str, Any] = {name: getattr(self, name) for name in (*_TEXT_ENCODERS, *_TOKENIZERS)}
        frozen["vae"] = self.codec
        index = dict(_COMPONENTS)
        # a model without T5 (loaded from a folder that has none) stays without it
        no_t5 = self.text_encoder is not None and self.text_encoder_3 is None
        if src is not None and no_t5:
            no_t5 = not (src / "text_encoder_3").is_dir()
        if no_t5:
            for name in ("text_encoder_3", "tokenizer_3"):
                del frozen[name]
                index[name] = (None, None)
        self._place_components(out, src, dest, frozen)
        self._write_index(out, {**index, "image_encoder": (None, None), "feature_extractor": (None, None)})

    # -- conditioning --------------------------------------------------------------------------------------------
    def _text_pipeline(self):
        from diffusers import StableDiffusion3Pipeline

        if self.text_encoder is None or self.tokenizer is None:
            raise RuntimeError("this SD3 backbone was loaded without its text encoders")
        # A components-only pipeline (no VAE): its own CLIP/T5 tokenisation, clip-skip and padding encode prompts.
        # The transformer is only read for its config (the T5 width when there is no T5).
        return StableDiffusion3Pipeline(
            transformer=self.transformer,
            scheduler=self.scheduler,
            vae=None,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2,
            text_encoder_3=self.text_encoder_3,
            tokenizer_3=self.tokenizer_3,
        )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """``StableDiffusion3Pipeline.encode_prompt`` → ``Cond(prompt_embeds, mask = ones, pooled_prompt_embeds)``.

        ``embeds [B, 77 + max_sequence_length, joint_attention_dim]``, ``pooled [B, proj_1 + proj_2]``.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        device = next(self.text_encoder.parameters()).device if self.text_encoder is not None else None
        embeds, _, pooled, _ = self._text_pipeline().encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return Cond(embeds=embeds, mask=mask, pooled=pooled)

    def condition_site(self) -> nn.Module:
        """``transformer.context_embedder``: the DiT's projection of the joint text embeddings to its width."""
        return self.transformer.context_embedder

    @property
    def embed_dim(self) -> int:
        return int(self.transformer.config.joint_attention_dim)

    @property
    def pooled_dim(self) -> int:
        return int(self.transformer.config.pooled_projection_dim)

    # -- images <-> latents --------------------------------------------------------------------------------------
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor * int(self.transformer.config.patch_size)
        if height % f or width % f:
            raise BadInput(f"image size {height}x{width}: height and width must be multiples of {f} for this model")
        channels = int(self.codec_config["latent_channels"])
        return channels, height // self.vae_scale_factor, width // self.vae_scale_factor

    # -- the denoiser --------------------------------------------------------------------------------------------
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Calls the transformer with ``timestep = t · num_train_timesteps``; its output is already ``z − x``.

        ``cond.mask`` is not used: the SD3 transformer has no attention mask (all tokens attend, as in the pipeline).
        """
        if cond.pooled is None:
            raise ValueError("SD3 needs pooled text embeddings (Cond.pooled), got None")
        b = x_t.shape[0]
        dtype = self.transformer.pos_embed.proj.weight.dtype
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(b).float()
        # the pipeline passes the scheduler's fp32 timesteps (σ · 1000) whatever the transformer dtype
        timestep = t * float(self.scheduler.config.num_train_timesteps)
        out = self.denoiser(
            hidden_states=x_t.to(dtype),
            timestep=timestep,
            encoder_hidden_states=cond.embeds.to(dtype),
            pooled_projections=cond.pooled.to(dtype),
            return_dict=False,
        )[0]
        return out.to(x_t.dtype)

    def teacher_sigmas(self, num_steps: int, latent_shape: tuple[int, int, int]) -> torch.Tensor:
        """The pipeline's schedule: ``set_timesteps(N)`` (static ``shift``; ``mu`` of the patch count only when the
        scheduler uses dynamic shifting, SD3's ``max_shift`` default 1.16), then 0."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        _, h, w = latent_shape
        cfg = self.scheduler.config
        kwargs = {}
        if cfg.get("use_dynamic_shifting", None):
            p = int(self.transformer.config.patch_size)
            kwargs["mu"] = calculate_shift(
                (h // p) * (w // p),
                cfg.get("base_image_seq_len", 256),
                cfg.get("max_image_seq_len", 4096),
                cfg.get("base_shift", 0.5),
                cfg.get("max_shift", 1.16),
            )
        scheduler = copy.deepcopy(self.scheduler)  # set_timesteps mutates the scheduler; keep ours stateless
        scheduler.set_timesteps(num_steps, **kwargs)
        return scheduler.sigmas.detach().to("cpu", torch.float32).clone()
