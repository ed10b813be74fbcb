"""Z-Image adapter: the stock diffusers ``ZImagePipeline`` components behind the Backbone interface (docs/design.md §4).

Native conventions translated here (diffusers ``pipelines/z_image/pipeline_z_image.py``):

- Latents are ``[B, C, h, w]`` with ``h = 2·(H // (2f))``, ``f = 2 ** (len(vae.block_out_channels) − 1)``; decoding
  is ``vae.decode(latents / scaling_factor + shift_factor)``, so ``encode_images`` returns
  ``(mode − shift_factor) · scaling_factor``.
- The transformer takes *lists*: ``x = [(C, 1, h, w)] * B`` and ``cap_feats = [(L_i, D)] * B`` (each prompt's valid
  tokens only, variable length) and returns a list ``[(C, 1, h, w)] * B``.
- **Reversed time and sign.** The pipeline passes ``timestep = (1000 − σ·1000) / 1000 = 1 − σ`` (the model's time is 0
  at noise, 1 at data) and steps the scheduler with ``noise_pred = −model_out``. So in our convention (``t = σ``,
  ``v = z − x``): ``velocity(x_t, t) = −F(x_t, 1 − t)``.
- Prompts: ``tokenizer.apply_chat_template([{"role": "user", ...}], add_generation_prompt=True,
  enable_thinking=True)``, padded to ``max_sequence_length = 512``, the Qwen3 text encoder's **second-to-last**
  hidden state (``hidden_states[-2]``), then only the tokens the attention mask marks. ``Cond`` holds them right-padded
  to the longest prompt of the batch with the mask; ``velocity`` hands the transformer ``embeds[i][mask[i]]`` again.
- CFG: the pipeline's ``guidance_scale = g`` means ``c + g·(c − u)`` (CFG on when ``g > 0``). apexctl's ``scale`` is
  the usual ``u + s·(c − u)``, so ``s = 1 + g`` (``s = 1``: no CFG ↔ pipeline ``guidance_scale = 0``). The
  pipeline's defaults ``cfg_normalization = False`` and ``cfg_truncation = 1.0`` are no-ops (``1 − σ`` never exceeds
  1); ``cfg_normalization`` (a float > 0: cap the guided norm at that multiple of the conditional norm, per sample) is
  supported as an attribute, truncation below 1 is not (``guidance_combine`` does not see the time).
- Schedule: ``sigmas = linspace(1, 1/N, N)`` through ``scheduler.set_timesteps(sigmas=…, mu=calculate_shift(…))``
  (``mu`` only matters with ``use_dynamic_shifting``), then 0.

Condition site: ``transformer.cap_embedder`` (RMSNorm + Linear to the DiT width). The stock forward calls it on the
**packed** caption tokens ``[Σ_i L'_i, cap_dim]`` (``L'_i`` = ``L_i`` rounded up to a multiple of 32 by repeating the
last token), so a forward hook could not tell the samples apart. ``velocity`` therefore wraps the call with a forward
pre-hook that turns the packed input into ``[B, max L'_i, cap_dim]`` (zero-padded rows) and a forward hook, registered
after any hook already on the site (e.g. the engine's ``ConditionShift``), that packs the output back. Both layers act
per token, so the result is the stock one; a hook on the site sees ``[B, L, dim]`` rows, one per sample.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from apexctl.models.base import Cond, ScaledKLCodec
from apexctl.models.components import Part, PipelineBackbone, prompt_list

#: a minimal Qwen3-style chat template (what ``ZImagePipeline`` needs: user turn + generation prompt, thinking on)
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def _seq_multiple() -> int:
    from diffusers.models.transformers import transformer_z_image

    return int(getattr(transformer_z_image, "SEQ_MULTI_OF", 32))


class ZImageBackbone(ScaledKLCodec, PipelineBackbone):
    """Z-Image (``ZImagePipeline``'s components). ``transformer`` is trainable; text encoder and VAE frozen.

    ``text_encoder`` / ``codec`` may be ``None`` when loaded without them.
    """

    time_embedding_name = "t_embedder"

    family = "z_image"
    pipeline_class = "ZImagePipeline"
    components = (
        Part("transformer", "diffusers", "ZImageTransformer2DModel"),
        Part("scheduler", "diffusers", "FlowMatchEulerDiscreteScheduler"),
        Part("text_encoder", "transformers", "Qwen3Model"),
        Part("tokenizer", "transformers", "Qwen2Tokenizer"),
        Part("vae", "diffusers", "AutoencoderKL"),
    )
    comfyui = True
    lora_targets = [
        "attention.to_q",
        "attention.to_k",
        "attention.to_v",
        "attention.to_out.0",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
    ]
    #: ZImagePipeline.__call__'s default max_sequence_length
    max_sequence_length = 512
    #: ZImagePipeline.__call__'s default cfg_normalization (False/0: off)
    cfg_normalization: float = 0.0
    #: the main ``layers`` run on one unified sequence per sample, ``[image tokens (padded to a multiple of 32),
    #: caption tokens]`` in the stock (non-omni) mode; each ``ZImageTransformerBlock`` returns it as one tensor
    feature_blocks_name, feature_output_index = "layers", None
    #: image tokens of the latest ``velocity`` call, ``(h/2)·(w/2)`` (the features' N); the unified sequence does
    #: not show where the image's own padding ends
    _image_tokens: int | None = None

    # -- conditioning --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """``ZImagePipeline.encode_prompt`` (chat template, ``hidden_states[-2]``, valid tokens only), right-padded
        to the longest prompt with the mask (1 = token, 0 = padding)."""
        embeds, _ = self._text_pipeline().encode_prompt(
            prompt_list(prompts),  # a copy: the pipeline rewrites the list in place
            device=self._text_device(),
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return self.cond_from_list(embeds)

    @staticmethod
    def cond_from_list(embeds: list[torch.Tensor]) -> Cond:
        """The pipeline's per-prompt ``[L_i, D]`` list → ``Cond`` (right padding + mask)."""
        length = max(int(e.shape[0]) for e in embeds)
        first = embeds[0]
        out = first.new_zeros(len(embeds), length, first.shape[-1])
        mask = torch.zeros(len(embeds), length, dtype=torch.long, device=first.device)
        for i, e in enumerate(embeds):
            out[i, : e.shape[0]] = e
            mask[i, : e.shape[0]] = 1
        return Cond(embeds=out, mask=mask)

    @staticmethod
    def cond_to_list(cond: Cond) -> list[torch.Tensor]:
        """``Cond`` → the per-sample list of valid tokens the transformer takes."""
        if cond.mask is None:
            return list(cond.embeds.unbind(0))
        return [e[m.bool()] for e, m in zip(cond.embeds, cond.mask, strict=True)]

    def condition_site(self) -> nn.Module:
        """``transformer.cap_embedder`` (RMSNorm + Linear of the Qwen3 features to the DiT width); inside
        ``velocity`` it sees per-sample rows ``[B, L, dim]`` (see the module docstring)."""
        return self.transformer.cap_embedder

    def condition_dim(self) -> int:
        return int(self.transformer.cap_embedder[-1].out_features)

    @property
    def embed_dim(self) -> int:
        if self.text_encoder is not None:
            return int(self.text_encoder.config.hidden_size)
        return int(self.transformer.config.cap_feat_dim)

    # -- the GAN head's features ---------------------------------------------------------------------------------
    def feature_site(self, module: nn.Module | None = None) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
        """The middle of ``layers``; ``extract`` keeps the first ``(h/2)·(w/2)`` tokens of each unified row (the
        image's, before its padding and the caption), ``h × w`` the latents of the ``velocity`` call running."""
        block, _ = super().feature_site(module)

        def extract(output: torch.Tensor) -> torch.Tensor:
            if self._image_tokens is None:
                raise RuntimeError("Z-Image features are read inside ZImageBackbone.velocity only")
            return output[:, : self._image_tokens]

        return block, extract

    def feature_dim(self) -> int:
        return int(self.transformer.config.dim)

    # -- images <-> latents --------------------------------------------------------------------------------------
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor * 2
        self._check_size(height, width, f)
        return int(self.codec_config["latent_channels"]), 2 * (height // f), 2 * (width // f)

    # -- the denoiser --------------------------------------------------------------------------------------------
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """``−F([x_t[i][:, None]], 1 − t, [valid tokens of row i])`` stacked back to ``[B, C, h, w]``."""
        b = x_t.shape[0]
        dtype = self.compute_dtype
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32).reshape(-1).expand(b)
        # the pipeline: scheduler timestep σ·T (fp32), then (1000 − timestep) / 1000
        timestep = (1000 - t * float(self.scheduler.config.num_train_timesteps)) / 1000
        caps = [c.to(dtype) for c in self.cond_to_list(cond)]
        # the transformer's default patch_size 2 on one frame: the image's tokens, for feature_site's extract
        self._image_tokens = (x_t.shape[-2] // 2) * (x_t.shape[-1] // 2)
        with self._per_sample_site([int(c.shape[0]) for c in caps]):
            out = self.denoiser(
                list(x_t.to(dtype).unsqueeze(2).unbind(0)), timestep.to(dtype), caps, return_dict=False
            )[0]
        v = torch.stack([o.float() for o in out], dim=0).squeeze(2)
        return (-v).to(x_t.dtype)

    def _per_sample_site(self, lengths: list[int]):
        """Within the block, ``cap_embedder`` runs on ``[B, max L', cap_dim]`` rows instead of the packed tokens."""
        from contextlib import contextmanager

        multiple = _seq_multiple()
        padded = [n + (-n) % multiple for n in lengths]
        site = self.condition_site()

        def unpack_in(_module: nn.Module, args: tuple):
            packed = args[0]
            if packed.dim() != 2 or packed.shape[0] != sum(padded):
                return None  # not the call we prepared for: leave it alone
            rows = torch.nn.utils.rnn.pad_sequence(list(packed.split(padded, dim=0)), batch_first=True)
            return (rows, *args[1:])

        def pack_out(_module: nn.Module, _args: tuple, output: torch.Tensor):
            if output.dim() != 3 or output.shape[0] != len(padded):
                return None
            return torch.cat([output[i, :n] for i, n in enumerate(padded)], dim=0)

        @contextmanager
        def ctx():
            pre = site.register_forward_pre_hook(unpack_in)
            post = site.register_forward_hook(pack_out)  # after any hook already there (the condition shift)
            try:
                yield
            finally:
                pre.remove()
                post.remove()

        return ctx()

    def guidance_combine(self, v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """ZImagePipeline's CFG with ``guidance_scale = scale − 1``: ``c + (s − 1)(c − u)`` per sample in fp32, with
        the optional ``cfg_normalization`` cap (off by default, as in the pipeline). The sign flip of ``v`` does not
        change the rule (it is linear and the norms are sign-free)."""
        g = float(scale) - 1.0
        c, u = v_cond.float(), v_uncond.float()
        pred = c + g * (c - u)
        if self.cfg_normalization and float(self.cfg_normalization) > 0.0:
            c_norm = torch.linalg.vector_norm(c.flatten(1), dim=1)
            p_norm = torch.linalg.vector_norm(pred.flatten(1), dim=1)
            cap = c_norm * float(self.cfg_normalization)
            factor = torch.where(p_norm > cap, cap / p_norm, torch.ones_like(p_norm))
            pred = pred * factor.view(-1, *([1] * (pred.dim() - 1)))
        return pred.to(v_cond.dtype)

    def teacher_sigmas(self, num_steps: int, latent_shape: tuple[int, int, int]) -> torch.Tensor:
        """The pipeline's schedule: ``linspace(1, 1/N, N)`` through ``set_timesteps(sigmas, mu)``, then 0."""
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

        _, h, w = latent_shape
        mu = self._shift_mu(calculate_shift, (h // 2) * (w // 2))
        sigmas = torch.linspace(1.0, 1 / num_steps, num_steps).tolist()  # get_default_z_image_sigmas
        return self._scheduler_sigmas(num_steps, sigmas=sigmas, mu=mu)

    def native_size(self) -> int:
        """1024, as ``ZImagePipeline`` defaults."""
        return 1024
