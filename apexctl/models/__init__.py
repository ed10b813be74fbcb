"""Model families behind the Backbone interface, and ``load_backbone`` (docs/design.md §4).

Cheap to import: the adapters import diffusers / transformers only when a model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from apexctl.errors import BadInput
from apexctl.models.base import MODEL_MARKER, Backbone, Cond, PixelCodec
from apexctl.models.flux import FluxBackbone
from apexctl.models.qwen_image import QwenImageBackbone
from apexctl.models.sana import SanaBackbone
from apexctl.models.sd3 import SD3Backbone
from apexctl.models.tiny import build_tiny_qwen_image, resolve_model_path
from apexctl.models.z_image import ZImageBackbone

FAMILIES: dict[str, type[Backbone]] = {
    "qwen_image": QwenImageBackbone,
    "sd3": SD3Backbone,
    "sana": SanaBackbone,
    "flux": FluxBackbone,
    "z_image": ZImageBackbone,
}
#: model_index.json ``_class_name`` → family
PIPELINE_FAMILIES = {
    "QwenImagePipeline": "qwen_image",
    "StableDiffusion3Pipeline": "sd3",
    "SanaPipeline": "sana",
    "FluxPipeline": "flux",
    "ZImagePipeline": "z_image",
}

__all__ = [
    "FAMILIES",
    "Backbone",
    "Cond",
    "PixelCodec",
    "QwenImageBackbone",
    "build_tiny_qwen_image",
    "detect_family",
    "load_backbone",
    "resolve_model_path",
]


def _allowed() -> str:
    return ", ".join(FAMILIES)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def detect_family(path: str | Path) -> str:
    """Family of a local model folder: ``apexctl_model.json`` ``family``, else ``model_index.json`` ``_class_name``."""
    folder = Path(path)
    marker = folder / MODEL_MARKER
    if marker.is_file():
        family = _read_json(marker).get("family")
        if family not in FAMILIES:
            raise BadInput(f"{marker}: unknown family {family!r} (allowed: {_allowed()})")
        return family
    index = folder / "model_index.json"
    if index.is_file():
        cls = _read_json(index).get("_class_name")
        if cls not in PIPELINE_FAMILIES:
            raise BadInput(
                f"{index}: pipeline {cls!r} is not supported (allowed: {', '.join(PIPELINE_FAMILIES)}; families: {_allowed()})"
            )
        return PIPELINE_FAMILIES[cls]
    raise BadInput(
        f"{folder}: no apexctl_model.json or model_index.json, cannot tell the model family (allowed: {_allowed()})"
    )


def load_backbone(
    path_or_spec: str | Path,
    *,
    family: str | None = None,
    dtype: torch.dtype = torch.float32,
    load_text_encoder: bool = True,
    load_codec: bool = True,
) -> Backbone:
    """Load a model folder, hub id (give ``family``) or ``tiny:<preset>[?k=v]`` spec as its family's Backbone.

    Raises ``BadInput`` (one line naming the path and the allowed families) for a missing folder or unknown family.
    """
    spec = str(path_or_spec)
    path = resolve_model_path(spec)
    if family is not None and family not in FAMILIES:
        raise BadInput(f"{spec}: unknown family {family!r} (allowed: {_allowed()})")
    if Path(path).is_dir():
        family = family or detect_family(path)
    elif family is None:
        raise BadInput(f"{spec}: no such model folder (for a hub id, give the family; allowed: {_allowed()})")
    return FAMILIES[family].from_pretrained(
        path, dtype=dtype, load_text_encoder=load_text_encoder, load_codec=load_codec
    )


def load_for_recipe(spec, path: str | Path | None = None, **kwargs) -> Backbone:
    """``load_backbone`` with a recipe's ``model`` section (family, dtype); ``path`` overrides ``spec.path``."""
    family = None if spec.family == "auto" else spec.family
    return load_backbone(
        resolve_model_path(str(path if path is not None else spec.path)),
        family=family,
        dtype=spec.torch_dtype,
        **kwargs,
    )
