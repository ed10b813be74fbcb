"""Each objective's loss and gradients on a scalar linear model, against values computed by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import LinearDenoiser

from apexctl.engine.flow import TimeSampler
from apexctl.engine.objectives import (
    ApexConfig,
    ApexPaperConfig,
    FlowMatchingConfig,
    Net,
    apex,
    apex_paper,
    flow_matching,
)
from apexctl.engine.shift import ConditionShift
from apexctl.models.base import Cond

X = torch.tensor([0.8, -0.4]).reshape(2, 1, 1, 1)
E = torch.tensor([1.5, -2.0]).reshape(2, 1, 1)
COND = Cond(E, torch.ones(2, 1, dtype=torch.long))


def _draws(seed: int, *specs):
    """Replay the objective's random draws in order: 'n' = randn(2,1,1,1), 'u' = rand(2)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((2, 1, 1, 1), generator=g) if s == "n" else torch.rand(2, generator=g) for s in specs]


def _grads(bb, *extra):
    return [p.grad.clone() for p in (bb.transformer.alpha, bb.transformer.beta, bb.transformer.site.weight, *extra)]


def test_flow_matching_by_hand():
    bb = LinearDenoiser()
    out = flow_matching(Net(bb, ConditionShift()), X, COND, FlowMatchingConfig(), torch.Generator().manual_seed(3))
    z, t = _draws(3, "n", "u")
    tb = t.reshape(-1, 1, 1, 1)
    xt = tb * z + (1 - tb) * X
    f = 0.5 * xt - 0.3 * tb + 0.7 * E.reshape(-1, 1, 1, 1)
    assert out.loss.item() == pytest.approx(((f - (z - X)) ** 2).mean().item(), rel=1e-6)


@pytest.mark.parametrize("clip", [None, 0.3])
def test_apex_loss_and_gradients_by_hand(clip):
    a, b, alpha, beta, w, mu, lp = -1.0, 0.25, 0.5, -0.3, 0.7, 0.5, 1.0
    bb = LinearDenoiser(alpha, beta, w)
    shift = ConditionShift(a=a, b=b, learnable=True)
    cfg = ApexConfig(
        fm_time=TimeSampler(t_max=0.9), critic_time=TimeSampler(), rectify_weight=mu, fake_weight=lp, delta_clip=clip
    )
    out = apex(Net(bb, shift), X, COND, cfg, generator=torch.Generator().manual_seed(7))
    out.loss.backward()

    z, zfm, tfm, s, z2 = _draws(7, "n", "n", "u", "u", "n")
    tfm, s = (tfm * 0.9).reshape(-1, 1, 1, 1), s.reshape(-1, 1, 1, 1)
    h = w * E.reshape(-1, 1, 1, 1)
    xt = tfm * zfm + (1 - tfm) * X
    r_fm = alpha * xt + beta * tfm + h - (zfm - X)
    f_gen = alpha * z + beta + h
    xhat = z - f_gen
    u = s * z2 + (1 - s) * xhat
    f_fake = alpha * u + beta * s + (a * h + b)
    r_fake = f_fake - (z2 - xhat)
    delta = (a * h + b) - h  # F(u,s,c_fake) − F(u,s,c): the u and s parts cancel
    if clip is not None:
        delta = delta.clamp(-clip, clip)
    L_fm, L_fake, L_rect = (r_fm**2).mean(), (r_fake**2).mean(), (delta**2).mean()
    assert out.terms["fm"].item() == pytest.approx(L_fm.item(), rel=1e-5)
    assert out.terms["fake"].item() == pytest.approx(L_fake.item(), rel=1e-5)
    assert out.terms["rect"].item() == pytest.approx(L_rect.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx((L_fm + lp * L_fake + mu * L_rect).item(), rel=1e-5)

    # gradients: x̂ is detached inside L_fake, Δ carries none; L_rect pushes F(z,1,c) by 2Δ/numel
    e = E.reshape(-1, 1, 1, 1)
    d_beta = (2 * r_fm * tfm).mean() + lp * (2 * r_fake * s).mean() + mu * (2 * delta).mean()
    d_alpha = (2 * r_fm * xt).mean() + lp * (2 * r_fake * u).mean() + mu * (2 * delta * z).mean()
    d_w = (2 * r_fm * e).mean() + lp * (2 * r_fake * a * e).mean() + mu * (2 * delta * e).mean()
    d_a = lp * (2 * r_fake * h).mean()  # only through L_fake: Δ is stop-gradient
    d_b = lp * (2 * r_fake).mean()
    g_alpha, g_beta, g_w, g_a, g_b = _grads(bb, shift.a, shift.b)
    assert g_beta.item() == pytest.approx(d_beta.item(), rel=1e-5)
    assert g_alpha.item() == pytest.approx(d_alpha.item(), rel=1e-5)
    assert g_w.item() == pytest.approx(d_w.item(), rel=1e-5)
    assert g_a.item() == pytest.approx(d_a.item(), rel=1e-5)
    assert g_b.item() == pytest.approx(d_b.item(), rel=1e-5)


def test_apex_reference_is_used_without_gradient():
    bb = LinearDenoiser()
    calls = []

    def ref(u, s, c):
        calls.append(torch.is_grad_enabled())
        return torch.zeros_like(u)

    cfg = ApexConfig(delta_clip=None)
    out = apex(Net(bb, ConditionShift()), X, COND, cfg, reference=ref, generator=torch.Generator().manual_seed(1))
    assert calls == [False]
    z, zfm, tfm, s, z2 = _draws(1, "n", "n", "u", "u", "n")
    s = s.reshape(-1, 1, 1, 1)
    h = 0.7 * E.reshape(-1, 1, 1, 1)
    xhat = z - (0.5 * z - 0.3 + h)
    u = s * z2 + (1 - s) * xhat
    delta = 0.5 * u - 0.3 * s - h  # F(u, s, c_fake) − 0 with a = −1
    assert out.terms["rect"].item() == pytest.approx((delta**2).mean().item(), rel=1e-5)


@pytest.mark.parametrize("fake_grad", [True, False])
def test_apex_paper_by_hand(fake_grad):
    # λ ≠ ½, so a swap of λ and 1 − λ in L_mix's target changes the loss (bench/mutation_check.py: paper-mix-swapped)
    a, b, alpha, beta, w, lam, wmax = -1.0, 0.0, 0.5, -0.3, 0.7, 0.3, 10.0
    bb = LinearDenoiser(alpha, beta, w)
    shift = ConditionShift(a=a, b=b, learnable=True)
    cfg = ApexPaperConfig(time=TimeSampler(), lambda_mix=lam, fake_grad=fake_grad, weight_max=wmax)
    out = apex_paper(Net(bb, shift), X, COND, cfg, generator=torch.Generator().manual_seed(11))
    out.loss.backward()

    z, t, t2, z2 = _draws(11, "n", "u", "u", "n")
    t, t2 = t.reshape(-1, 1, 1, 1), t2.reshape(-1, 1, 1, 1)
    h = w * E.reshape(-1, 1, 1, 1)
    xt = t * z + (1 - t) * X
    f_real = alpha * xt + beta * t + h
    x_fake = xt - t * f_real
    xf = t2 * z2 + (1 - t2) * x_fake
    r_fake = alpha * xf + beta * t2 + (a * h + b) - (z2 - x_fake)
    v_fake = alpha * xt + beta * t + (a * h + b)
    r_mix = f_real - ((1 - lam) * (z - X) + lam * v_fake)
    wt = (t**3 / (1 - t)).clamp(max=wmax)
    L_fake, L_mix = (r_fake**2).mean(), (wt * r_mix**2).mean()
    assert out.terms["fake"].item() == pytest.approx(L_fake.item(), rel=1e-5)
    assert out.terms["mix"].item() == pytest.approx(L_mix.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx((L_fake + L_mix).item(), rel=1e-5)

    # d/dβ: x_fake = x_t − t·F_real depends on β (−t·t) only when fake_grad; v_fake is always stop-gradient
    dxf = -t * t if fake_grad else torch.zeros_like(t)
    dr_fake = alpha * (1 - t2) * dxf + t2 + dxf
    d_beta = (2 * r_fake * dr_fake).mean() + (wt * 2 * r_mix * t).mean()
    g_beta = bb.transformer.beta.grad.item()
    assert g_beta == pytest.approx(d_beta.item(), rel=1e-5)
    # the learnable shift gets gradient only through L_fake (v_fake is detached)
    assert shift.b.grad.item() == pytest.approx((2 * r_fake).mean().item(), rel=1e-5)


def test_loss_terms_are_named():
    bb = LinearDenoiser()
    out = apex(Net(bb, ConditionShift()), X, COND, ApexConfig(), generator=torch.Generator().manual_seed(0))
    assert set(out.terms) == {"fm", "fake", "rect", "delta_abs"}
    out = apex_paper(Net(bb, ConditionShift()), X, COND, ApexPaperConfig(), generator=torch.Generator().manual_seed(0))
    assert {"fake", "mix"} <= set(out.terms)


def test_apex_guided_reference_by_hand():
    a, b, w, g = -1.0, 0.0, 0.7, 3.0
    bb = LinearDenoiser(0.5, -0.3, w)
    e0 = torch.tensor([0.2, 0.2]).reshape(2, 1, 1)
    uncond = Cond(e0, torch.ones(2, 1, dtype=torch.long))
    cfg = ApexConfig(delta_clip=None, reference_guidance=g)
    out = apex(
        Net(bb, ConditionShift(a=a, b=b)), X, COND, cfg, generator=torch.Generator().manual_seed(5), uncond=uncond
    )
    e, e0 = E.reshape(-1, 1, 1, 1), e0.reshape(-1, 1, 1, 1)
    delta = (a * w * e + b) - w * (e0 + g * (e - e0))  # the αu + βs parts cancel
    assert out.terms["rect"].item() == pytest.approx((delta**2).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="uncond"):
        apex(Net(bb, ConditionShift()), X, COND, cfg)
