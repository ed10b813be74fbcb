"""CLIP loading and embeddings for evaluation (GenEval colour classification, CLIP score).

``load_clip(path)`` loads a transformers ``CLIPModel`` + ``CLIPProcessor`` from a local folder (or a hub id that is
already in the local cache); anything missing is one ``BadInput`` line naming what to download (exit 2). Weights are
never downloaded by apexctl.

``embed_images`` / ``embed_texts`` return L2-normalised float32 embeddings on the CPU, so ``100 · img @ txt.T`` is
CLIP's logit scale used by open_clip / clip_benchmark zero-shot classification. Images go through the processor's
own transform (resize shortest side to 224 bicubic, centre crop, OpenAI mean/std: the same steps as open_clip's
``val`` transform for the OpenAI models).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from apexctl.errors import BadInput

#: what GenEval's reference uses (open_clip ViT-L-14 "openai"); its transformers port
DEFAULT_CLIP = "openai/clip-vit-large-patch14"


@dataclass
class Clip:
    """A loaded CLIP: model (eval mode), processor, device and where it came from."""

    model: Any
    processor: Any
    device: torch.device
    source: str


def _missing(path: str | Path, option: str, suggest: str, why: str) -> BadInput:
    return BadInput(
        f"{option} {path}: {why}; download {suggest} (e.g. `hf download {suggest} --local-dir DIR`) and pass {option} DIR"
    )


def load_clip(
    path: str | Path | None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    option: str = "--clip",
    suggest: str = DEFAULT_CLIP,
) -> Clip:
    """``CLIPModel`` + ``CLIPProcessor`` from ``path`` (a folder with config, weights and tokenizer files).

    A missing folder, a folder without ``config.json``, missing weight/tokenizer files, or a hub id not in the local
    cache each raise ``BadInput`` naming ``option`` and the model to download (``suggest``).
    """
    if path is None:
        raise _missing("(not given)", option, suggest, "CLIP weights are needed")
    p = Path(path)
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise _missing(path, option, suggest, "not a CLIP model folder (no config.json)")
    elif str(path).startswith((".", "/", "~")) or str(path).count("/") != 1:
        raise _missing(path, option, suggest, "no such folder")
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(str(path), dtype=dtype)
        processor = CLIPProcessor.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise _missing(path, option, suggest, f"cannot load CLIP ({type(exc).__name__})") from None
    # transformers 5 offline: an uncached tokenizer can load silently empty (notes/cpu-and-tiny-models.md)
    if len(processor.tokenizer) < 100:
        raise _missing(path, option, suggest, "the CLIP tokenizer files are missing")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(dev).eval()
    return Clip(model=model, processor=processor, device=dev, source=str(path))


def _features(out: Any) -> torch.Tensor:
    # transformers 4 returns the projected tensor, transformers 5 a ModelOutput whose pooler_output is projected
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def embed_images(clip: Clip, images: Sequence[Any], batch: int = 16) -> torch.Tensor:
    """L2-normalised image embeddings ``[N, D]`` (float32, CPU) of PIL images (converted to RGB)."""
    dtype = next(clip.model.parameters()).dtype
    out = []
    for i in range(0, len(images), batch):
        chunk = [im.convert("RGB") for im in images[i : i + batch]]
        pix = clip.processor(images=chunk, return_tensors="pt")["pixel_values"].to(clip.device, dtype)
        out.append(_features(clip.model.get_image_features(pixel_values=pix)).float().cpu())
    if not out:
        return torch.zeros(0, clip.model.config.projection_dim)
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def embed_texts(clip: Clip, texts: Sequence[str], batch: int = 64) -> torch.Tensor:
    """L2-normalised text embeddings ``[N, D]`` (float32, CPU); texts longer than 77 tokens are truncated."""
    out = []
    for i in range(0, len(texts), batch):
        tok = clip.processor.tokenizer(
            list(texts[i : i + batch]), padding=True, truncation=True, max_length=77, return_tensors="pt"
        )
        tok = {k: v.to(clip.device) for k, v in tok.items()}
        out.append(_features(clip.model.get_text_features(**tok)).float().cpu())
    if not out:
        return torch.zeros(0, clip.model.config.projection_dim)
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)
