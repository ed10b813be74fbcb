"""``distill --dry-run``: what a recipe will do, checked without training or loading weights."""

from __future__ import annotations

from pathlib import Path

from apexctl.errors import BadInput
from apexctl.memory_plan import count_on_meta, memory_lines
from apexctl.recipe import Recipe

__all__ = ["count_on_meta", "describe_plan", "memory_lines"]

_EQUATIONS = {
    "apex": "L = w_fm·L_fm(t ≤ {fm_t_max}) + {fake_weight}·L_fake(c_fake) + {rectify_weight}·L_rect(Δ clip {delta_clip}, ref {reference})",
    "apex_full": "L = mean w(t,tt)·ℓ_{loss}(F, F*) over groups {groups} (e2e | mul | any | adv(c_fake)), F* = RCGM "
    "order {estimate_order} (enhance {enhance_ratio}) + {rectify_weight}·L_rect(Δ clip {rectify_clip}, ref {reference})",
    "apex_paper": "L = {fake_weight}·L_fake + {mix_weight}·w(t)·‖F − ((1−λ)(z−x) + λ·v_fake)‖², λ = {lambda_mix}, weighting {weighting}",
    "flow_matching": "L = ‖F(x_t, t, c) − (z − x)‖²",
}


_OPTIMIZERS = {"adamw": "AdamW", "adamw8bit": "AdamW 8-bit (bitsandbytes)"}


def describe_plan(r: Recipe) -> str:
    m, t, h = r.method, r.train, r.hardware
    lines = [f"model      {r.model.path} (family {r.model.family}, {r.model.dtype})"]
    p = Path(r.model.path)
    if not p.is_dir() and not r.model.path.startswith("tiny:"):
        lines.append("           (not a local folder: treated as a hub id, resolved when training starts)")
    cache = Path(r.data.cache_dir) / "manifest.json"
    state = "ready" if cache.is_file() else "missing: run `apexctl prepare` first"
    lines.append(f"data       {r.data.source} → cache {r.data.cache_dir} ({state}), cond_dropout {r.data.cond_dropout}")
    eq = _EQUATIONS[m.objective].format(**m.model_dump())
    lines.append(f"objective  {m.objective}: {eq}")
    if m.objective == "apex" and m.critic == "separate":
        copy = " (with LoRA: a second adapter on the shared frozen base)" if r.model.lora else ""
        lines.append(
            f"           critic: separate copy of the denoiser{copy} (L_fake with the real condition; not exported)"
        )
    if getattr(m, "warm_start_steps", 0) > 0:
        pairs = m.warm_start_cache or r.data.cache_dir
        lines.append(
            f"           warm start: steps 1–{m.warm_start_steps} regress F(z, 1, c) on the teacher's pairs in {pairs}"
        )
    if getattr(m, "rectify_warmup", 0) > 0:
        lines.append(f"           critic warm-up: rectify_weight ramps from 0 over {m.rectify_warmup} steps")
    if getattr(m, "gan_weight", 0.0) > 0:
        lines.append(f"           GAN term: {m.gan_weight}·(L_D + L_G) on the critic's middle-block features")
    if m.objective == "apex" and m.generator_steps > 1:
        n = m.generator_steps
        lines.append(
            f"           generator steps {n}: τ ∈ {{1, …, 1/{n}}}; sample with sample.method few, sample.steps {n}"
        )
    if m.objective != "flow_matching":
        s = m.shift
        lines.append(
            f"shift      c_fake = {s.a}·c + {s.b} ({s.mode}, site {s.site}{', learnable' if s.learnable else ''})"
        )
    gb = t.micro_batch * t.grad_accum * h.processes
    if t.global_batch is not None and t.global_batch != gb:
        raise BadInput(
            f"train.global_batch = {t.global_batch} but micro_batch × grad_accum × hardware.processes = "
            f"{t.micro_batch} × {t.grad_accum} × {h.processes} = {gb}"
        )
    lines.append(f"batch      {t.micro_batch} micro × {t.grad_accum} accum × {h.processes} processes = {gb} global")
    ema = "none" if r.ema_decay is None else f"decay {r.ema_decay}"
    if r.train.ema_decay is None and r.ema_decay is not None:
        ema += " (for method.reference ema)"
    lines.append(
        f"optimizer  {_OPTIMIZERS[t.optimizer]} lr {t.lr} ({t.lr_schedule}, warmup {t.warmup_steps}), "
        f"clip {t.max_grad_norm}, EMA {ema}, {t.steps} steps"
    )
    lines.append(
        f"hardware   device {h.device}, precision {h.precision}, strategy {h.strategy}, grad ckpt {h.gradient_checkpointing}"
    )
    lines.append(f"output     {r.output.dir} (checkpoints every {t.checkpoint_every}, keep {t.keep_last})")
    lines += memory_lines(r)
    return "\n".join(lines)
