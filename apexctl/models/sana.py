"""SANA adapter: the stock diffusers ``SanaPipeline`` components behind the Backbone interface (docs/design.md §4).

Native conventions translated here (diffusers ``pipelines/sana/pipeline_sana.py``):

- Latents are ``[B, C, h, w]`` (no packing), normalised as ``vae.encode(x).latent * scaling_factor``; decoding
  divides by ``scaling_factor``.
- The transformer takes ``timestep = scheduler_t * timestep_scale`` where ``scheduler_t = σ · num_train_timesteps``
  (``FlowMatchEulerDiscreteScheduler``: float; ``DPMSolverMultistepScheduler(use_flow_sigmas=True)`` rounds it to an
  integer, which we do not); ``timestep_scale`` is a transformer config value (1.0 in SANA 1.0/1.5).
- It predicts the flow velocity ``noise − x0`` (``prediction_type="flow_prediction"``), already our ``v = z − x``. A
  learned-sigma head (``out_channels = 2C``) is cut to its first half, as the pipeline does.
- CFG is plain ``u + s(c − u)``.
- Prompts: Gemma-2 last hidden state, right padding to ``max_sequence_length = 300`` with the attention mask passed to
  the transformer. The positive prompt is prefixed with the pipeline's default ``complex_human_instruction`` (CHI) and
  then cut to [BOS] + the last 299 tokens; the **negative** prompt is encoded without CHI. ``encode_prompts`` therefore
  encodes the empty string ``""`` (the unconditional prompt everywhere in apexctl) like the pipeline's default
  ``negative_prompt=""``, every other prompt like a positive one; ``encode_negative_prompts`` encodes any string as a
  negative prompt.
- Schedule: the hub SANA models ship ``DPMSolverMultistepScheduler`` (flow sigmas, DPM-Solver++ 2M). ``teacher_sigmas``
  returns its σ grid (starting at 0.9997, not 1), but our first-order Euler only approximates that pipeline; with a
  ``FlowMatchEulerDiscreteScheduler`` (as the tiny build uses) Euler on ``teacher_sigmas`` reproduces the pipeline.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from apexctl.errors import BadInput
from apexctl.models.base import Cond
from apexctl.models.components import Part, PipelineBackbone, prompt_list


def default_complex_human_instruction() -> list[str]:
    """``SanaPipeline.__call__``'s default ``complex_human_instruction`` (read from the installed diffusers)."""
    from diffusers import SanaPipeline

    return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


class SanaBackbone(PipelineBackbone):
    """SANA (``SanaPipeline``'s components). ``transformer`` is trainable; text encoder and ``AutoencoderDC`` frozen.

    ``text_encoder`` / ``codec`` may be ``None`` when loaded without them.
    """

    time_embedding_name = None  # AdaLayerNormSingle returns the 6·D modulation, not the embedding

    family = "sana"
    pipeline_class = "SanaPipeline"
    components = (
        Part("transformer", "diffusers", "SanaTransformer2DModel"),
        # the schedulers SanaPipeline is used with (model_index.json records the one present)
        Part(
            "scheduler", "diffusers", "FlowMatchEulerDiscreteScheduler", alternatives=("DPMSolverMultistepScheduler",)
        ),
        Part("text_encoder", "transformers", "Gemma2Model"),
        Part("tokenizer", "transformers", "GemmaTokenizer"),
        Part("vae", "diffusers", "AutoencoderDC"),
    )
    lora_targets = [
        "attn1.to_q",
        "attn1.to_k",
        "attn1.to_v",
        "attn1.to_out.0",
        "attn2.to_q",
        "attn2.to_k",
        "attn2.to_v",
        "attn2.to_out.0",
    ]
    #: ``SanaTransformerBlock`` returns the image tokens ``[B, N, D]`` alone (the text enters by cross-attention)
    feature_blocks_name, feature_output_index = "transformer_blocks", None
    #: SanaPipeline.__call__'s default max_sequence_length
    max_sequence_length = 300

    def __init__(
        self,
        transformer: nn.Module,
        scheduler: Any,
        *,
        complex_human_instruction: list[str] | None = None,
        **parts: Any,
    ):
        """``complex_human_instruction``: the CHI lines for positive prompts (``None``: the pipeline's default;
        ``[]``: none); ``parts``: as ``PipelineBackbone``."""
        if getattr(transformer.config, "guidance_embeds", False):
            raise BadInput("SANA transformers with guidance_embeds (SANA-Sprint) are not supported")
        super().__init__(transformer, scheduler, **parts)
        self.complex_human_instruction = complex_human_instruction

    # -- conditioning --------------------------------------------------------------------------------------------
    def _chi(self) -> list[str]:
        if self.complex_human_instruction is None:
            return default_complex_human_instruction()
        return list(self.complex_human_instruction)

    @torch.no_grad()
    def _encode_positive(self, prompts: list[str]) -> Cond:
        embeds, mask, _, _ = self._text_pipeline().encode_prompt(
            list(prompts),
            do_classifier_free_guidance=False,
            device=self._text_device(),
            max_sequence_length=self.max_sequence_length,
            complex_human_instruction=self._chi(),
        )
        return Cond(embeds=embeds, mask=mask.long())

    @torch.no_grad()
    def encode_negative_prompts(self, prompts: list[str]) -> Cond:
        """As ``SanaPipeline.encode_prompt`` encodes ``negative_prompt``: no CHI, first 300 tokens."""
        embeds, mask = self._text_pipeline()._get_gemma_prompt_embeds(
            prompt=prompt_list(prompts),
            device=self._text_device(),
            dtype=self.text_encoder.dtype,
            clean_caption=False,
            max_sequence_length=self.max_sequence_length,
            complex_human_instruction=False,
        )
        return Cond(embeds=embeds, mask=mask.long())

    def encode_prompts(self, prompts: list[str]) -> Cond:
        """``SanaPipeline.encode_prompt``: positive prompts with CHI, ``""`` as the pipeline's negative prompt.

        Every row has ``max_sequence_length`` tokens; the mask (1 = token, 0 = padding) is always returned.
        """
        prompts = prompt_list(prompts)
        empty = [i for i, p in enumerate(prompts) if p == ""]
        full = [i for i, p in enumerate(prompts) if p != ""]
        if not empty:
            return self._encode_positive(prompts)
        if not full:
            return self.encode_negative_prompts(prompts)
        pos = self._encode_positive([prompts[i] for i in full])
        neg = self.encode_negative_prompts([""])
        embeds = pos.embeds.new_empty(len(prompts), *pos.embeds.shape[1:])
        mask = pos.mask.new_empty(len(prompts), pos.mask.shape[1])
        embeds[full], mask[full] = pos.embeds, pos.mask
        embeds[empty], mask[empty] = neg.embeds, neg.mask
        return Cond(embeds=embeds, mask=mask)

    def condition_site(self) -> nn.Module:
        """``transformer.caption_projection``: the DiT's MLP projection of the Gemma embeddings to its width (followed
        by ``caption_norm``)."""
        return self.transformer.caption_projection

    def condition_dim(self) -> int:
        return int(self.transformer.caption_projection.linear_2.out_features)

    @property
    def embed_dim(self) -> int:
        if self.text_encoder is not None:
            return int(self.text_encoder.config.hidden_size)
        return int(self.transformer.config.caption_channels)

    # -- images <-> latents --------------------------------------------------------------------------------------
    @property
    def scaling_factor(self) -> float:
        return float(self.codec_config["scaling_factor"])

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [−1, 1] → ``vae.encode(x).latent * scaling_factor``."""
        codec = self._require_codec()
        raw = codec.encode(images.to(codec.dtype)).latent
        return raw * self.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """As ``SanaPipeline``: ``vae.decode(latents / scaling_factor)`` → ``[B, 3, H, W]`` in [−1, 1]."""
        codec = self._require_codec()
        latents = latents.to(codec.dtype)
        return codec.decode(latents / self.scaling_factor, return_dict=False)[0]

    @property
    def vae_scale_factor(self) -> int:
        """``2 ** (len(encoder_block_out_channels) − 1)`` as in the pipeline."""
        return 2 ** (len(self.codec_config["encoder_block_out_channels"]) - 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        self._check_size(height, width, self.vae_scale_factor * int(self.transformer.config.patch_size))
        v = self.vae_scale_factor
        return int(self.codec_config["latent_channels"]), height // v, width // v

    # -- the denoiser --------------------------------------------------------------------------------------------
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Calls the transformer with ``timestep = t · num_train_timesteps · timestep_scale``; the output (first half
        for a learned-sigma head) is already ``z − x``."""
        b, c = x_t.shape[:2]
        dtype = self.compute_dtype
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32).reshape(-1).expand(b)
        # the pipeline: scheduler timesteps (σ·T, fp32), then × timestep_scale
        timestep = t * float(self.scheduler.config.num_train_timesteps)
        timestep = timestep * float(getattr(self.transformer.config, "timestep_scale", 1.0))
        out = self.denoiser(
            x_t.to(dtype),
            encoder_hidden_states=cond.embeds.to(dtype),
            encoder_attention_mask=cond.mask,
            timestep=timestep,
            return_dict=False,
        )[0]
        if out.shape[1] == 2 * c:  # learned sigma
            out = out[:, :c]
        return out.to(x_t.dtype)

    def teacher_sigmas(self, num_steps: int, latent_shape: tuple[int, int, int]) -> torch.Tensor:
        """The pipeline's schedule: ``scheduler.set_timesteps(num_steps)`` (SANA passes no ``mu``/``sigmas``), σ grid
        ending at 0. For ``DPMSolverMultistepScheduler`` this is its flow-σ grid (Euler only approximates DPM-Solver)."""
        sig = self._scheduler_sigmas(num_steps, num_steps, device="cpu")
        if len(sig) != num_steps + 1 or float(sig[-1]) != 0.0:
            raise BadInput(
                f"{type(self.scheduler).__name__}: schedule of {num_steps} steps has {len(sig)} sigmas ending at "
                f"{float(sig[-1])}; expected {num_steps + 1} ending at 0"
            )
        return sig

    def native_size(self) -> int:
        """``SanaPipeline`` draws 1024×1024 binned to its ``sample_size``'s aspect-ratio table (512, 1024, 2048, 4096
        px for sample_size 16, 32, 64, 128): ``32 · sample_size`` (= sample_size · vae_scale_factor with DC-AE f32)."""
        return 32 * int(self.transformer.config.sample_size)
