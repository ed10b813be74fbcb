"""``distill --dry-run``: what a recipe will do, checked without training or loading weights."""

from __future__ import annotations

import json
from pathlib import Path

from apexctl.errors import BadInput
from apexctl.recipe import Recipe

_EQUATIONS = {
    "apex": "L = w_fm·L_fm(t ≤ {fm_t_max}) + {fake_weight}·L_fake(c_fake) + {rectify_weight}·L_rect(Δ clip {delta_clip}, ref {reference})",
    "apex_full": "L = mean w(t,tt)·ℓ_{loss}(F, F*) over groups {groups} (e2e | mul | any | adv(c_fake)), F* = RCGM "
    "order {estimate_order} (enhance {enhance_ratio}) + {rectify_weight}·L_rect(Δ clip {rectify_clip}, ref {reference})",
    "apex_paper": "L = {fake_weight}·L_fake + {mix_weight}·w(t)·‖F − ((1−λ)(z−x) + λ·v_fake)‖², λ = {lambda_mix}, weighting {weighting}",
    "flow_matching": "L = ‖F(x_t, t, c) − (z − x)‖²",
}


_GIB = 2**30
_OPTIMIZERS = {"adamw": "AdamW", "adamw8bit": "AdamW 8-bit (bitsandbytes)"}


def _transformer_config(r: Recipe) -> tuple[dict, Path | None, str] | None:
    """(transformer config, local model folder or None, where it came from) without reading any weights."""
    path = r.model.path
    folder: Path | None = None
    if path.startswith("tiny:"):
        try:  # tiny models are built in code (about 0.1 s) and cached: their folder has the config
            from apexctl.models import resolve_model_path

            folder = Path(resolve_model_path(path))
        except Exception:
            return None
    elif Path(path).is_dir():
        folder = Path(path)
    if folder is not None and (folder / "transformer" / "config.json").is_file():
        return json.loads((folder / "transformer" / "config.json").read_text()), folder, "local config"
    family = r.model.family
    if family != "auto":  # a hub id: the published config shipped with apexctl, when there is one
        from importlib import resources

        res = resources.files("apexctl.models").joinpath(f"configs/{family}.json")
        if res.is_file():
            return json.loads(res.read_text())["transformer"], None, "published config shipped with apexctl"
    return None


def _family(r: Recipe, folder: Path | None) -> str | None:
    if r.model.family != "auto":
        return r.model.family
    if folder is None:
        return None
    try:
        from apexctl.models import detect_family

        return detect_family(folder)
    except Exception:
        return None


def count_on_meta(config: dict, lora=None, targets: list[str] | None = None) -> tuple[int, int] | None:
    """(parameters, trainable parameters) of the denoiser built on the meta device (no memory, no weights);
    with ``lora`` the adapter is attached with peft exactly as training does and counted."""
    try:
        import diffusers
        from accelerate import init_empty_weights

        cls = getattr(diffusers, config.get("_class_name", ""), None)
        if cls is None:
            return None
        with init_empty_weights():
            model = cls.from_config(config)
            if lora is not None:
                from apexctl.lora import add_lora

                add_lora(model, rank=lora.rank, alpha=lora.alpha, targets=targets or [], dropout=0.0, init="default")
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if lora is not None else total
        return total, trainable
    except BadInput:  # model.lora.targets that match no module: training would refuse them too
        raise
    except Exception:  # an estimate only; never fail a dry run on it
        return None


def _shape(config: dict, folder: Path | None) -> tuple[int, int, int]:
    """(hidden size, blocks, pixels per token side) read from the configs, with the usual values as fallbacks."""
    hidden = config.get("dim") or (config.get("num_attention_heads", 24) * config.get("attention_head_dim", 128))
    layers = (config.get("num_layers") or config.get("n_layers") or config.get("num_hidden_layers") or 0) + config.get(
        "num_single_layers", 0
    )
    patch = config.get("patch_size") or (config.get("all_patch_size") or [2])[0]
    codec = 8
    if folder is not None:
        if (folder / "apexctl_codec.json").is_file():
            codec = 1
        elif (folder / "vae" / "config.json").is_file():
            vae = json.loads((folder / "vae" / "config.json").read_text())
            if "temperal_downsample" in vae:
                codec = 2 ** len(vae["temperal_downsample"])
            elif "block_out_channels" in vae:
                codec = 2 ** (len(vae["block_out_channels"]) - 1)
            elif "spatial_compression_ratio" in vae:
                codec = int(vae["spatial_compression_ratio"])
    return int(hidden), int(layers or 1), int(codec * patch)


def memory_lines(r: Recipe) -> list[str]:
    """Parameter counts and a per-GPU memory estimate for the recipe, from the model config alone.

    weights: frozen parameters in model.dtype; trained parameters in fp32 (full fine-tune: the whole denoiser,
    as the trainer keeps fp32 master weights) + fp32 gradients + optimizer states (AdamW: 2 × fp32; 8-bit:
    2 × 1 byte) + the EMA copy (fp32) when there is one. FSDP shards all of these over hardware.processes.
    Activations (rough): micro_batch × trained branches (apex 2, apex_full 1 or 4 with full_batch) × tokens × hidden × blocks × bytes × k, with
    k = 16 (every intermediate kept) or k = 2 (gradient checkpointing: block inputs + one block recomputed).
    """
    found = _transformer_config(r)
    if found is None:
        return [
            "memory    (no model config on disk for this hub id: estimate skipped; point model.path at a local folder,"
            " or name model.family where apexctl ships the published config: qwen_image)"
        ]
    config, folder, source = found
    lora = r.model.lora
    family = _family(r, folder)
    targets = None
    if lora is not None:
        from apexctl.models import FAMILIES

        targets = lora.targets or (FAMILIES[family].lora_targets if family in FAMILIES else None)
    counted = count_on_meta(config, lora, targets)
    if counted is None:
        return [f"memory    (cannot build {config.get('_class_name')} on the meta device: estimate skipped)"]
    total, trainable = counted
    t, h = r.train, r.hardware
    dtype_bytes = {"fp32": 4, "bf16": 2, "fp16": 2}[r.model.dtype]
    frozen = total - trainable
    weights = frozen * dtype_bytes + trainable * 4
    grads = trainable * 4
    adam = trainable * (2 if t.optimizer == "adamw8bit" else 8)
    ema = trainable * 4 if r.ema_decay is not None else 0
    # reference = base with full tuning: a frozen fp32 copy of the starting weights
    base = trainable * 4 if ("base" in r.method.references and lora is None) else 0
    # critic = separate: a second copy of the trained parameters (LoRA: the adapter; the base is shared) with its
    # own gradients and optimizer states
    critic = (trainable * 8 + adam) if r.method.critic == "separate" else 0
    shards = h.processes if h.strategy == "fsdp" else 1
    state = (weights + grads + adam + ema + base + critic) / shards
    hidden, blocks, px = _shape(config, folder)
    tokens = max(r.data.resolution // px, 1) ** 2 + 256  # image tokens + a typical prompt length
    act_bytes = 4 if h.precision == "fp32" or (h.precision == "auto" and h.device == "cpu") else 2
    m = r.method  # rows with gradient per example: apex 2 (generator + FM rows, critic), apex_full 1 (4: full_batch)
    branches = {"flow_matching": 1, "apex_full": 4 if getattr(m, "full_batch", False) else 1}.get(m.objective, 2)
    if getattr(m, "gan_weight", 0.0) > 0:  # the GAN term's critic passes with gradient: 3 × B (apex), 3 × B/4 (e2e)
        branches += 3 if m.objective == "apex" else 0.75
    k = 2 if h.gradient_checkpointing else 16
    acts = t.micro_batch * branches * tokens * hidden * blocks * act_bytes * k
    what = f"LoRA r={lora.rank}" if lora is not None else "full fine-tune"
    lines = [
        f"params     {total:,} denoiser parameters"
        + (f" (base {frozen:,} + adapter {trainable:,})" if lora is not None else "")
        + f", {trainable:,} trainable ({what}; {source}, meta device)",
        f"memory     per GPU ≈ {(state + acts) / _GIB:.2f} GiB: weights {weights / shards / _GIB:.2f} + grads "
        f"{grads / shards / _GIB:.2f} + {t.optimizer} states {adam / shards / _GIB:.2f} + EMA {ema / shards / _GIB:.2f}"
        + (f" + base copy {base / _GIB:.2f}" if base else "")
        + (f" + separate critic {critic / _GIB:.2f} (weights, grads, optimizer states)" if critic else "")
        + (f" (FSDP: /{shards})" if shards > 1 else "")
        + f" + activations ≈ {acts / _GIB:.2f} (rough: {t.micro_batch} × {branches} branch(es) × {tokens} tokens × "
        f"{hidden} × {blocks} blocks × {act_bytes} B × {k})",
    ]
    return lines


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
