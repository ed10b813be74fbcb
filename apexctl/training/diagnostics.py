"""Training diagnostics that are not losses: the critic lag (docs/design.md §6).

``critic_lag``: how far the critic's own distribution is from the generator's. The critic (the shifted branch
F(·, t, c_fake), or the separate critic F_φ) is trained to be the velocity of the generator's outputs, so its own
ODE samples should look like them; a critic that lags (DMD2's reason for updating it 5× per generator step) draws
something else. On ``n`` fixed cache rows and fixed noise z (a private generator: training's random stream is
untouched)::

    x̂ = z − F(z, 1, c)                               the generator's samples
    x_c = Euler(F_critic, z, K uniform steps 1 → 0)   the critic's samples from the same noise
    lag = √( mean_pixels (μ_c − μ_g)² + (σ_c − σ_g)² ) (per-pixel batch mean and std)

0 when the two sample sets share per-pixel means and spreads; in the latents' units.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from apexctl.training.state import Session

LAG_ROWS = 64  # cache rows the lag is measured on (the first ones, the same at every measurement)
LAG_STEPS = 8  # Euler steps of the critic's sampler


def moment_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """√(mean over pixels of (μ_a − μ_b)² + (σ_a − σ_b)²), moments over the batch (dim 0)."""
    a, b = a.float().flatten(1), b.float().flatten(1)
    d = (a.mean(0) - b.mean(0)).pow(2) + (a.std(0, unbiased=False) - b.std(0, unbiased=False)).pow(2)
    return float(d.mean().sqrt())


@torch.no_grad()
def critic_lag(sess: Session, rows: int = LAG_ROWS, steps: int = LAG_STEPS) -> float:
    """The critic lag of the module docstring for this session's model (every rank computes it: the forward goes
    through the DDP module)."""
    n = min(rows, len(sess.cache))
    x, cond = sess.cache.batch(torch.arange(n), torch.zeros(n, dtype=torch.bool), sess.empty)
    cond = cond.to(sess.acc.device)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(x.shape, generator=g).to(sess.acc.device)
    net = sess.net
    ones = torch.ones(n, device=z.device)
    x_gen = z - net(z, ones, cond)
    fake = torch.ones(n, dtype=torch.bool, device=z.device)
    critic = sess.critic_forward

    def f_critic(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return critic(u, t, cond) if critic is not None else net(u, t, cond, fake=fake)

    u = z
    for k in range(steps):
        t0, t1 = 1.0 - k / steps, 1.0 - (k + 1) / steps
        u = u - (t0 - t1) * f_critic(u, ones * t0)
    return moment_gap(u, x_gen)
