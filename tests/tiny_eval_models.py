"""Tiny random evaluation models built in code and saved with ``save_pretrained`` (no hub): CLIP, Mask2Former."""

from __future__ import annotations

from pathlib import Path


def build_tiny_clip(out: Path, seed: int = 0) -> Path:
    """A random ``CLIPModel`` (hidden 16, 2 layers, 32×32 images) + ``CLIPProcessor`` saved to ``out``."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from apexctl.models.tokenizers import clip_tokenizer_det

    torch.manual_seed(seed)
    tok = clip_tokenizer_det()
    text = dict(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    image_proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(out)
    CLIPProcessor(image_processor=image_proc, tokenizer=tok).save_pretrained(out)
    return out
