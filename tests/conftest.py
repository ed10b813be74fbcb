"""Shared test helpers: no hub access, a scalar 'linear' backbone whose losses can be computed by hand."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from apexctl.engine.cond import Cond  # noqa: E402


class LinearDenoiser(nn.Module):
    """The engine's test double: just the Denoiser protocol (engine/denoiser.py), nothing of a model family.

    F(x, t, c) = α·x + β·t + h,  h = w·e  (the condition site is the Linear ``site``; one token, scalars).
    """

    def __init__(self, alpha: float = 0.5, beta: float = -0.3, w: float = 0.7) -> None:
        super().__init__()
        self.transformer = nn.Module()  # the trainable parameters, where a Backbone keeps them
        self.transformer.alpha = nn.Parameter(torch.tensor(alpha))
        self.transformer.beta = nn.Parameter(torch.tensor(beta))
        self.transformer.site = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.transformer.site.weight.fill_(w)

    def velocity(self, x_t, t, cond: Cond):
        tr = self.transformer
        h = tr.site(cond.embeds).mean(1)  # [B, 1]
        return tr.alpha * x_t + tr.beta * t.reshape(-1, 1, 1, 1) + h.reshape(-1, 1, 1, 1)

    def condition_site(self):
        return self.transformer.site

    def guidance_combine(self, v_cond, v_uncond, scale: float):
        return v_uncond + scale * (v_cond - v_uncond)

    def teacher_sigmas(self, num_steps, latent_shape):
        return torch.linspace(1.0, 0.0, num_steps + 1)


@pytest.fixture
def linear_backbone() -> LinearDenoiser:
    return LinearDenoiser()


@pytest.fixture(scope="session")
def split():
    """The default digits split (train / held-out test), shared by the toy-judge tests."""
    from apexctl.data.digits import load_split

    return load_split()


@pytest.fixture(scope="session")
def digits_judge(split):
    from apexctl.eval.toy.digits import DigitsJudge

    return DigitsJudge.fit(split, seed=0)


@pytest.fixture(scope="session")
def scene_judge(split):
    """The scenes judge with a faster, slightly weaker slot classifier (60 iterations): enough for its tests."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    from apexctl.eval.toy.scenes import SceneJudge

    mp = pytest.MonkeyPatch()
    mp.setattr("apexctl.eval.toy.digits.MLP_MAX_ITER", 60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        judge = SceneJudge.fit(split, seed=0)
    mp.undo()
    return judge
