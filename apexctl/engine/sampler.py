"""Samplers in our convention (docs/design.md §3, §5.5): t = 1 is noise, ``x̂ = x_t − t·F``, ``ẑ = x_t + (1−t)·F``.

- ``one_step``:  x = z − F(z, 1, c)
- ``few_step``:  times t_i = (1 − i/N)^p (p = ``grid_power``; 1: uniform), 1 = t_0 > … > t_N = 0;
  x̂ = x_t − t·F, then re-noise to the next time with fresh noise (``stochastic``, drawn by ``randn_tensor``: row i
  from generator i) or the model's own ẑ (``deterministic``).
- ``euler``:     the teacher: x ← x + (σ_{i+1} − σ_i)·v on the family's native σ schedule, with classifier-free
  guidance combined the way the family's stock pipeline does it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from apexctl.engine.cond import Cond
from apexctl.engine.denoiser import Denoiser

Renoise = Literal["stochastic", "deterministic"]
Method = Literal["one", "few", "euler"]
#: one generator for the whole batch, or one per row (image i's noise then depends only on generator i)
Generators = torch.Generator | Sequence[torch.Generator] | None


def randn_tensor(
    shape: tuple[int, ...], generator: Generators, device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """N(0, I) of ``shape`` on ``device``, drawn on each generator's own device and then moved (as diffusers'
    ``randn_tensor``): torch refuses a CPU generator for a CUDA draw, and drawing where the generator lives gives
    the same numbers whatever the target device. A sequence of generators draws row i from generator i, so a row
    does not depend on the batch it is in. Drawn in float32, then cast (the same numbers for every dtype)."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=torch.float32).to(dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device).to(device, dtype)
    gens = list(generator)
    if len(gens) != shape[0]:
        raise ValueError(f"{len(gens)} generators for a batch of {shape[0]} rows: give one per row")
    rows = [torch.randn((1, *shape[1:]), generator=g, device=g.device) for g in gens]
    if all(g.device == gens[0].device for g in gens):  # the usual case: one copy to the target device, not B
        return torch.cat(rows).to(device, dtype)
    return torch.cat([r.to(device) for r in rows]).to(dtype)


def _t(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((like.shape[0],), float(value), device=like.device, dtype=like.dtype)


@torch.no_grad()
def one_step(backbone: Denoiser, z: torch.Tensor, cond: Cond) -> torch.Tensor:
    """x = z − F(z, 1, c)."""
    return z - backbone.velocity(z, _t(1.0, z), cond)


@torch.no_grad()
def few_step(
    backbone: Denoiser,
    z: torch.Tensor,
    cond: Cond,
    steps: int,
    renoise: Renoise = "stochastic",
    generator: Generators = None,
    grid_power: float = 1.0,
) -> torch.Tensor:
    """N endpoint predictions on the grid t_i = (1 − i/N)^p, re-noised between them (``stochastic``: fresh
    noise from ``generator``, one per row for batch-independent images; see ``randn_tensor``). p > 1 spends the
    later steps at low noise, where they refine the one-step sample instead of redrawing it (p = 2, N = 2:
    t = 1, 0.25, 0)."""
    times = [u**grid_power for u in torch.linspace(1.0, 0.0, steps + 1).tolist()]
    x = z
    x_hat = z
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        v = backbone.velocity(x, _t(t, x), cond)
        x_hat = x - t * v
        if t_next <= 0.0:
            break
        if renoise == "deterministic":
            eps = x + (1.0 - t) * v
        else:
            eps = randn_tensor(tuple(x.shape), generator, x.device, x.dtype)
        x = t_next * eps + (1.0 - t_next) * x_hat
    return x_hat


@torch.no_grad()
def euler(
    backbone: Denoiser,
    z: torch.Tensor,
    cond: Cond,
    steps: int,
    uncond: Cond | None = None,
    guidance_scale: float = 1.0,
    sigmas: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-step Euler on ``backbone.teacher_sigmas`` (or the given ``sigmas``, length steps + 1, ending at 0)."""
    if sigmas is None:
        sigmas = backbone.teacher_sigmas(steps, tuple(z.shape[1:]))
    guided = uncond is not None and guidance_scale > 1.0
    both = Cond.cat([cond, uncond]) if guided else cond
    x = z
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        if guided:
            v_both = backbone.velocity(torch.cat([x, x]), _t(s, torch.cat([x, x])), both)
            v_c, v_u = v_both.chunk(2)
            v = backbone.guidance_combine(v_c, v_u, guidance_scale)
        else:
            v = backbone.velocity(x, _t(s, x), cond)
        # keep the arithmetic in fp32 like diffusers' FlowMatchEulerDiscreteScheduler.step
        x = (x.float() + (s_next - s) * v.float()).to(z.dtype)
    return x


def generate(
    backbone: Denoiser,
    z: torch.Tensor,
    cond: Cond,
    steps: int,
    method: Method,
    uncond: Cond | None = None,
    guidance_scale: float = 1.0,
    renoise: Renoise = "stochastic",
    generator: Generators = None,
    grid_power: float = 1.0,
) -> torch.Tensor:
    """One entry point for an explicit ``method`` (what ``auto`` means is decided once, in ``apexctl.inference``,
    which knows whether the model is a distilled student). ``uncond`` must have as many rows as ``cond``."""
    if method == "one":
        return one_step(backbone, z, cond)
    if method == "few":
        return few_step(backbone, z, cond, steps, renoise, generator, grid_power)
    if method == "euler":
        return euler(backbone, z, cond, steps, uncond=uncond, guidance_scale=guidance_scale)
    raise ValueError(f"sampler method {method!r}: expected one of one, few, euler")
