"""ConditionShift: exactly the masked rows change, at the configured site, and the hook never outlives its call."""

from __future__ import annotations

import pytest
import torch
from conftest import LinearDenoiser
from torch import nn

from apexctl.engine.objectives import Net
from apexctl.engine.shift import ConditionShift
from apexctl.models.base import Cond


def test_hook_shifts_only_masked_rows_and_is_removed():
    torch.manual_seed(0)
    site = nn.Linear(4, 3)
    x = torch.randn(5, 2, 4)
    plain = site(x)
    shift = ConditionShift(a=-0.5, b=1.0)
    fake = torch.tensor([True, False, True, False, False])
    with shift.applied(site, fake):
        out = site(x)
    torch.testing.assert_close(out[~fake], plain[~fake])
    torch.testing.assert_close(out[fake], -0.5 * plain[fake] + 1.0)
    assert len(site._forward_hooks) == 0
    torch.testing.assert_close(site(x), plain)


def test_hook_removed_after_exception():
    site = nn.Linear(2, 2)
    with pytest.raises(RuntimeError):
        with ConditionShift().applied(site, torch.tensor([True])):
            raise RuntimeError("boom")
    assert len(site._forward_hooks) == 0


def test_diag_shift_and_learnable_gradients():
    site = nn.Linear(3, 3)
    shift = ConditionShift(a=-1.0, b=0.0, mode="diag", dim=3, learnable=True)
    with torch.no_grad():
        shift.a.copy_(torch.tensor([1.0, 2.0, 3.0]))
        shift.b.copy_(torch.tensor([0.1, 0.2, 0.3]))
    x = torch.randn(2, 1, 3)
    with shift.applied(site, torch.tensor([False, True])):
        out = site(x)
    ref = site(x).detach()
    torch.testing.assert_close(out[1].detach(), ref[1] * torch.tensor([1.0, 2.0, 3.0]) + torch.tensor([0.1, 0.2, 0.3]))
    out.sum().backward()
    assert shift.a.grad is not None and shift.b.grad is not None
    torch.testing.assert_close(shift.b.grad, torch.ones(3))  # one fake row, one token


def test_mask_size_mismatch_is_an_error():
    site = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="shift mask"):
        with ConditionShift().applied(site, torch.tensor([True, False])):
            site(torch.randn(3, 2))


def test_net_shifts_at_projection_vs_embeddings_site():
    bb = LinearDenoiser(alpha=0.0, beta=0.0, w=2.0)  # F = h = w·e
    cond = Cond(torch.tensor([[[1.0]], [[3.0]]]))
    x, t = torch.zeros(2, 1, 1, 1), torch.ones(2)
    fake = torch.tensor([True, False])
    proj = Net(bb, ConditionShift(a=-1.0, b=0.5, site="projection"))(x, t, cond, fake).flatten()
    emb = Net(bb, ConditionShift(a=-1.0, b=0.5, site="embeddings"))(x, t, cond, fake).flatten()
    torch.testing.assert_close(proj, torch.tensor([-2.0 + 0.5, 6.0]))  # a·(w·e) + b
    torch.testing.assert_close(emb, torch.tensor([2.0 * (-1.0 + 0.5), 6.0]))  # w·(a·e + b)
    assert len(bb.condition_site()._forward_hooks) == 0
