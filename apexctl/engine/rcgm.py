"""The pieces of ``apex_full`` that are plain math (docs/design.md §5.6): the RCGM consistency target, the
Barron-reweighted row loss, the time weighting and the batch's split into groups.

Path and conventions as in :mod:`apexctl.engine.flow`: ``x_t = t·z + (1−t)·x``, ``F ≈ z − x``; a reference
``ref(x, t, c)`` is a velocity field called without gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from apexctl.engine.cond import Cond
from apexctl.engine.flow import _bcast, mse_per_row

VelocityFn = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]
GROUPS = ("e2e", "mul", "any", "adv")


@torch.no_grad()
def rollout(
    ref: VelocityFn, x: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, cond: Cond, n: int, target_time: bool = False
) -> torch.Tensor:
    """The displacement of ``n`` Euler steps of ``ref`` from time ``t`` to ``tt`` (per row) starting at ``x``::

        t_k = t·(1 − k/n) + tt·k/n,   F_k = ref(x_k, t_k, c),   x_{k+1} = x_k − (t_k − t_{k+1})·F_k
        returns Σ_k (t_k − t_{k+1})·F_k          (= x_0 − x_n)

    With ``target_time`` the reference also gets each sub-step's target, ``ref(x_k, t_k, c, tt=t_{k+1})``.
    """
    disp = torch.zeros_like(x)
    for k in range(n):
        t_c = t + (tt - t) * (k / n)
        t_n = t + (tt - t) * ((k + 1) / n)
        f = (ref(x, t_c, cond, tt=t_n) if target_time else ref(x, t_c, cond)).to(x.dtype)
        step = _bcast(t_c - t_n, x) * f
        x = x - step
        disp = disp + step
    return disp


@torch.no_grad()
def rcgm_target(
    f: torch.Tensor,
    target: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    tt: torch.Tensor,
    cond: Cond,
    ref: VelocityFn,
    order: int,
    dt: float = 0.01,
    clip: float = 1.0,
    target_time: bool = False,
) -> torch.Tensor:
    """RCGM's regression target for F = F(x_t, t, c), whose job is the average velocity from t to tt.

    Rows with ``t − tt ≥ dt``: one step of the data pair's own velocity ``v`` (``target``), then the reference's
    ``order``-step rollout to ``tt``::

        D   = rollout(ref, x_t − dt·v, t − dt → tt)
        r   = ((t − tt)·F − dt·v − D) / dt          (how far F's jump over [tt, t] is from v's step + D)
        F*  = sg(F) − clamp(r, −clip, clip)

    Rows with ``t − tt < dt`` (instantaneous velocity): ``r = F − v`` (flow matching, with the residual clamped).
    The whole target is detached.
    """
    far = (t - tt) >= dt
    resid = f.detach() - target
    rows = far.nonzero().flatten()
    if rows.numel():
        tr, ttr, vr = t[rows], tt[rows], target[rows]
        disp = rollout(ref, x_t[rows] - dt * vr, tr - dt, ttr, cond[rows], order, target_time)
        resid[rows] = (_bcast(tr - ttr, vr) * f.detach()[rows] - dt * vr - disp) / dt
    return f.detach() - resid.clamp(-clip, clip)


def barron_rows(pred: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, c: float = 1e-3) -> torch.Tensor:
    """Barron-reweighted squared error per row, ``[B]`` (the released ``barron_reweighting_loss``)::

        m = mean((pred − target)²)  (per row),   w = sg((m / c² / |α − 2| + 1)^((α − 2)/2)),   L = m·w / c

    With α = 1: L ≈ √m (a per-row RMSE) once m ≫ c², so every row's gradient has about the same norm whatever
    its error; α = 2 gives w = 1 (plain MSE, scaled by 1/c)."""
    m = mse_per_row(pred, target)
    if abs(alpha - 2.0) < 1e-5:
        w = torch.ones_like(m)
    else:
        w = (m.detach() / (c * c) / abs(alpha - 2.0) + 1.0).pow((alpha - 2.0) / 2.0)
    return m * w / c


def time_weight(t: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
    """``w = tan((1 − (|t| − |tt|))·π/2.5) + 1``: 1 for a jump over the whole path (t = 1, tt = 0), ≈ 4.08 for an
    instantaneous velocity (tt = t)."""
    return torch.tan((1.0 - (t.abs() - tt.abs())) * math.pi / 2.5) + 1.0


def group_masks(n: int, shares: Sequence[float], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Consecutive row blocks for :data:`GROUPS` in proportion to ``shares`` (rounded; the last group with a
    share takes the rest, so a zero share never gets a row)."""
    total = float(sum(shares))
    if total <= 0:
        raise ValueError("apex_full: every group share is zero")
    lens = [int(round(n * s / total)) for s in shares]
    last = max(i for i, s in enumerate(shares) if s > 0)
    lens[last] = n - sum(k for i, k in enumerate(lens) if i != last)
    masks, start = {}, 0
    for name, k in zip(GROUPS, lens, strict=True):
        m = torch.zeros(n, dtype=torch.bool, device=device)
        m[start : start + max(k, 0)] = True
        masks[name] = m
        start += max(k, 0)
    return masks
