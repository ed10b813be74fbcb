"""Training objectives (docs/design.md §5.2–5.4). Each returns the total loss and every term by name.

Each objective's knobs are a dataclass of :mod:`apexctl.engine.config`, the one source of their defaults (the
recipe's method sections read them).

Notation: F(x_t, t, c) is the network; ``c_fake`` is the shifted condition (engine/shift.py); sg = stop-gradient.
Every squared error is averaged over all dims and the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from apexctl.engine.cond import Cond
from apexctl.engine.config import ApexConfig, ApexPaperConfig, FlowMatchingConfig  # the knobs (re-exported)
from apexctl.engine.denoiser import Denoiser
from apexctl.engine.flow import endpoint, interpolate, loss_weight, mse_per_row, velocity_target
from apexctl.engine.gan import Gan, gan_term
from apexctl.engine.shift import ConditionShift
from apexctl.engine.target_time import TargetTimeEmbedding


@dataclass
class Net:
    """F with an optional condition shift on some rows: ``net(x_t, t, c, fake=mask)``; with a target-time
    embedder (``apex_full``'s ``target_time: embed``), ``net(..., tt=tt)`` adds e(tt) to the time embedding
    (tt = None or 0: the stock module)."""

    backbone: Denoiser
    shift: ConditionShift
    target_time: TargetTimeEmbedding | None = None

    def __call__(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: Cond,
        fake: torch.Tensor | None = None,
        tt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if fake is not None and self.shift.site == "embeddings":
            cond = cond.with_embeds(self.shift.transform(cond.embeds, fake))
        with self.shift.applied(self.backbone.condition_site(), fake), self._target_time(tt):
            return self.backbone.velocity(x_t, t, cond)

    def _target_time(self, tt: torch.Tensor | None):
        if tt is None or self.target_time is None:
            return nullcontext()
        return self.target_time.applied(self.backbone.time_embedding_site(), tt)


#: F_ref(u, s, c): the reference branch of ``apex`` (no grad), provided by the trainer (self | ema | base)
Reference = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]

#: F_φ(u, s, c): a separate critic network (``method.critic: separate``), called with gradient, real condition
Critic = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]


@dataclass
class LossOut:
    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


def _mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return mse_per_row(pred, target).mean()


def _all(n: int, device: torch.device) -> torch.Tensor:
    return torch.ones(n, dtype=torch.bool, device=device)


def guided_reference(
    ref: Reference, net: Net, u: torch.Tensor, s: torch.Tensor, cond: Cond, uncond: Cond | None, scale: float, **kw
) -> torch.Tensor:
    """ref(u, s, c), or with ``scale`` > 1 the family's CFG of ref(u, s, c) and ref(u, s, ∅) (``uncond`` = ∅ rows)
    in one batched call. ``kw`` (e.g. ``apex_full``'s target time) is passed on, duplicated for [c; ∅] when it is a
    per-row tensor."""
    if scale <= 1.0:
        return ref(u, s, cond, **kw)
    if uncond is None:
        raise ValueError("reference_guidance > 1 needs the unconditional rows (uncond)")
    n = u.shape[0]
    both = ref(
        torch.cat([u, u]), torch.cat([s, s]), Cond.cat([cond, uncond]), **{k: torch.cat([v, v]) for k, v in kw.items()}
    )
    return net.backbone.guidance_combine(both[:n], both[n:], scale)


def flow_matching(
    net: Net, x: torch.Tensor, cond: Cond, cfg: FlowMatchingConfig, generator: torch.Generator | None = None
) -> LossOut:
    """L = ‖F(x_t, t, c) − (z − x)‖², t ~ p(t)."""
    z = torch.randn(x.shape, generator=generator).to(x)
    t = cfg.time(x.shape[0], x.device, generator)
    loss = _mse(net(interpolate(x, z, t), t, cond), velocity_target(x, z))
    return LossOut(loss, {"fm": loss.detach()})


def regression(net: Net, x: torch.Tensor, z: torch.Tensor, cond: Cond) -> LossOut:
    """The regression warm start on the teacher's (noise, sample) pairs (DMD2's "regression loss pretraining")::

        L = ‖F(z, 1, c) − (z − x)‖²      x = the teacher's multi-step sample from noise z

    so the one-step map starts as the teacher's ODE map, tied to its noise, before the adversarial terms act."""
    loss = _mse(net(z, torch.ones(z.shape[0], device=z.device, dtype=z.dtype), cond), velocity_target(x, z))
    return LossOut(loss, {"warm": loss.detach()})


def _generator_inputs(
    net: Net, z: torch.Tensor, cond: Cond, steps: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The generator rows' time τ (uniform on the few-step grid 1 − i/N, i = 0 … N−1) and input x_τ.

    τ = 1: x_τ = z. τ < 1: the student's own re-noised one-step sample, as the few-step sampler sees it at
    inference, x_τ = τ·z + (1−τ)·sg(x̂₁) with x̂₁ = z' − F(z', 1, c) from fresh noise z' (one no-grad forward of
    those rows only).
    """
    B = z.shape[0]
    tau = (steps - torch.randint(0, steps, (B,), generator=generator)).to(z.device, z.dtype) / steps
    z1 = torch.randn(z.shape, generator=generator).to(z)
    x_in = z.clone()
    rows = (tau < 1.0).nonzero().flatten()
    if rows.numel():
        with torch.no_grad():
            zr = z1[rows]
            x1_hat = zr - net(zr, torch.ones_like(tau[rows]), cond[rows])
        x_in[rows] = interpolate(x1_hat, z[rows], tau[rows])
    return tau, x_in


def apex(
    net: Net,
    x: torch.Tensor,
    cond: Cond,
    cfg: ApexConfig,
    reference: Reference | None = None,
    generator: torch.Generator | None = None,
    uncond: Cond | None = None,
    critic: Critic | None = None,
    phase: str = "all",
    rectify_scale: float = 1.0,
    gan: Gan | None = None,
) -> LossOut:
    """The shifted branch as the model's own critic::

        x̂      = z − F(z, 1, c)
        u      = s·z2 + (1−s)·sg(x̂),  s ~ p(s)
        L_fake = ‖F(u, s, c_fake) − (z2 − sg(x̂))‖²
        Δ      = sg(clamp(F(u, s, c_fake) − F_ref(u, s, c), −δ, δ))
        L_rect = ‖F(z, 1, c) − sg(F(z, 1, c) − Δ)‖²      (gradient 2Δ/numel on F(z, 1, c): x̂ moves by +Δ)
        L_fm   = ‖F(x_t, t, c) − (z − x)‖²,  t ~ p(t) on [0, fm_t_max]
        L      = w_fm·L_fm + λ_p·L_fake + μ·L_rect

    ``reference`` defaults to the current network without gradient (``self``). With ``reference_guidance`` g > 1
    the real side of Δ is guided, ``F_ref ← combine(F_ref(u, s, c), F_ref(u, s, ∅), g)`` (``uncond`` = ∅ rows), so
    the generator is pulled toward the guided teacher distribution.

    ``critic`` (``method.critic: separate``, the external fake-score network of DMD2 that APEX makes unnecessary):
    a second network F_φ, called with gradient and the REAL condition, replaces F(u, s, c_fake) everywhere::

        L_fake = ‖F_φ(u, s, c) − (z2 − sg(x̂))‖²           (gradient reaches φ only: u and x̂ are detached)
        Δ      = sg(clamp(F_φ(u, s, c) − F_ref(u, s, c), −δ, δ))

    The generator F then gets w_fm·L_fm + μ·L_rect only, and the condition shift is unused.

    ``generator_steps`` N > 1 (the few-step regime; sample with ``few_step`` and N steps): each generator row draws
    τ uniformly from the sampler's grid {1, (N−1)/N, …, 1/N} and starts where the sampler would::

        x_τ    = z                                   (τ = 1)
        x_τ    = τ·z + (1−τ)·sg(x̂₁),  x̂₁ = z' − F(z', 1, c)   (τ < 1; fresh z', no grad)
        x̂      = x_τ − τ·F(x_τ, τ, c)
        L_rect = ‖F(x_τ, τ, c) − sg(F(x_τ, τ, c) − Δ/τ)‖²   (row-wise; dx̂/dF = −τ, so x̂ still moves by +Δ)

    with u, L_fake and Δ built from this x̂ exactly as above. N = 1 is the formula at the top (τ ≡ 1, x_τ = z),
    computed by the same code and drawing the same random numbers as before the option existed.

    ``normalize_delta`` (DMD2's per-sample normalised generator gradient, in x-prediction units)::

        Δ ← s·Δ / mean|u − s·F_ref(u, s, c) − sg(x̂)|       (per row, before the clamp)

    ``phase = "critic"`` (the critic-only steps of ``critic_updates`` > 1): the loss is λ_p·L_fake alone.
    ``rectify_scale`` multiplies μ (the critic warm-up ramp of ``method.rectify_warmup``).

    ``gan`` with ``gan_weight`` w > 0 adds DMD2's GAN term (engine/gan.py) on the critic's features, real rows x
    against the generator's x̂ (with its graph; detached on critic steps), s ~ U(0, 1)::

        L += w·(L_D + L_G)
    """
    B, dev = x.shape[0], x.device
    z = torch.randn(x.shape, generator=generator).to(x)
    z_fm = torch.randn(x.shape, generator=generator).to(x)
    t_fm = cfg.fm_time(B, dev, generator).to(x.dtype)
    x_t = interpolate(x, z_fm, t_fm)
    few = cfg.generator_steps > 1
    if few:
        tau, x_gen = _generator_inputs(net, z, cond, cfg.generator_steps, generator)
    else:
        tau, x_gen = torch.ones_like(t_fm), z

    # generator rows and FM rows share one forward pass
    v = net(torch.cat([x_gen, x_t]), torch.cat([tau, t_fm]), Cond.cat([cond, cond]))
    f_gen, f_fm = v[:B], v[B:]
    loss_fm = _mse(f_fm, velocity_target(x, z_fm))

    x_hat = endpoint(x_gen, tau, f_gen).detach() if few else (z - f_gen).detach()
    s = cfg.critic_time(B, dev, generator).to(x.dtype)
    z2 = torch.randn(x.shape, generator=generator).to(x)
    u = interpolate(x_hat, z2, s)
    f_fake = critic(u, s, cond) if critic is not None else net(u, s, cond, fake=_all(B, dev))
    loss_fake = _mse(f_fake, velocity_target(x_hat, z2))

    with torch.no_grad():
        ref = reference if reference is not None else net
        f_ref = guided_reference(ref, net, u, s, cond, uncond, cfg.reference_guidance)
        delta = f_fake.detach() - f_ref
        if cfg.normalize_delta:
            sb = s.reshape(-1, *([1] * (x.dim() - 1)))
            scale = (u - sb * f_ref - x_hat).abs().flatten(1).mean(1).clamp_min(1e-6)
            delta = sb * delta / scale.reshape(-1, *([1] * (x.dim() - 1)))
        if cfg.delta_clip is not None:
            delta = delta.clamp(-cfg.delta_clip, cfg.delta_clip)
    step = delta / tau.reshape(-1, *([1] * (x.dim() - 1))) if few else delta  # x̂ moves by +Δ: F by −Δ/τ
    loss_rect = _mse(f_gen, (f_gen - step).detach())

    loss = cfg.fm_weight * loss_fm + cfg.fake_weight * loss_fake + rectify_scale * cfg.rectify_weight * loss_rect
    if phase == "critic":
        loss = cfg.fake_weight * loss_fake
    terms = {
        "fm": loss_fm.detach(),
        "fake": loss_fake.detach(),
        "rect": loss_rect.detach(),
        "delta_abs": delta.abs().mean(),
    }
    if gan is not None and cfg.gan_weight > 0:
        x_gen_hat = endpoint(x_gen, tau, f_gen) if few else z - f_gen
        if phase == "critic":
            x_gen_hat = x_gen_hat.detach()
        s_g = torch.rand(B, generator=generator).to(dev, x.dtype)
        z_r = torch.randn(x.shape, generator=generator).to(x)
        z_f = torch.randn(x.shape, generator=generator).to(x)
        term, gan_terms = gan_term(gan.features, gan.head, x, x_gen_hat, cond, s_g, z_r, z_f)
        loss = loss + cfg.gan_weight * term
        terms.update(gan_terms)
    return LossOut(loss, terms)


def apex_paper(
    net: Net, x: torch.Tensor, cond: Cond, cfg: ApexPaperConfig, generator: torch.Generator | None = None
) -> LossOut:
    """The paper's equations as written::

    x_t    = t·z + (1−t)·x;  F_real = F(x_t, t, c)
    x_fake = x_t − t·F_real                       (detached unless fake_grad)
    xf_t   = t'·z' + (1−t')·x_fake                 (t', z' fresh, or t, z when fake_noise = shared)
    L_fake = ‖F(xf_t, t', c_fake) − (z' − x_fake)‖²
    v_fake = sg(F(x_t, t, c_fake))
    L_mix  = w(t)·‖F_real − ((1−λ)(z − x) + λ·v_fake)‖²
    L      = λ_p·L_fake + λ_e·L_mix
    """
    B, dev = x.shape[0], x.device
    fake = _all(B, dev)
    z = torch.randn(x.shape, generator=generator).to(x)
    t = cfg.time(B, dev, generator).to(x.dtype)
    x_t = interpolate(x, z, t)
    f_real = net(x_t, t, cond)
    x_fake = x_t - t.reshape(-1, *([1] * (x.dim() - 1))) * f_real
    if not cfg.fake_grad:
        x_fake = x_fake.detach()
    if cfg.fake_noise == "shared":
        t2, z2 = t, z
    else:
        t2 = cfg.time(B, dev, generator).to(x.dtype)
        z2 = torch.randn(x.shape, generator=generator).to(x)
    f_fake = net(interpolate(x_fake, z2, t2), t2, cond, fake=fake)
    loss_fake = _mse(f_fake, velocity_target(x_fake, z2))
    with torch.no_grad():
        v_fake = net(x_t, t, cond, fake=fake)
    target = (1.0 - cfg.lambda_mix) * velocity_target(x, z) + cfg.lambda_mix * v_fake
    w = loss_weight(t, cfg.weighting, cfg.weight_max)
    loss_mix = (w * mse_per_row(f_real, target)).mean()
    loss = cfg.fake_weight * loss_fake + cfg.mix_weight * loss_mix
    return LossOut(loss, {"fake": loss_fake.detach(), "mix": loss_mix.detach(), "w_mean": w.mean().detach()})
