"""``apex_full``: the objective the authors' released code trains (docs/design.md §5.6), in our notation.

TwinFlow's four row groups with APEX's condition shift marking the fake branch; RCGM consistency targets; every
row's loss Barron-normalised and time-weighted. F(x, t, c) is the stock denoiser: it has no target-time input, so
a row's target time ``tt`` shapes its target only (the released LoRA configs' ``aux_time_embed: false`` form).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from apexctl.engine.cond import Cond
from apexctl.engine.config import ApexFullConfig
from apexctl.engine.flow import endpoint, interpolate, mse_per_row, velocity_target
from apexctl.engine.gan import Gan, gan_term
from apexctl.engine.objectives import LossOut, Net, Reference, guided_reference
from apexctl.engine.rcgm import GROUPS, barron_rows, group_masks, rcgm_target, time_weight


def _row_loss(cfg: ApexFullConfig, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if cfg.loss == "barron":
        return barron_rows(pred, target, cfg.barron_alpha, cfg.barron_c)
    return mse_per_row(pred, target)


def apex_full(
    net: Net,
    x: torch.Tensor,
    cond: Cond,
    cfg: ApexFullConfig,
    reference: Reference | None = None,
    target_reference: Reference | None = None,
    generator: torch.Generator | None = None,
    uncond: Cond | None = None,
    phase: str = "all",
    rectify_scale: float = 1.0,
    gan: Gan | None = None,
) -> LossOut:
    """One batch of the released objective. Rows are split into groups (``cfg.groups``; with ``full_batch``
    each group gets a copy of the whole batch), t ~ p(t), u ~ U(0, 1)::

        e2e: t = 1, tt = 0                      the one-step map
        mul: tt = t − u·min(gap, ratio)·t        the instantaneous velocity (flow matching)
        any: tt = t − u·ratio·t                  a jump from t to tt
        adv: x ← sg(ẑ − F(ẑ, 1, c)) (fresh ẑ), tt = t, condition c_fake (and −t with fake_time: signed)

        x_t = t·z + (1−t)·x,  v = z − x,  F = F(x_t, ±t, c | c_fake)     (one forward with gradient)
        v  ← v + r·(F_T(x_t, t, c) − F_T(x_t, t, ∅))   non-adv rows with t in enhance_range (r = enhance_ratio)
        F* = rcgm_target(F, v, x_t, t, tt, F_T, N)      non-adv rows (N = estimate_order ≥ 1; else F* = v)
        L_main = mean_rows(w(t, tt)·ℓ(F, F*)),   w = tan((1 − (|t| − |tt|))·π/2.5) + 1, w = 1 on adv rows

    and on the e2e rows the distribution-matching (rectify) term, from their own one-step samples x̂ = z − F::

        u_s = s·z' + (1−s)·sg(x̂),  s ~ U(0, 1)
        Δ   = clamp(F(u_s, ±s, c_fake) − F_R(u_s, s, c), −δ, δ)          (no gradient)
        L_rect = mean_rows ℓ(F, sg(F − Δ))
        L = L_main + dmc·L_rect

    ℓ is the Barron-reweighted row loss (``loss: barron``) or the row MSE. F_T (``target_reference``, the RCGM
    rollouts and the enhanced target) and F_R (``reference``, the real score of Δ, CFG-guided with
    ``reference_guidance`` > 1) default to the live network without gradient. ``phase = "critic"`` (the extra
    critic steps of ``critic_updates`` > 1) makes every row an adv row: ``L = mean ℓ(F(x_t, t, c_fake), z − x̂)``.
    ``rectify_scale`` multiplies dmc (the critic warm-up ramp of ``method.rectify_warmup``). ``gan`` with
    ``gan_weight`` w > 0 adds DMD2's GAN term (engine/gan.py) on the e2e rows, their data x against their one-step
    samples x̂ = z − F (with its graph), s ~ U(0, 1): ``L += w·(L_D + L_G)`` (not on critic steps: no e2e rows).
    """
    dev = x.device
    if phase == "critic":
        cfg = replace(cfg, groups=(0.0, 0.0, 0.0, 1.0), full_batch=False)
    active = [g for g, share in zip(GROUPS, cfg.groups, strict=True) if share > 0]
    if cfg.full_batch:
        b = x.shape[0]
        x = x.repeat(len(active), *([1] * (x.dim() - 1)))
        cond = Cond.cat([cond] * len(active))
        uncond = Cond.cat([uncond] * len(active)) if uncond is not None else None
        masks = {g: torch.zeros(len(x), dtype=torch.bool, device=dev) for g in GROUPS}
        for i, g in enumerate(active):
            masks[g][i * b : (i + 1) * b] = True
    else:
        masks = group_masks(x.shape[0], cfg.groups, dev)
    n = x.shape[0]
    e2e, mul, any_, adv = (masks[g] for g in GROUPS)
    ref_t = target_reference if target_reference is not None else _no_grad(net)
    ref_r = reference if reference is not None else _no_grad(net)
    use_tt = net.target_time is not None  # the target-time input: tt = t is an instantaneous velocity

    def at(tt_rows: torch.Tensor) -> dict:
        return {"tt": tt_rows} if use_tt else {}

    t = cfg.time(n, dev, generator).to(x.dtype)
    u1 = torch.rand(n, generator=generator).to(dev, x.dtype)
    u2 = torch.rand(n, generator=generator).to(dev, x.dtype)
    tt = torch.where(any_, t - u1 * cfg.consistency_ratio * t, t)
    tt = torch.where(mul, t - u2 * min(cfg.mul_gap, cfg.consistency_ratio) * t, tt)
    t = torch.where(e2e, torch.ones_like(t), t)
    tt = torch.where(e2e, torch.zeros_like(tt), tt)

    x = x.clone()
    z_adv = torch.randn(x.shape, generator=generator).to(x)
    rows = adv.nonzero().flatten()
    if rows.numel():  # the fake rows' data: the generator's own one-step samples from fresh noise
        with torch.no_grad():
            za = z_adv[rows]
            x[rows] = (za - net(za, torch.ones_like(t[rows]), cond[rows])).to(x.dtype)

    z = torch.randn(x.shape, generator=generator).to(x)
    x_t = interpolate(x, z, t)
    v = velocity_target(x, z)
    t_in = torch.where(adv, -t, t) if cfg.fake_time == "signed" else t
    f = net(x_t, t_in, cond, fake=adv if rows.numel() else None, **at(tt))

    with torch.no_grad():
        target = v.clone()
        lo, hi = cfg.enhance_range
        boost = ~adv & (t > lo) & (t < hi)
        if cfg.enhance_ratio != 0.0 and bool(boost.any()):
            if uncond is None:
                raise ValueError("enhance_ratio needs the unconditional rows (uncond)")
            br = boost.nonzero().flatten()
            m = len(br)
            tb = torch.cat([t[br], t[br]])
            both = ref_t(torch.cat([x_t[br], x_t[br]]), tb, Cond.cat([cond[br], uncond[br]]), **at(tb))
            target[br] = target[br] + cfg.enhance_ratio * (both[:m] - both[m:]).to(x.dtype)
        real = (~adv).nonzero().flatten()
        if cfg.estimate_order >= 1 and real.numel():
            target[real] = rcgm_target(
                f[real], target[real], x_t[real], t[real], tt[real], cond[real], ref_t,
                cfg.estimate_order, cfg.rcgm_dt, cfg.rcgm_clip, use_tt,
            )  # fmt: skip
        w = time_weight(t, tt) if cfg.time_weighting else torch.ones_like(t)
        w = torch.where(adv, torch.ones_like(w), w)

    per_row = _row_loss(cfg, f, target) * w
    loss_main = per_row.mean()
    terms = {g: per_row[masks[g]].mean().detach() for g in active}

    loss = loss_main
    er = e2e.nonzero().flatten()
    if cfg.rectify_weight > 0 and er.numel():
        f_e = f[er]
        x_hat = endpoint(x_t[er], t[er], f_e).detach()
        k = len(er)
        s = torch.rand(k, generator=generator).to(dev, x.dtype)
        z3 = torch.randn(x_hat.shape, generator=generator).to(x)
        u = interpolate(x_hat, z3, s)
        with torch.no_grad():
            s_in = -s if cfg.fake_time == "signed" else s
            v_fake = net(u, s_in, cond[er], fake=torch.ones(k, dtype=torch.bool, device=dev), **at(s))
            un = uncond[er] if uncond is not None else None
            v_real = guided_reference(ref_r, net, u, s, cond[er], un, cfg.reference_guidance, **at(s))
            delta = (v_fake - v_real).to(x.dtype)
            clipped = delta.clamp(-cfg.rectify_clip, cfg.rectify_clip)
        loss_rect = _row_loss(cfg, f_e, (f_e - clipped).detach()).mean()
        loss = loss + rectify_scale * cfg.rectify_weight * loss_rect
        terms["rect"] = loss_rect.detach()
        terms["delta_abs"] = delta.abs().mean()
    if gan is not None and cfg.gan_weight > 0 and er.numel():
        k = len(er)
        s_g = torch.rand(k, generator=generator).to(dev, x.dtype)
        z_r = torch.randn((k, *x.shape[1:]), generator=generator).to(x)
        z_f = torch.randn((k, *x.shape[1:]), generator=generator).to(x)
        x_gen_hat = endpoint(x_t[er], t[er], f[er])
        term, gan_terms = gan_term(gan.features, gan.head, x[er], x_gen_hat, cond[er], s_g, z_r, z_f, **at(s_g))
        loss = loss + cfg.gan_weight * term
        terms.update(gan_terms)
    return LossOut(loss, terms)


def _no_grad(net: Net) -> Reference:
    def ref(u: torch.Tensor, s: torch.Tensor, c: Cond, tt: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            return net(u, s, c, tt=tt)

    return ref
