"""Stable Diffusion 3 / 3.5 adapter: the stock diffusers components behind the Backbone interface (docs/design.md §4).

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

import torch

from apexctl.models.base import Cond, ScaledKLCodec
from apexctl.models.components import Part, PipelineBackbone, prompt_list
from apexctl.models.mmdit import JOINT_ATTENTION, PooledText


class SD3Backbone(ScaledKLCodec, PooledText, PipelineBackbone):
    """Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``'s components). ``transformer`` is trainable; the
    three text encoders and the VAE are frozen. Text encoders / codec may be ``None`` when loaded without them
    (``text_encoder_3`` may also be absent from a folder: the pipeline then uses zeros for the T5 tokens)."""

    family = "sd3"
    projection_cancels_scalar_bias = True  # the text stream is read through LayerNorms only
    pipeline_class = "StableDiffusion3Pipeline"
    #: the layout of the hub SD3 / SD3.5 repositories
    components = (
        Part("transformer", "diffusers", "SD3Transformer2DModel"),
        Part("scheduler", "diffusers", "FlowMatchEulerDiscreteScheduler"),
        Part("text_encoder", "transformers", "CLIPTextModelWithProjection"),
        Part("text_encoder_2", "transformers", "CLIPTextModelWithProjection"),
        Part("tokenizer", "transformers", "CLIPTokenizer", min_tokens=10),
        Part("tokenizer_2", "transformers", "CLIPTokenizer", min_tokens=10),
        # SD3 runs without T5 (the pipeline then feeds zeros): only a local folder may omit it
        Part("text_encoder_3", "transformers", "T5EncoderModel", present_if="text_encoder_3"),
        Part("tokenizer_3", "transformers", "T5TokenizerFast", min_tokens=10, present_if="text_encoder_3"),
        Part("vae", "diffusers", "AutoencoderKL"),
    )
    absent_parts = ("image_encoder", "feature_extractor")
    comfyui = True
    lora_targets = list(JOINT_ATTENTION)
    #: ``JointTransformerBlock`` returns ``(encoder_hidden_states, hidden_states)`` (the first None in the last,
    #: ``context_pre_only`` block): the image stream is second
    feature_blocks_name, feature_output_index = "transformer_blocks", 1
    #: StableDiffusion3Pipeline.__call__'s default max_sequence_length (T5 tokens)
    max_sequence_length = 256

    # -- conditioning --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """``StableDiffusion3Pipeline.encode_prompt`` → ``Cond(prompt_embeds, mask = ones, pooled_prompt_embeds)``.

        ``embeds [B, 77 + max_sequence_length, joint_attention_dim]``, ``pooled [B, proj_1 + proj_2]``.
        """
        embeds, _, pooled, _ = self._text_pipeline().encode_prompt(
            prompt=prompt_list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=self._text_device(),
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return self._all_tokens(embeds, pooled)

    # -- images <-> latents --------------------------------------------------------------------------------------
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        self._check_size(height, width, self.vae_scale_factor * int(self.transformer.config.patch_size))
        channels = int(self.codec_config["latent_channels"])
        return channels, height // self.vae_scale_factor, width // self.vae_scale_factor

    # -- the denoiser --------------------------------------------------------------------------------------------
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Calls the transformer with ``timestep = t · num_train_timesteps``; its output is already ``z − x``.

        ``cond.mask`` is not used: the SD3 transformer has no attention mask (all tokens attend, as in the pipeline).
        """
        b = x_t.shape[0]
        dtype = self.compute_dtype
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(b).float()
        # the pipeline passes the scheduler's fp32 timesteps (σ · 1000) whatever the transformer dtype
        timestep = t * float(self.scheduler.config.num_train_timesteps)
        out = self.denoiser(
            hidden_states=x_t.to(dtype),
            timestep=timestep,
            encoder_hidden_states=cond.embeds.to(dtype),
            pooled_projections=self._pooled(cond).to(dtype),
            return_dict=False,
        )[0]
        return out.to(x_t.dtype)

    def teacher_sigmas(self, num_steps: int, latent_shape: tuple[int, int, int]) -> torch.Tensor:
        """The pipeline's schedule: ``set_timesteps(N)`` (static ``shift``; ``mu`` of the patch count only when the
        scheduler uses dynamic shifting, SD3's ``max_shift`` default 1.16), then 0."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        _, h, w = latent_shape
        kwargs = {}
        if self.scheduler.config.get("use_dynamic_shifting", None):
            p = int(self.transformer.config.patch_size)
            kwargs["mu"] = self._shift_mu(calculate_shift, (h // p) * (w // p), max_shift=1.16)
        return self._scheduler_sigmas(num_steps, num_steps, **kwargs)

    def native_size(self) -> int:
        """``transformer.config.sample_size · vae_scale_factor``, as ``StableDiffusion3Pipeline`` defaults."""
        return int(self.transformer.config.sample_size) * self.vae_scale_factor
