"""EMA arithmetic and its no-copy forward; flow-path identities and time samplers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from apexctl.engine.ema import EMA
from apexctl.engine.flow import TimeSampler, endpoint, interpolate, loss_weight, noise_estimate, velocity_target
from apexctl.training.closures import ShadowForward
from apexctl.training.optim import lr_lambda


def test_ema_update_and_shadow_forward_leave_live_graph_intact():
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0]]))
    ema = EMA(list(lin.named_parameters()), decay=0.9)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 4.0]]))
    ema.update()
    torch.testing.assert_close(ema.shadow[0], torch.tensor([[1.2, 2.2]]))  # 0.9·old + 0.1·new
    x = torch.tensor([[1.0, 1.0]])
    y = lin(x)  # graph holds the live weight
    with torch.no_grad():
        y_ema = ShadowForward(lin, ema.shadow_dict())(x)
    assert y_ema.item() == pytest.approx(3.4)
    y.sum().backward()  # would raise if the shadow forward had modified the weight in place
    torch.testing.assert_close(lin.weight.grad, torch.tensor([[1.0, 1.0]]))
    with ema.swapped():
        torch.testing.assert_close(lin.weight.detach(), torch.tensor([[1.2, 2.2]]))
    torch.testing.assert_close(lin.weight.detach(), torch.tensor([[3.0, 4.0]]))


def test_path_identities():
    x, z, t = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3), torch.rand(4)
    xt, v = interpolate(x, z, t), velocity_target(x, z)
    torch.testing.assert_close(endpoint(xt, t, v), x)
    torch.testing.assert_close(noise_estimate(xt, t, v), z)
    torch.testing.assert_close(interpolate(x, z, torch.ones(4)), z)


def test_time_samplers_and_weights():
    g = torch.Generator().manual_seed(0)
    t = TimeSampler(t_max=0.9)(10000, generator=g)
    assert 0 <= t.min() and t.max() <= 0.9 and abs(t.mean().item() - 0.45) < 0.01
    t = TimeSampler(one_step_prob=0.25)(10000, generator=g)
    assert abs((t == 1).float().mean().item() - 0.25) < 0.02
    t = TimeSampler(kind="beta", beta_a=2.0, beta_b=6.0)(20000, generator=g)
    assert abs(t.mean().item() - 0.25) < 0.01  # a / (a + b)
    t = TimeSampler(kind="logit_normal", logit_mean=1.0)(20000, generator=g)
    assert abs(torch.logit(t).mean().item() - 1.0) < 0.03
    w = loss_weight(torch.tensor([0.5, 0.9, 1.0]), "paper", 10.0)
    torch.testing.assert_close(w, torch.tensor([0.125 / 0.5, min(0.729 / 0.1, 10.0), 10.0]))
    assert loss_weight(torch.tensor([0.3]), "uniform").item() == 1.0


def test_lr_schedule():
    f = dict(warmup=10, total=110, schedule="cosine", min_ratio=0.1)
    assert lr_lambda(0, **f) == pytest.approx(0.1) and lr_lambda(9, **f) == pytest.approx(1.0)
    assert lr_lambda(60, **f) == pytest.approx(0.1 + 0.9 * 0.5) and lr_lambda(110, **f) == pytest.approx(0.1)
    assert lr_lambda(50, warmup=0, total=100, schedule="constant", min_ratio=0.0) == 1.0
