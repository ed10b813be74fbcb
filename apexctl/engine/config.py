"""The objectives' knobs and their defaults: the one source of defaults (docs/design.md §5).

The recipe's ``method`` sections (``apexctl/recipe.py``) take their defaults from these dataclasses, so the Python
API (``apex(net, x, cond, ApexConfig())``) and a recipe that leaves a knob out train the same objective. This
module imports only the standard library: reading a recipe needs no torch. Drawing times is
:func:`apexctl.engine.flow.sample_times` (torch), reached through :meth:`TimeSampler.__call__`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TimeSampler:
    """p(t) on [0, t_max]. ``kind``:

    - ``uniform``: t ~ U(0, 1)
    - ``logit_normal``: t = sigmoid(m + s·n), n ~ N(0, 1)
    - ``beta``: t ~ Beta(α, β)

    then ``t ← t_max·t``, and each row independently is set to exactly 1 with probability ``one_step_prob``
    (the one-step regime the student is used in).
    """

    kind: Literal["uniform", "logit_normal", "beta"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    beta_a: float = 1.0
    beta_b: float = 1.0
    t_max: float = 1.0
    one_step_prob: float = 0.0

    def __call__(
        self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``n`` times ``[n]`` on ``device``, drawn on ``generator`` (CPU)."""
        from apexctl.engine.flow import sample_times  # torch: imported when times are drawn, not when configured

        return sample_times(self, n, device, generator)


@dataclass(frozen=True)
class FlowMatchingConfig:
    """Knobs of ``flow_matching`` (docs/design.md §5.4)."""

    time: TimeSampler = TimeSampler()


@dataclass(frozen=True)
class ApexConfig:
    """Knobs of ``apex`` (docs/design.md §5.2). ``fm_time`` is p(t) of L_fm (its t_max is fm_t_max);
    ``critic_time`` is p(s)."""

    fm_time: TimeSampler = TimeSampler(t_max=0.9)
    critic_time: TimeSampler = TimeSampler()
    fm_weight: float = 1.0
    fake_weight: float = 1.0  # λ_p
    rectify_weight: float = 0.5  # μ
    delta_clip: float | None = 1.0  # δ; None = no clamp
    reference_guidance: float = 1.0  # > 1: F_ref is the family's CFG of F_ref(c) and F_ref(∅) (needs ``uncond``)
    generator_steps: int = 1  # N: generator rows at τ on the few-step grid {1, (N−1)/N, …, 1/N}
    normalize_delta: bool = False  # DMD2: Δ ← s·Δ / mean|u − s·F_ref − x̂| per row (x-prediction units, unit scale)
    gan_weight: float = 0.0  # DMD2's GAN term on the critic's features (engine/gan.py); 0 = off


@dataclass(frozen=True)
class ApexPaperConfig:
    """Knobs of ``apex_paper`` (docs/design.md §5.3)."""

    time: TimeSampler = TimeSampler()
    fake_weight: float = 1.0  # λ_p
    mix_weight: float = 1.0  # λ_e
    lambda_mix: float = 0.5  # inner λ
    fake_grad: bool = True
    fake_noise: Literal["fresh", "shared"] = "fresh"
    weighting: Literal["paper", "uniform"] = "paper"
    weight_max: float = 10.0


@dataclass(frozen=True)
class ApexFullConfig:
    """Knobs of ``apex_full`` (docs/design.md §5.6): the objective the authors' code trains (TwinFlow's groups,
    RCGM consistency targets, Barron-normalised rows, tan time weighting) with APEX's condition shift.

    ``time`` is p(t) of the mul / any / adv rows (its ``t_max`` caps them); ``groups`` are the shares of the
    batch taken by the e2e, mul, any and adv rows (a zero share drops that group)."""

    time: TimeSampler = TimeSampler()
    groups: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)  # e2e, mul, any, adv
    full_batch: bool = False  # every group on every row (TwinFlow's MNIST tutorial): 4× the rows per step
    consistency_ratio: float = 1.0  # any rows: tt = t − u·ratio·t, u ~ U(0, 1)
    mul_gap: float = 0.05  # mul rows: tt = t − u·gap·t (instantaneous velocity, up to 5 %)
    estimate_order: int = 2  # N Euler sub-steps of the reference rollout in the RCGM target; 0 = no RCGM
    rcgm_dt: float = 0.01  # the small first step of the RCGM target along the data pair's own velocity
    rcgm_clip: float = 1.0  # clamp of the RCGM residual
    enhance_ratio: float = 0.0  # r: target += r·(F_ref(c) − F_ref(∅)) on non-adv rows with t in enhance_range
    enhance_range: tuple[float, float] = (0.0, 1.0)  # open interval of t
    loss: Literal["barron", "l2"] = "barron"
    barron_alpha: float = 1.0
    barron_c: float = 1e-3
    time_weighting: bool = True  # w = tan((1 − (|t| − |tt|))·π/2.5) + 1 on non-adv rows
    rectify_weight: float = 0.25  # dmc (released: 0.5; 0.25 measured better on the digits, docs/evidence.md §6)
    rectify_clip: float = 1.0  # clamp of F(u, s, c_fake) − F_real(u, s, c)
    reference_guidance: float = 1.0  # CFG scale of the real side of the rectify term (needs ``uncond``)
    fake_time: Literal["shift", "signed"] = "shift"  # signed: the fake rows also see −t (the released double marker)
    gan_weight: float = 0.0  # DMD2's GAN term on the critic's features, on the e2e rows (engine/gan.py); 0 = off
