"""Shared test helpers: no hub access, a scalar 'linear' backbone whose losses can be computed by hand."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from apexctl.models.base import Backbone, Cond  # noqa: E402


class LinearBackbone(Backbone):
    """F(x, t, c) = α·x + β·t + h,  h = w·e  (the condition site is the Linear ``site``; one token, scalars)."""

    family = "linear"

    def __init__(self, alpha: float = 0.5, beta: float = -0.3, w: float = 0.7) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.alpha = nn.Parameter(torch.tensor(alpha))
        self.transformer.beta = nn.Parameter(torch.tensor(beta))
        self.transformer.site = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.transformer.site.weight.fill_(w)

    @classmethod
    def from_pretrained(cls, path, **kw):  # pragma: no cover - not used
        raise NotImplementedError

    def _write_components(self, out, src, dest):  # pragma: no cover - not used
        raise NotImplementedError

    def encode_prompts(self, prompts):  # pragma: no cover - not used
        raise NotImplementedError

    def condition_site(self):
        return self.transformer.site

    def encode_images(self, images):  # pragma: no cover
        return images

    def decode_latents(self, latents):  # pragma: no cover
        return latents

    def latent_shape(self, height, width):
        return (1, 1, 1)

    def velocity(self, x_t, t, cond: Cond):
        tr = self.transformer
        h = tr.site(cond.embeds).mean(1)  # [B, 1]
        return tr.alpha * x_t + tr.beta * t.reshape(-1, 1, 1, 1) + h.reshape(-1, 1, 1, 1)

    def teacher_sigmas(self, num_steps, latent_shape):
        return torch.linspace(1.0, 0.0, num_steps + 1)


@pytest.fixture
def linear_backbone() -> LinearBackbone:
    return LinearBackbone()
