"""Hub-free tiny Stable Diffusion 3 build for tests (notes/cpu-and-tiny-models.md §2-§3).

Random stock components built in code (``SD3Transformer2DModel``, f4 ``AutoencoderKL``, 2× ``CLIPTextModelWithProjection``
+ ``T5EncoderModel``) and saved through ``SD3Backbone.save_pretrained``; 32×32 images → latents ``(4, 8, 8)``.

The CLIP and T5 tokenizers are built *without training* (trained CLIP-BPE with ``</w>`` and Unigram tokenizers break
ties by hash order, so ids change between processes): the CLIP vocabulary is the byte alphabet, its ``</w>`` variants
and one left-to-right merge chain per corpus word; the T5 vocabulary is an explicit Unigram piece list. Same seed →
identical files in every process.
"""

from __future__ import annotations

from pathlib import Path

from apexctl.models.tiny_parts import clip_text_config, kl_vae, save_tiny, seeded, t5_encoder
from apexctl.models.tokenizers import clip_tokenizer_det, t5_tokenizer_det

#: SD3 / SD3.5's own scheduler config (static shift 3, no dynamic shifting)
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
#: SD3's VAE normalisation (16-channel in the real model; 4 here), non-trivial so tests see it
SD3_SCALING_FACTOR = 1.5305
SD3_SHIFT_FACTOR = 0.0609


def build_tiny_sd3(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny SD3 model from ``seed`` and save it to ``out_dir`` (a folder ``SD3Backbone.from_pretrained`` and
    ``StableDiffusion3Pipeline.from_pretrained`` both load). The global torch RNG is left untouched."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    from apexctl.models.sd3 import SD3Backbone

    tok, tok_2, tok_3 = clip_tokenizer_det(), clip_tokenizer_det(), t5_tokenizer_det()
    clip_hidden, clip_proj, t5_dim = 16, 16, 48  # 2 × 16 CLIP features zero-padded to the T5 width, as in SD3
    clip_config = clip_text_config(tok, clip_hidden, projection_dim=clip_proj)
    with seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=t5_dim,
            caption_projection_dim=16,  # = heads × head_dim, as in SD3
            pooled_projection_dim=2 * clip_proj,
            out_channels=4,
            pos_embed_max_size=32,
            qk_norm="rms_norm",  # SD3.5
        )
        vae = kl_vae([8, 16, 16], scaling_factor=SD3_SCALING_FACTOR, shift_factor=SD3_SHIFT_FACTOR)
        text = {name: CLIPTextModelWithProjection(clip_config) for name in ("text_encoder", "text_encoder_2")}
        text["text_encoder_3"] = t5_encoder(tok_3, t5_dim)
    tokenizers = {"tokenizer": tok, "tokenizer_2": tok_2, "tokenizer_3": tok_3}
    return save_tiny(SD3Backbone, out_dir, transformer, SD3_SCHEDULER, vae, **text, **tokenizers)
