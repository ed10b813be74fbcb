"""Hub-free tiny FLUX.1 build for tests (notes/cpu-and-tiny-models.md §2-§3).

Random stock components built in code (``FluxTransformer2DModel``, f2 ``AutoencoderKL`` with 4 latent channels so
the packed width is 16, ``CLIPTextModel`` + ``T5EncoderModel``) with the deterministic CLIP / T5 tokenizers of
``tiny_sd3``, saved through ``FluxBackbone.save_pretrained``; 32×32 images → latents ``(4, 16, 16)`` → 64 packed
tokens. ``guidance_embeds=False`` is schnell-like (static shift 1); ``True`` is dev-like (dynamic shifting).
"""

from __future__ import annotations

from pathlib import Path

from apexctl.models.tiny_parts import clip_text_config, kl_vae, save_tiny, seeded, t5_encoder
from apexctl.models.tokenizers import clip_tokenizer_det, t5_tokenizer_det

#: FLUX.1-schnell's scheduler config (no dynamic shifting)
FLUX_SCHNELL_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "base_shift": 0.5,
    "max_shift": 1.15,
}
#: FLUX.1-dev's scheduler config (resolution-dependent shifting)
FLUX_DEV_SCHEDULER = {**FLUX_SCHNELL_SCHEDULER, "shift": 3.0, "use_dynamic_shifting": True}
#: FLUX.1's VAE normalisation (16-channel in the real model; 4 here), non-trivial so tests see it
FLUX_SCALING_FACTOR = 0.3611
FLUX_SHIFT_FACTOR = 0.1159


def build_tiny_flux(out_dir: str | Path, seed: int = 0, guidance_embeds: bool = False) -> Path:
    """Build the tiny Flux model from ``seed`` and save it to ``out_dir`` (a folder ``FluxBackbone.from_pretrained``
    and ``FluxPipeline.from_pretrained`` both load). The global torch RNG is left untouched."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel

    from apexctl.models.flux import FluxBackbone

    tok, tok_2 = clip_tokenizer_det(), t5_tokenizer_det()
    clip_hidden, t5_dim = 16, 32
    with seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=t5_dim,
            pooled_projection_dim=clip_hidden,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 6, 6),
        )
        vae = kl_vae([8, 16], scaling_factor=FLUX_SCALING_FACTOR, shift_factor=FLUX_SHIFT_FACTOR)
        text = {
            "text_encoder": CLIPTextModel(clip_text_config(tok, clip_hidden)),
            "text_encoder_2": t5_encoder(tok_2, t5_dim),
        }
    scheduler = FLUX_DEV_SCHEDULER if guidance_embeds else FLUX_SCHNELL_SCHEDULER
    return save_tiny(FluxBackbone, out_dir, transformer, scheduler, vae, **text, tokenizer=tok, tokenizer_2=tok_2)
