"""FLUX.1 adapter (schnell and dev): the stock diffusers components behind the Backbone interface (docs/design.md §4).

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

from typing import Any

import numpy as np
import torch
from torch import nn

from apexctl.models.base import Cond, ScaledKLCodec
from apexctl.models.components import Part, PipelineBackbone, prompt_list
from apexctl.models.mmdit import JOINT_ATTENTION, PooledText, pack_latents, unpack_latents


def latent_image_ids(h: int, w: int, device=None, dtype=None) -> torch.Tensor:
    """``FluxPipeline._prepare_latent_image_ids`` for latents ``h × w``: ``[(h/2)(w/2), 3]`` (0, row, col)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxBackbone(ScaledKLCodec, PooledText, PipelineBackbone):
    """FLUX.1 schnell / dev (``FluxPipeline``'s components). ``transformer`` is trainable; the CLIP and T5 text
    encoders and the VAE are frozen. Text encoders / codec may be ``None`` when loaded without them."""

    family = "flux"
    projection_cancels_scalar_bias = True  # the text stream is read through LayerNorms only
    pipeline_class = "FluxPipeline"
    #: the layout of the hub FLUX.1-schnell / FLUX.1-dev repositories
    components = (
        Part("transformer", "diffusers", "FluxTransformer2DModel"),
        Part("scheduler", "diffusers", "FlowMatchEulerDiscreteScheduler"),
        Part("text_encoder", "transformers", "CLIPTextModel"),
        Part("text_encoder_2", "transformers", "T5EncoderModel"),
        Part("tokenizer", "transformers", "CLIPTokenizer", min_tokens=10),
        Part("tokenizer_2", "transformers", "T5TokenizerFast", min_tokens=10),
        Part("vae", "diffusers", "AutoencoderKL"),
    )
    absent_parts = ("image_encoder", "feature_extractor")
    comfyui = True
    lora_targets = [*JOINT_ATTENTION, "proj_mlp", "proj_out"]
    #: the dual-stream ``transformer_blocks`` (not ``single_transformer_blocks``, whose tokens are text and image
    #: mixed): ``FluxTransformerBlock`` returns ``(encoder_hidden_states, hidden_states)``, the image stream second
    feature_blocks_name, feature_output_index = "transformer_blocks", 1
    #: FluxPipeline.__call__'s default max_sequence_length (T5 tokens)
    max_sequence_length = 512

    def __init__(self, transformer: nn.Module, scheduler: Any, *, embedded_guidance: float = 3.5, **parts: Any):
        """``embedded_guidance``: the distilled guidance value dev models take as input (the pipeline's
        ``guidance_scale``); unused by schnell. ``parts``: as ``PipelineBackbone``."""
        super().__init__(transformer, scheduler, **parts)
        self.embedded_guidance = float(embedded_guidance)

    @property
    def guidance_embeds(self) -> bool:
        """True for guidance-distilled (dev) transformers, which take ``embedded_guidance`` as an input."""
        return bool(self.transformer.config.get("guidance_embeds", False))

    # -- conditioning --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """``FluxPipeline.encode_prompt`` → ``Cond(prompt_embeds, mask = ones, pooled_prompt_embeds)``.

        ``embeds [B, max_sequence_length, joint_attention_dim]`` (T5), ``pooled [B, pooled_projection_dim]`` (CLIP).
        """
        embeds, pooled, _ = self._text_pipeline().encode_prompt(
            prompt=prompt_list(prompts),
            prompt_2=None,
            device=self._text_device(),
            max_sequence_length=self.max_sequence_length,
        )
        return self._all_tokens(embeds, pooled)

    # -- images <-> latents --------------------------------------------------------------------------------------
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        self._check_size(height, width, self.vae_scale_factor * 2)  # 2×2 packing
        channels = int(self.transformer.config.in_channels) // 4
        return channels, height // self.vae_scale_factor, width // self.vae_scale_factor

    # -- the denoiser --------------------------------------------------------------------------------------------
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Packs ``x_t``, calls the transformer with ``timestep = t`` (σ), ``img_ids``/``txt_ids`` and, for dev,
        ``guidance = embedded_guidance``; unpacks its output, which is already ``z − x``.

        ``cond.mask`` is not used: the Flux transformer has no attention mask (all tokens attend, as in the pipeline).
        """
        b, _, h, w = x_t.shape
        dtype = self.compute_dtype
        device = x_t.device
        t = torch.as_tensor(t, device=device).reshape(-1).expand(b).float()
        # the pipeline passes (σ · 1000 in fp32, cast to the latents' dtype) / 1000
        timestep = (t * float(self.scheduler.config.num_train_timesteps)).to(dtype) / float(
            self.scheduler.config.num_train_timesteps
        )
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full([b], self.embedded_guidance, device=device, dtype=torch.float32)
        text_dtype = self.text_encoder.dtype if self.text_encoder is not None else dtype
        out = self.denoiser(
            hidden_states=pack_latents(x_t.to(dtype)),
            timestep=timestep,
            guidance=guidance,
            pooled_projections=self._pooled(cond).to(dtype),
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
        mu = self._shift_mu(calculate_shift, (h // 2) * (w // 2))
        if self.scheduler.config.get("use_flow_sigmas", None):
            return self._scheduler_sigmas(num_steps, num_steps, mu=mu)
        return self._scheduler_sigmas(num_steps, sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)

    def native_size(self) -> int:
        """``default_sample_size (128) · vae_scale_factor``, as ``FluxPipeline`` defaults."""
        return 128 * self.vae_scale_factor
