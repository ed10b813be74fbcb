"""Flow-matching path, targets, estimates, time samplers and loss weights (docs/design.md §3, §5).

Path ``x_t = t·z + (1−t)·x`` with ``t = 1`` pure noise; velocity target ``v = z − x``;
endpoint estimate ``x̂ = x_t − t·F``; noise estimate ``ẑ = x_t + (1−t)·F``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from apexctl.engine.config import TimeSampler  # its knobs live in the torch-free config module; re-exported here


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t [B]`` → ``[B, 1, 1, …]`` for broadcasting against ``like``."""
    return t.reshape(t.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)


def interpolate(x: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = t·z + (1−t)·x."""
    tb = _bcast(t, x)
    return tb * z + (1.0 - tb) * x


def velocity_target(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """v = z − x (constant along the straight path)."""
    return z - x


def endpoint(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x̂ = x_t − t·v (the clean-data estimate)."""
    return x_t - _bcast(t, x_t) * v


def noise_estimate(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ẑ = x_t + (1−t)·v (the noise estimate)."""
    return x_t + (1.0 - _bcast(t, x_t)) * v


def sample_times(
    ts: TimeSampler, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
) -> torch.Tensor:
    """``n`` draws of p(t) as ``ts`` describes it (:class:`~apexctl.engine.config.TimeSampler`, whose
    ``__call__`` lands here), on ``generator`` and then moved to ``device``."""
    if ts.kind == "uniform":
        t = torch.rand(n, generator=generator)
    elif ts.kind == "logit_normal":
        t = torch.sigmoid(ts.logit_mean + ts.logit_std * torch.randn(n, generator=generator))
    elif ts.kind == "beta":
        # Beta via two Gammas keeps the draw on our generator (torch.distributions ignores generators).
        ga = torch._standard_gamma(torch.full((n,), float(ts.beta_a)), generator=generator)
        gb = torch._standard_gamma(torch.full((n,), float(ts.beta_b)), generator=generator)
        t = ga / (ga + gb)
    else:  # pragma: no cover - guarded by the recipe schema
        raise ValueError(f"unknown time sampler {ts.kind!r}")
    t = t * ts.t_max
    if ts.one_step_prob > 0:
        t = torch.where(torch.rand(n, generator=generator) < ts.one_step_prob, torch.ones_like(t), t)
    return t.to(device)


def loss_weight(t: torch.Tensor, kind: Literal["paper", "uniform"] = "paper", weight_max: float = 10.0) -> torch.Tensor:
    """Per-row weight of L_mix. ``paper``: w(t) = min(t³/(1−t), weight_max) (= t²/ω(t) with ω = (1−t)/t);
    ``uniform``: 1. At t = 1 the paper weight is its cap."""
    if kind == "uniform":
        return torch.ones_like(t)
    w = t.pow(3) / (1.0 - t).clamp_min(1e-6)
    return w.clamp(max=weight_max)


def mse_per_row(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every dim but the batch: ``[B]``."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def logit_normal_pdf(t: float, mean: float = 0.0, std: float = 1.0) -> float:
    """Density of the logit-normal time distribution (for plots and tests)."""
    if not 0.0 < t < 1.0:
        return 0.0
    y = math.log(t / (1 - t))
    return math.exp(-((y - mean) ** 2) / (2 * std * std)) / (std * math.sqrt(2 * math.pi) * t * (1 - t))
