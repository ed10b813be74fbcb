"""Tiny random evaluation models built in code and saved with ``save_pretrained`` (no hub): CLIP, Mask2Former."""

from __future__ import annotations

from pathlib import Path


def build_tiny_clip(out: Path, seed: int = 0) -> Path:
    """A random ``CLIPModel`` (hidden 16, 2 layers, 32×32 images) + ``CLIPProcessor`` saved to ``out``."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from apexctl.models.tiny_parts import clip_text_config
    from apexctl.models.tokenizers import clip_tokenizer_det

    torch.manual_seed(seed)
    tok = clip_tokenizer_det()
    text = clip_text_config(tok, 16).to_dict()  # the text tower of the tiny SD3 / FLUX builds
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    image_proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(out)
    CLIPProcessor(image_processor=image_proc, tokenizer=tok).save_pretrained(out)
    return out


def build_tiny_mask2former(
    out: Path, labels: list[str] | None = None, boost: tuple[str, ...] = (), seed: int = 0
) -> Path:
    """A random ``Mask2FormerForUniversalSegmentation`` (tiny Swin, 80 COCO labels, 10 queries) + its image processor
    saved to ``out``; ``labels`` overrides ``id2label`` (default: GenEval's 80 class names); the classes in ``boost``
    get a large logit bias, so every query proposes them (the pipeline then has objects to classify)."""
    import torch
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    from apexctl.eval.geneval.prompts import class_names

    torch.manual_seed(seed)
    names = list(labels if labels is not None else class_names())
    swin = SwinConfig(
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        image_size=64,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=swin,
        num_queries=10,
        hidden_dim=32,
        feature_size=32,
        mask_feature_size=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_feedforward_dim=32,
        dim_feedforward=32,
        num_attention_heads=2,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    model = Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():
        for name in boost:
            model.class_predictor.bias[names.index(name)] += 8.0
    model.save_pretrained(out)
    Mask2FormerImageProcessor().save_pretrained(out)
    return out
