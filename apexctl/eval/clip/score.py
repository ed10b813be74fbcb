"""CLIP score of images against their prompts through torchmetrics' ``CLIPScore``, with a local CLIP (eval/clip.py).

torchmetrics' definition: ``CLIPScore = max(100 · mean_i cos(E_I_i, E_C_i), 0)``, the mean over image/caption pairs
of the cosine between CLIP's projected image and text embeddings, scaled by 100 and floored at 0 after averaging
(Hessel et al. floor each pair and use w = 2.5; numbers from the two definitions differ). Images go through the
CLIP processor (resize, centre crop, normalise); captions longer than the text model's positions are truncated.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from apexctl.eval.clip.model import Clip, _features
from apexctl.eval.imagesets import load_rgb, to_uint8_chw


class _TensorFeatures(nn.Module):
    """The CLIPModel with ``get_*_features`` returning the projected tensor.

    torchmetrics 1.9 divides their output by its norm; transformers 5 returns a ModelOutput there (the projected
    embedding is its ``pooler_output``), which torchmetrics cannot use as is.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.clip = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _features(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _features(self.clip.get_text_features(*args, **kwargs))


@torch.no_grad()
def clip_score(clip: Clip, images: Sequence[Path], prompts: Sequence[str], batch: int = 32) -> float:
    """torchmetrics' CLIP score (see the module docstring) of ``images[i]`` against ``prompts[i]``."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    assert len(images) == len(prompts)
    # sync_on_compute off: one process holds every image (rank 0 of a launched job scores alone)
    features = lambda: (_TensorFeatures(clip.model), clip.processor)  # noqa: E731
    metric = CLIPScore(model_name_or_path=features, sync_on_compute=False).to(clip.device)
    for i in range(0, len(images), batch):
        # uint8 [3, H, W] on the model's device: torchmetrics moves the model to the images' device
        pix = [to_uint8_chw(load_rgb(p)).to(clip.device) for p in images[i : i + batch]]
        metric.update(pix, list(prompts[i : i + batch]))
    return float(metric.compute())
