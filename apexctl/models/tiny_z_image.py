"""Hub-free, deterministic tiny Z-Image build for tests (notes/cpu-and-tiny-models.md §2-§3).

``build_tiny_z_image(out)`` builds random stock components in code — ``Qwen3Model`` text encoder, the byte-level BPE
``Qwen2Tokenizer`` of ``apexctl.models.tokenizers`` with a minimal Qwen3 chat template, an f2 ``AutoencoderKL`` and a
2-layer ``ZImageTransformer2DModel`` — and saves them through ``ZImageBackbone.save_pretrained``, so the folder loads in
the stock ``ZImagePipeline`` too. 32×32 images → latents ``(4, 16, 16)``. The scheduler config is Z-Image's
(``shift = 3``, no dynamic shifting).
"""

from __future__ import annotations

from pathlib import Path

import torch

from apexctl.models.tiny_parts import kl_vae, save_tiny, seeded

TEXT_HIDDEN = 16
#: the hub Z-Image scheduler config
Z_IMAGE_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
#: chat-formatted text, so the turn markers of the template become whole tokens
CHAT_CORPUS = ("<|im_start|>user\na red fox<|im_end|>\n<|im_start|>assistant\n",)


def z_image_tokenizer():
    """The tiny Qwen2 tokenizer with ``ZImagePipeline``'s chat template (deterministic across processes)."""
    from apexctl.models.tokenizers import qwen2_tokenizer
    from apexctl.models.z_image import QWEN3_CHAT_TEMPLATE

    tok = qwen2_tokenizer(CHAT_CORPUS)
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    return tok


def build_tiny_z_image(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny Z-Image model from ``seed`` into ``out_dir``; the global torch RNG is left untouched."""
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from apexctl.models.z_image import ZImageBackbone

    tok = z_image_tokenizer()
    with seeded(seed):
        # the Flux VAE's normalisation, as Z-Image uses
        codec = kl_vae([8, 16], scaling_factor=0.3611, shift_factor=0.1159, quant_conv=True)
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=4,
            dim=32,
            n_layers=2,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            cap_feat_dim=TEXT_HIDDEN,
            axes_dims=[8, 4, 4],
            axes_lens=[256, 32, 32],
        )
        with torch.no_grad():  # created with torch.empty upstream: give them defined values
            transformer.x_pad_token.copy_(torch.randn_like(transformer.x_pad_token))
            transformer.cap_pad_token.copy_(torch.randn_like(transformer.cap_pad_token))
        text_encoder = Qwen3Model(
            Qwen3Config(
                hidden_size=TEXT_HIDDEN,
                intermediate_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                head_dim=8,
                max_position_embeddings=512,
                vocab_size=len(tok),
                pad_token_id=tok.pad_token_id,
                bos_token_id=tok.pad_token_id,
                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
            )
        ).eval()
    return save_tiny(
        ZImageBackbone, out_dir, transformer, Z_IMAGE_SCHEDULER, codec, text_encoder=text_encoder, tokenizer=tok
    )
