"""Qwen-Image adapter: the stock diffusers components behind the Backbone interface (docs/design.md §4).

Native conventions translated here: latents are 2×2-packed into tokens (``QwenImagePipeline._pack_latents``), the
transformer takes ``timestep = sigma`` in [0, 1] (the pipeline passes ``t / 1000``) and predicts ``noise − x0``, which
is already our ``v = z − x``. VAE latents are normalised with the VAE config's ``latents_mean`` / ``latents_std``.

diffusers / transformers are imported inside the functions that need them, so ``import apexctl.models`` stays cheap.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from apexctl.errors import BadInput
from apexctl.hub import load_component, write_json
from apexctl.models.base import Cond, PixelCodec
from apexctl.models.components import Part, PipelineBackbone, prompt_list
from apexctl.models.mmdit import JOINT_ATTENTION, pack_latents, unpack_latents


class QwenImageBackbone(PipelineBackbone):
    """Qwen-Image (``QwenImagePipeline``'s components). ``transformer`` is trainable; text encoder and codec frozen.

    The codec is either the real ``AutoencoderKLQwenImage`` (``vae/``) or a ``PixelCodec`` (``apexctl_codec.json``,
    the embedded digits default). ``text_encoder`` / ``codec`` may be ``None`` when loaded without them.
    """

    family = "qwen_image"
    projection_cancels_scalar_bias = True  # the text stream is read through LayerNorms only
    pipeline_class = "QwenImagePipeline"
    components = (
        Part("transformer", "diffusers", "QwenImageTransformer2DModel"),
        Part("scheduler", "diffusers", "FlowMatchEulerDiscreteScheduler"),
        Part("text_encoder", "transformers", "Qwen2_5_VLForConditionalGeneration"),
        Part("tokenizer", "transformers", "Qwen2Tokenizer"),
        Part("vae", "diffusers", "AutoencoderKLQwenImage"),
    )
    comfyui = True
    lora_targets = [*JOINT_ATTENTION, "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]
    #: ``QwenImageTransformerBlock`` returns ``(encoder_hidden_states, hidden_states)``: the image stream is second
    feature_blocks_name, feature_output_index = "transformer_blocks", 1
    #: QwenImagePipeline.__call__'s default max_sequence_length (prompt tokens after the template)
    max_sequence_length = 512

    # -- loading / saving ---------------------------------------------------------------------------------------
    @classmethod
    def _load_codec(cls, path: str, dtype: torch.dtype, load_codec: bool) -> tuple[nn.Module | None, dict]:
        """A local folder with ``apexctl_codec.json`` and no ``vae/`` has the pixel codec; any other the VAE."""
        pixel_cfg = Path(path) / PixelCodec.CONFIG_NAME
        if not (Path(path).is_dir() and not (Path(path) / "vae").is_dir() and pixel_cfg.is_file()):
            return super()._load_codec(path, dtype, load_codec)
        codec_config = load_component(path, "codec", lambda: json.loads(pixel_cfg.read_text()))
        if codec_config.get("type") != "pixel":
            raise BadInput(f"{pixel_cfg}: unknown codec type {codec_config.get('type')!r} (allowed: 'pixel')")
        if not load_codec:
            return None, codec_config
        return PixelCodec(int(codec_config.get("channels", 1)), int(codec_config.get("patch", 1))), codec_config

    @property
    def is_pixel(self) -> bool:
        return self.codec_config.get("type") == "pixel"

    def _write_components(self, out: Path, src: Path | None, dest: Path) -> None:
        if not self.is_pixel:
            return super()._write_components(out, src, dest)
        self._place_components(out, src, dest, {"text_encoder": self.text_encoder, "tokenizer": self.tokenizer})
        write_json(out / PixelCodec.CONFIG_NAME, self.codec_config)  # not a stock pipeline folder: no model_index

    # -- conditioning --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """``QwenImagePipeline.encode_prompt`` (template, first 34 tokens dropped, last hidden state, right padding).

        The mask is always returned (1 = token, 0 = padding); the pipeline returns ``None`` when it is all ones.
        """
        embeds, mask = self._text_pipeline().encode_prompt(
            prompt_list(prompts), device=self._text_device(), max_sequence_length=self.max_sequence_length
        )
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return Cond(embeds=embeds, mask=mask)

    def condition_site(self) -> nn.Module:
        """``transformer.txt_in``: the DiT's projection of the (RMS-normed) text embeddings to its width."""
        return self.transformer.txt_in

    @property
    def embed_dim(self) -> int:
        if self.text_encoder is not None:
            return int(self.text_encoder.config.text_config.hidden_size)
        return int(self.transformer.config.joint_attention_dim)

    # -- images <-> latents --------------------------------------------------------------------------------------
    def _vae_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.codec_config["latents_mean"], device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.codec_config["latents_std"], device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
        return mean, std

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [−1, 1] → ``(mode − latents_mean) / latents_std``, ``[B, z, H/f, W/f]`` (pixel: identity)."""
        codec = self._require_codec()
        if isinstance(codec, PixelCodec):
            return codec.encode(images)
        raw = codec.encode(images.to(codec.dtype)[:, :, None]).latent_dist.mode()[:, :, 0]  # video VAE: 1 frame
        mean, std = self._vae_stats(raw)
        return (raw - mean) / std

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse normalisation as ``QwenImagePipeline`` does before ``vae.decode`` → ``[B, 3, H, W]`` in [−1, 1]."""
        codec = self._require_codec()
        if isinstance(codec, PixelCodec):
            return codec.decode(latents)
        latents = latents.to(codec.dtype)
        mean, std = self._vae_stats(latents)
        return codec.decode((latents * std + mean)[:, :, None], return_dict=False)[0][:, :, 0]

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell: ``2 ** len(temperal_downsample)`` as in the pipeline; pixel codec: its ``patch``."""
        if self.is_pixel:
            return int(self.codec_config.get("patch", 1))
        return 2 ** len(self.codec_config["temperal_downsample"])

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        self._check_size(height, width, 2 * f)
        if self.is_pixel:
            channels = int(self.codec_config["channels"]) * int(self.codec_config.get("patch", 1)) ** 2
        else:
            channels = int(self.codec_config["z_dim"])
        return channels, height // f, width // f

    # -- the denoiser --------------------------------------------------------------------------------------------
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Packs 2×2, calls the transformer with ``timestep = t`` and unpacks; the output is already ``z − x``."""
        b, _, h, w = x_t.shape
        dtype = self.compute_dtype
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(b)
        mask = cond.mask
        # As QwenImagePipeline.encode_prompt: no mask when nothing is padded (lets SDPA pick its fastest kernel).
        if mask is not None and bool(mask.all()):
            mask = None
        out = self.denoiser(
            hidden_states=pack_latents(x_t).to(dtype),
            timestep=t.to(dtype),
            encoder_hidden_states=cond.embeds.to(dtype),
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w).to(x_t.dtype)

    def guidance_combine(self, v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """QwenImagePipeline's true CFG: ``u + s(c − u)`` rescaled to the norm of ``c``, per packed token (2×2×C)."""
        h, w = v_cond.shape[-2:]
        c, u = pack_latents(v_cond), pack_latents(v_uncond)
        comb = u + scale * (c - u)
        comb = comb * (torch.norm(c, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
        return unpack_latents(comb, h, w)

    def teacher_sigmas(self, num_steps: int, latent_shape: tuple[int, int, int]) -> torch.Tensor:
        """The pipeline's schedule: linspace(1, 1/N, N) shifted by ``mu`` of the packed sequence length, then 0."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

        _, h, w = latent_shape
        mu = self._shift_mu(calculate_shift, (h // 2) * (w // 2))
        return self._scheduler_sigmas(num_steps, sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)

    def native_size(self) -> int:
        """``default_sample_size (128) · vae_scale_factor``, as ``QwenImagePipeline`` defaults; a pixel-codec model
        (the embedded digits / scenes toys) draws an 8×8 latent grid: 8·patch pixels."""
        return (8 if self.is_pixel else 128) * self.vae_scale_factor
