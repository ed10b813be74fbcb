"""Where the condition shift acts decides which of (a, b) matter. Measured on each family's tiny build:

- At the ``projection`` site of Qwen-Image, SD3 and FLUX every later read of the text stream goes through a
  LayerNorm, which removes a constant b·1 exactly: b is a no-op (``Backbone.projection_cancels_scalar_bias``).
- At Qwen-Image's ``embeddings`` site the text RMSNorm comes first: RMSNorm(a·h) = sign(a)·RMSNorm(h), so with
  b = 0, a = −0.5 equals a = −1 and a = +0.5 is no shift at all (the paper's Table 7 pattern: a = 0.5, b = 0
  collapses, a = 0.5, b = 10 does not).
"""

from __future__ import annotations

import pytest
import torch

from apexctl.engine.objectives import Net
from apexctl.engine.shift import ConditionShift

FAMILIES = {
    "qwen_image": "tiny:test",
    "sana": "tiny:sana",
    "sd3": "tiny:sd3",
    "flux": "tiny:flux",
    "z_image": "tiny:z_image",
}


@pytest.fixture(autouse=True)
def _home(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("APEXCTL_HOME", str(tmp_path_factory.getbasetemp() / "home"))


def _velocity_fn(spec: str):
    from apexctl.models import load_backbone, resolve_model_path

    bb = load_backbone(resolve_model_path(spec))
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, *bb.latent_shape(32, 32)), generator=g)
    t = torch.full((2,), 0.7)
    cond = bb.encode_prompts(["a red fox in the snow", "two cats"])
    fake = torch.ones(2, dtype=torch.bool)

    @torch.no_grad()
    def f(a: float | None = None, b: float = 0.0, site: str = "projection") -> torch.Tensor:
        if a is None:
            return bb.velocity(x, t, cond)
        return Net(bb, ConditionShift(a=a, b=b, site=site))(x, t, cond, fake=fake)

    return bb, f


def _diff(u: torch.Tensor, v: torch.Tensor) -> float:
    return float((u - v).abs().max())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_projection_site_bias_is_a_no_op_exactly_where_the_adapter_says(family):
    bb, f = _velocity_fn(FAMILIES[family])
    base = f(-1.0, 0.0)
    assert _diff(base, f()) > 1e-2  # the shift itself changes the output
    d = max(_diff(base, f(-1.0, b)) for b in (0.1, 1.0, 10.0))
    if bb.projection_cancels_scalar_bias:
        assert d < 1e-5
    else:
        assert d > 1e-2


def test_qwen_embeddings_site_keeps_only_the_sign_of_a_when_b_is_zero():
    _, f = _velocity_fn("tiny:test")
    neg = f(-1.0, 0.0, "embeddings")
    assert _diff(neg, f()) > 1e-2
    assert _diff(neg, f(-0.5, 0.0, "embeddings")) < 1e-5  # a = −0.5 ≡ a = −1
    assert _diff(f(0.5, 0.0, "embeddings"), f()) < 1e-5  # a = +0.5 ≡ no shift
    assert _diff(neg, f(-1.0, 1.0, "embeddings")) > 1e-2  # b matters here
