"""``distill --dry-run``: what a recipe will do, checked without training or loading weights."""

from __future__ import annotations

import json
from pathlib import Path

from apexctl.errors import BadInput
from apexctl.recipe import Recipe

_EQUATIONS = {
    "apex": "L = w_fm·L_fm(t ≤ {fm_t_max}) + {fake_weight}·L_fake(c_fake) + {rectify_weight}·L_rect(Δ clip {delta_clip}, ref {reference})",
    "apex_paper": "L = {fake_weight}·L_fake + {mix_weight}·w(t)·‖F − ((1−λ)(z−x) + λ·v_fake)‖², λ = {lambda_mix}, weighting {weighting}",
    "flow_matching": "L = ‖F(x_t, t, c) − (z − x)‖²",
}


def count_parameters(model_dir: Path) -> int | None:
    """Parameters of the denoiser from its config alone (meta device: no weights read)."""
    cfg = model_dir / "transformer" / "config.json"
    if not cfg.is_file():
        return None
    try:
        import diffusers
        from accelerate import init_empty_weights

        config = json.loads(cfg.read_text())
        cls = getattr(diffusers, config.get("_class_name", ""), None)
        if cls is None:
            return None
        with init_empty_weights():
            model = cls.from_config(config)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # an estimate only; never fail a dry run on it
        return None


def describe_plan(r: Recipe) -> str:
    m, t, h = r.method, r.train, r.hardware
    lines = [f"model      {r.model.path} (family {r.model.family}, {r.model.dtype})"]
    p = Path(r.model.path)
    if p.is_dir():
        n = count_parameters(p)
        if n is not None:
            lines.append(f"           denoiser parameters: {n:,} (all trained: full fine-tune)")
    elif not r.model.path.startswith("tiny:"):
        lines.append("           (not a local folder: treated as a hub id, resolved when training starts)")
    cache = Path(r.data.cache_dir) / "manifest.json"
    state = "ready" if cache.is_file() else "missing: run `apexctl prepare` first"
    lines.append(f"data       {r.data.source} → cache {r.data.cache_dir} ({state}), cond_dropout {r.data.cond_dropout}")
    eq = _EQUATIONS[m.objective].format(**m.model_dump())
    lines.append(f"objective  {m.objective}: {eq}")
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
    lines.append(
        f"optimizer  AdamW lr {t.lr} ({t.lr_schedule}, warmup {t.warmup_steps}), clip {t.max_grad_norm}, "
        f"EMA {t.ema_decay}, {t.steps} steps"
    )
    lines.append(
        f"hardware   device {h.device}, precision {h.precision}, strategy {h.strategy}, grad ckpt {h.gradient_checkpointing}"
    )
    lines.append(f"output     {r.output.dir} (checkpoints every {t.checkpoint_every}, keep {t.keep_last})")
    return "\n".join(lines)
