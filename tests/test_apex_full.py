"""``apex_full`` and its math (engine/rcgm.py, engine/apex_full.py) against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import LinearDenoiser
from torch import nn

from apexctl.engine.apex_full import apex_full
from apexctl.engine.cond import Cond
from apexctl.engine.config import ApexFullConfig
from apexctl.engine.objectives import Net
from apexctl.engine.rcgm import barron_rows, group_masks, rcgm_target, rollout, time_weight
from apexctl.engine.shift import ConditionShift


def _cond(e: list[float]) -> Cond:
    return Cond(torch.tensor(e).reshape(-1, 1, 1), torch.ones(len(e), 1, dtype=torch.long))


def _col(v) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float32).reshape(-1, 1, 1, 1)


# ---------------------------------------------------------------------------------------------------- the math


def test_rollout_two_euler_steps_by_hand():
    ref = lambda x, t, c: 2.0 * x + t.reshape(-1, 1, 1, 1)  # noqa: E731
    x0, t, tt = _col([1.0]), torch.tensor([1.0]), torch.tensor([0.2])
    # k=0: t_c 1.0 → t_n 0.6, F = 2 + 1 = 3, step 0.4·3 = 1.2, x1 = −0.2
    # k=1: t_c 0.6 → t_n 0.2, F = −0.4 + 0.6 = 0.2, step 0.4·0.2 = 0.08
    d = rollout(ref, x0, t, tt, None, 2)
    assert d.item() == pytest.approx(1.28, abs=1e-6)
    assert rollout(ref, x0, t, tt, None, 1).item() == pytest.approx(0.8 * 3.0, abs=1e-6)


def test_rcgm_target_far_and_near_rows_by_hand():
    k = 0.3
    ref = lambda x, t, c: torch.full_like(x, k)  # noqa: E731
    f, v = _col([0.5, 0.9, 2.0]), _col([0.4, 0.2, 0.1])
    x_t = _col([0.0, 0.0, 0.0])
    t, tt = torch.tensor([0.8, 0.5, 0.5]), torch.tensor([0.2, 0.495, 0.0])
    out = rcgm_target(f, v, x_t, t, tt, _cond([0.0, 0.0, 0.0]), ref, order=2, dt=0.01, clip=1.0)
    # row 0 (far): D = (0.8 − 0.01 − 0.2)·k; r = (0.6·0.5 − 0.01·0.4 − D)/0.01
    r0 = (0.6 * 0.5 - 0.01 * 0.4 - 0.59 * k) / 0.01
    assert out[0].item() == pytest.approx(0.5 - max(-1.0, min(1.0, r0)), abs=1e-5)
    # row 1 (near: t − tt < dt): r = F − v = 0.7
    assert out[1].item() == pytest.approx(0.9 - 0.7, abs=1e-6)
    # row 2 (far, the clamp bites): r = (0.5·2 − 0.001 − 0.49·k)/0.01 ≫ 1 → F* = F − 1
    assert out[2].item() == pytest.approx(1.0, abs=1e-6)


def test_rcgm_target_is_the_model_itself_for_an_exact_flow():
    """For data concentrated at x0 the exact average velocity from any t to any tt is (x_t − x0)/t: the
    residual is zero and the target equals F, whatever the order."""
    x0 = _col([0.7, 0.7])
    exact = lambda x, t, c: (x - x0[: len(x)]) / t.reshape(-1, 1, 1, 1)  # noqa: E731
    z = _col([1.3, -0.4])
    t, tt = torch.tensor([0.9, 1.0]), torch.tensor([0.3, 0.0])
    x_t = t.reshape(-1, 1, 1, 1) * z + (1 - t.reshape(-1, 1, 1, 1)) * x0
    f = exact(x_t, t, None)
    for order in (1, 2, 3):
        out = rcgm_target(f, z - x0, x_t, t, tt, _cond([0.0, 0.0]), exact, order=order)
        torch.testing.assert_close(out, f, atol=1e-5, rtol=0)


def test_barron_rows_values_and_unit_gradient():
    c = 1e-3
    pred = _col([0.0, 0.0]).expand(2, 1, 2, 2).clone().requires_grad_(True)
    target = torch.stack([torch.full((1, 2, 2), 0.002), torch.full((1, 2, 2), 0.5)])
    loss = barron_rows(pred, target, alpha=1.0, c=c)
    m = torch.tensor([0.002**2, 0.25])
    w = (m / c**2 + 1.0) ** -0.5
    torch.testing.assert_close(loss, m * w / c)
    assert loss[1].item() == pytest.approx(0.5, rel=1e-5)  # ≈ the RMSE once m ≫ c²
    loss.sum().backward()
    g = pred.grad.flatten(1).norm(dim=1)
    # the row with an error 250× larger gets about the same gradient norm (1/√numel·2 = 1 for 4 elements)
    assert g[1].item() == pytest.approx(1.0, rel=1e-3)
    assert g[0].item() == pytest.approx(2 * 0.002 / 4 * 2 / c * float(w[0]), rel=1e-4)
    assert barron_rows(pred, target, alpha=2.0, c=c)[1].item() == pytest.approx(0.25 / c, rel=1e-6)


def test_time_weight_by_hand():
    w = time_weight(torch.tensor([1.0, 0.5, -0.3, 0.6]), torch.tensor([0.0, 0.5, -0.3, 0.1]))
    expect = [1.0, math.tan(math.pi / 2.5) + 1, math.tan(math.pi / 2.5) + 1, math.tan(0.5 * math.pi / 2.5) + 1]
    torch.testing.assert_close(w, torch.tensor(expect))


def test_group_masks_split_and_zero_share():
    m = group_masks(10, (1, 1, 1, 1))
    # round(2.5) = 2 for the first three shares; the last group takes the rest
    assert [int(m[g].sum()) for g in ("e2e", "mul", "any", "adv")] == [2, 2, 2, 4]
    assert torch.stack(list(m.values())).sum(0).eq(1).all()  # each row in exactly one group
    m = group_masks(64, (1, 1, 1, 0))
    assert not m["adv"].any() and int(m["any"].sum()) == 22 and int(m["e2e"].sum()) == 21
    with pytest.raises(ValueError):
        group_masks(8, (0, 0, 0, 0))


# ------------------------------------------------------------------------------------------------ the objective


class PointFlow(nn.Module):
    """The exact flow of data concentrated at x0, F(x, t, c) = (x − x0)/t (whatever the condition), plus an
    offset k·h on rows whose condition site output h the shift changed (the fake branch)."""

    def __init__(self, x0: float, k: float = 0.0) -> None:
        super().__init__()
        self.x0, self.k = x0, k
        self.transformer = nn.Module()
        self.transformer.site = nn.Identity()
        self.transformer.scale = nn.Parameter(torch.tensor(1.0))

    def velocity(self, x_t, t, cond: Cond):
        h = self.transformer.site(cond.embeds).mean(1).reshape(-1, 1, 1, 1)  # +1 real, −1 fake (a = −1)
        exact = (x_t - self.x0) / t.abs().reshape(-1, 1, 1, 1)
        return self.transformer.scale * exact + self.k * (1.0 - h) / 2.0

    def condition_site(self):
        return self.transformer.site

    def guidance_combine(self, v_cond, v_uncond, scale: float):
        return v_uncond + scale * (v_cond - v_uncond)


def test_exact_flow_has_zero_loss_in_every_group():
    n, x0 = 16, 0.6
    net = Net(PointFlow(x0), ConditionShift(a=-1.0))
    x = torch.full((n, 1, 2, 2), x0)
    out = apex_full(net, x, _cond([1.0] * n), ApexFullConfig(), generator=torch.Generator().manual_seed(0))
    assert set(out.terms) == {"e2e", "mul", "any", "adv", "rect", "delta_abs"}
    assert out.loss.item() == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("k", [0.2, 3.0])
def test_rectify_term_is_the_clipped_fake_minus_real_gap(k):
    """The fake branch is off by k everywhere: Δ = k, clipped at 1; on the e2e rows ℓ(F, F − clip(Δ)) with
    the Barron row loss of a constant error clip(Δ)."""
    n, x0 = 8, -0.2
    net = Net(PointFlow(x0, k=k), ConditionShift(a=-1.0))
    x = torch.full((n, 1, 2, 2), x0)
    cfg = ApexFullConfig(groups=(1, 1, 0, 0))  # no adv rows: the main loss stays exactly zero
    out = apex_full(net, x, _cond([1.0] * n), cfg, generator=torch.Generator().manual_seed(1))
    d = min(k, 1.0)
    c = cfg.barron_c
    expect = d * d * (d * d / c**2 + 1.0) ** -0.5 / c
    assert out.terms["delta_abs"].item() == pytest.approx(k, rel=1e-5)
    assert out.terms["rect"].item() == pytest.approx(expect, rel=1e-5)
    assert out.loss.item() == pytest.approx(cfg.rectify_weight * expect, rel=1e-4)


def _replay(seed: int, n: int, shape=(1, 1, 1)):
    g = torch.Generator().manual_seed(seed)
    t, u1, u2 = torch.rand(n, generator=g), torch.rand(n, generator=g), torch.rand(n, generator=g)
    z_adv, z = torch.randn((n, *shape), generator=g), torch.randn((n, *shape), generator=g)
    return t, u1, u2, z_adv, z


def test_mul_rows_are_flow_matching_with_the_enhanced_target_by_hand():
    alpha, beta, w, r = 0.5, -0.3, 0.7, 0.8
    net = Net(LinearDenoiser(alpha, beta, w), ConditionShift())
    x = _col([0.8, -0.4, 0.1, 0.3])
    e, e0 = [1.5, -2.0, 0.5, 0.2], [0.1, 0.1, 0.1, 0.1]
    cfg = ApexFullConfig(
        groups=(0, 1, 0, 0), loss="l2", time_weighting=False, enhance_ratio=r, rcgm_clip=100.0, mul_gap=0.005
    )  # a gap under rcgm_dt: every row is "near" (F* = v); wider mul gaps get the rollout target like any rows
    out = apex_full(net, x, _cond(e), cfg, generator=torch.Generator().manual_seed(5), uncond=_cond(e0))
    t, _, _, _, z = _replay(5, 4)
    tb = t.reshape(-1, 1, 1, 1)
    x_t = tb * z + (1 - tb) * x
    f = alpha * x_t + beta * tb + w * _col(e)
    target = (z - x) + r * w * (_col(e) - _col(e0))  # v + r·(F(c) − F(∅)); near rows: F* = v (no clamp)
    assert out.loss.item() == pytest.approx(((f - target) ** 2).mean().item(), rel=1e-5)
    out.loss.backward()
    ga = (2 * (f - target) * x_t).mean()
    assert net.backbone.transformer.alpha.grad.item() == pytest.approx(ga.item(), rel=1e-4)


@pytest.mark.parametrize("fake_time", ["shift", "signed"])
def test_adv_rows_learn_the_one_step_samples_velocity_by_hand(fake_time):
    alpha, beta, w, a = 0.5, -0.3, 0.7, -1.0
    net = Net(LinearDenoiser(alpha, beta, w), ConditionShift(a=a))
    x = _col([0.8, -0.4, 0.1])
    e = [1.5, -2.0, 0.5]
    cfg = ApexFullConfig(groups=(0, 0, 0, 1), loss="l2", fake_time=fake_time)
    out = apex_full(net, x, _cond(e), cfg, generator=torch.Generator().manual_seed(9))
    t, _, _, z_adv, z = _replay(9, 3)
    tb, h = t.reshape(-1, 1, 1, 1), w * _col(e)
    x_fake = z_adv - (alpha * z_adv + beta + h)  # one step, real condition
    x_t = tb * z + (1 - tb) * x_fake
    sign = -1.0 if fake_time == "signed" else 1.0
    f = alpha * x_t + beta * sign * tb + a * h  # the shifted condition on these rows
    assert out.loss.item() == pytest.approx(((f - (z - x_fake)) ** 2).mean().item(), rel=1e-5)
    assert set(out.terms) == {"adv"}


def test_full_batch_gives_every_group_the_whole_batch():
    n, x0 = 6, 0.3
    net = Net(PointFlow(x0, k=0.5), ConditionShift(a=-1.0))
    x = torch.full((n, 1, 2, 2), x0)
    seen = []
    orig = net.backbone.velocity
    net.backbone.velocity = lambda xt, t, c: (seen.append(len(xt)), orig(xt, t, c))[1]
    apex_full(net, x, _cond([1.0] * n), ApexFullConfig(full_batch=True), generator=torch.Generator().manual_seed(2))
    # adv one-step samples (n), the forward with gradient (4n), RCGM rollouts of the far rows (≥ n per sub-step)
    assert seen[0] == n and seen[1] == 4 * n


def test_ema_warmup_ramps_the_decay_and_resumes_it():
    from apexctl.engine.ema import EMA

    p = nn.Parameter(torch.tensor([0.0]))
    ema = EMA([("p", p)], 0.9, warmup=True)
    ds = []
    for step in range(1, 4):
        with torch.no_grad():
            p.fill_(float(step))
        ds.append(ema.current)
        ema.update()
    # d0 = 0 (copy), d1 = 0 + 1·0.9/2 = 0.45, d2 = 0.45 + 0.55·0.45/2
    assert ds == pytest.approx([0.0, 0.45, 0.45 + 0.55 * 0.45 / 2])
    s = 1.0
    s = 0.45 * s + 0.55 * 2.0
    s = ds[2] * s + (1 - ds[2]) * 3.0
    assert ema.shadow[0].item() == pytest.approx(s, rel=1e-6)
    again = EMA([("p", p)], 0.9, warmup=True)
    again.load_state_dict(ema.state_dict())
    assert again.current == ema.current
    plain = EMA([("p", p)], 0.9)
    assert plain.current == 0.9 and plain.state_dict()["current"] == 0.9


# ----------------------------------------------------------------------------------- DMD2's stabilisers in apex

X2 = torch.tensor([0.8, -0.4]).reshape(2, 1, 1, 1)
E2 = [1.5, -2.0]


def _draws(seed: int, *specs):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((2, 1, 1, 1), generator=g) if s == "n" else torch.rand(2, generator=g) for s in specs]


def test_apex_normalized_delta_is_dmd2s_per_sample_gradient_by_hand():
    from apexctl.engine.config import ApexConfig
    from apexctl.engine.objectives import apex

    alpha, beta, w = 0.5, -0.3, 0.7
    bb = LinearDenoiser(alpha, beta, w)
    cfg = ApexConfig(normalize_delta=True, delta_clip=None)
    out = apex(Net(bb, ConditionShift(a=-1.0)), X2, _cond(E2), cfg, generator=torch.Generator().manual_seed(7))
    z, _zfm, _tfm, s, z2 = _draws(7, "n", "n", "u", "u", "n")
    s = s.reshape(-1, 1, 1, 1)
    h = w * _col(E2)
    xhat = z - (alpha * z + beta + h)
    u = s * z2 + (1 - s) * xhat
    f_real = alpha * u + beta * s + h
    delta = -2 * h  # F(u, s, c_fake) − F(u, s, c) with a = −1
    p_gap = (u - s * f_real - xhat).abs()  # |x-prediction of the real score − the generator's sample|
    delta = s * delta / p_gap
    assert out.terms["rect"].item() == pytest.approx((delta**2).mean().item(), rel=1e-5)


def test_apex_critic_phase_trains_the_fake_branch_alone():
    from apexctl.engine.config import ApexConfig
    from apexctl.engine.objectives import apex

    kw = dict(generator=torch.Generator().manual_seed(3))
    both = apex(Net(LinearDenoiser(), ConditionShift(a=-1.0)), X2, _cond(E2), ApexConfig(fake_weight=2.0), **kw)
    kw = dict(generator=torch.Generator().manual_seed(3))
    critic = apex(
        Net(LinearDenoiser(), ConditionShift(a=-1.0)), X2, _cond(E2), ApexConfig(fake_weight=2.0), phase="critic", **kw
    )
    assert critic.loss.item() == pytest.approx(2.0 * both.terms["fake"].item(), rel=1e-6)
    assert both.loss.item() > critic.loss.item()


def test_apex_full_critic_phase_makes_every_row_an_adv_row():
    net = Net(PointFlow(0.4, k=0.0), ConditionShift(a=-1.0))
    x = torch.full((8, 1, 2, 2), 0.4)
    out = apex_full(
        net, x, _cond([1.0] * 8), ApexFullConfig(), generator=torch.Generator().manual_seed(0), phase="critic"
    )
    assert set(out.terms) == {"adv"}
