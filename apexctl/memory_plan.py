"""``distill --dry-run``'s memory estimate, from the model config alone (no weights are read).

State (weights, gradients, optimizer states, EMA, reference copies) is arithmetic from the parameter count on the
meta device. Activations come from the table measured on the real architectures (``models/configs/
activations.json``, written by ``bench/memory.py``): bytes per block per token and the rest of the step, per
objective and gradient checkpointing. An architecture, objective or setting without an entry falls back to the
rough formula, and the line says which one was used.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path

from apexctl.errors import BadInput
from apexctl.recipe import Recipe

_GIB = 2**30
#: the activation table's file in models/configs/ (every other file there is a published model config)
TABLE = "activations"
#: family → the shipped published config a hub id of that family gets when no config lists the id itself
FAMILY_CONFIGS = {
    "qwen_image": "qwen_image",
    "flux": "flux_dev",
    "sd3": "sd3.5_medium",
    "sana": "sana_1600m",
    "z_image": "z_image",
}
#: config keys that do not change the denoiser's parameters or activations (default image size, RoPE table)
_NOT_ARCHITECTURE = {"sample_size", "axes_lens"}
#: transformers whose pipeline packs 2×2 latent patches into one token although their config says patch_size 1
_PACKED = {"FluxTransformer2DModel": 2}
#: transformers that pad the image and the caption sequences to a multiple of this (diffusers' SEQ_MULTI_OF)
_SEQ_MULTIPLE = {"ZImageTransformer2DModel": 32}


@cache
def shipped_configs() -> dict[str, dict]:
    """Every published config shipped in ``apexctl/models/configs/`` by file stem (``transformer``, ``vae``, …)."""
    folder = resources.files("apexctl.models").joinpath("configs")
    out = {}
    for res in sorted(folder.iterdir(), key=lambda p: p.name):
        if res.name.endswith(".json") and res.name != f"{TABLE}.json":
            out[res.name[: -len(".json")]] = json.loads(res.read_text())
    return out


@cache
def activation_table() -> dict:
    """The measured activation table (``{}`` when it is not shipped)."""
    res = resources.files("apexctl.models").joinpath(f"configs/{TABLE}.json")
    return json.loads(res.read_text()) if res.is_file() else {}


def published_config_name(family: str, model_path: str) -> str | None:
    """The shipped config for a hub id: the file whose ``_hub_ids`` lists ``model_path``, else the family's."""
    for name, cfg in shipped_configs().items():
        if model_path in cfg.get("_hub_ids", []):
            return name
    name = FAMILY_CONFIGS.get(family)
    return name if name in shipped_configs() else None


def architecture_name(config: dict) -> str | None:
    """The shipped config whose transformer ``config`` is (every key of the published file that shapes the model
    equal), or None: a local folder of a published model finds its measured table entry this way."""
    for name, cfg in shipped_configs().items():
        want = {k: v for k, v in cfg["transformer"].items() if k not in _NOT_ARCHITECTURE}
        if all(config.get(k) == v for k, v in want.items()):
            return name
    return None


def codec_factor(vae: dict | None, folder: Path | None = None) -> int:
    """Pixels per latent cell of the codec: from ``vae`` (a VAE config) or the folder's ``vae/`` / pixel codec;
    8 when neither says."""
    if folder is not None and (folder / "apexctl_codec.json").is_file():
        return int(json.loads((folder / "apexctl_codec.json").read_text()).get("patch", 1))
    if vae is None and folder is not None and (folder / "vae" / "config.json").is_file():
        vae = json.loads((folder / "vae" / "config.json").read_text())
    vae = vae or {}
    if "temperal_downsample" in vae:
        return 2 ** len(vae["temperal_downsample"])
    for key in ("encoder_block_out_channels", "block_out_channels"):
        if key in vae:
            return 2 ** (len(vae[key]) - 1)
    return int(vae.get("spatial_compression_ratio", 8))


def pixels_per_token(config: dict, vae: dict | None, folder: Path | None = None) -> int:
    """Image pixels per token side: the codec's factor × the transformer's patch (2×2 packing for FLUX)."""
    patch = _PACKED.get(config.get("_class_name", ""))
    patch = patch or config.get("patch_size") or (config.get("all_patch_size") or [2])[0]
    return codec_factor(vae, folder) * int(patch)


def sequence_tokens(config: dict, n: int) -> int:
    """Tokens a sequence of ``n`` occupies in the blocks (Z-Image pads image and caption to a multiple of 32)."""
    multiple = _SEQ_MULTIPLE.get(config.get("_class_name", ""), 1)
    return n + (-n) % multiple


def block_count(config: dict) -> int:
    """The denoiser's transformer blocks (FLUX: double + single stream; Z-Image: main layers, refiners apart)."""
    layers = config.get("num_layers") or config.get("n_layers") or config.get("num_hidden_layers") or 0
    return int(layers + config.get("num_single_layers", 0)) or 1


def hidden_size(config: dict) -> int:
    return int(config.get("dim") or (config.get("num_attention_heads", 24) * config.get("attention_head_dim", 128)))


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


def quantized_on_meta(config: dict, scheme: str) -> int | None:
    """Weights ``model.quantize = scheme`` stores quantised: the block Linears the scheme can hold (quantize.py's own
    rule), counted on the meta device."""
    try:
        import diffusers
        from accelerate import init_empty_weights

        from apexctl.models.quantize import block_linears, quantizable

        with init_empty_weights():
            model = getattr(diffusers, config["_class_name"]).from_config(config)
        return sum(lin.weight.numel() for _, _, _, lin in block_linears(model) if quantizable(scheme, lin) is None)
    except Exception:  # an estimate only
        return None


def block_weights_on_meta(config: dict) -> tuple[int, int] | None:
    """(parameters inside the denoiser's blocks, the largest block's), counted on the meta device: what
    ``hardware.offload_base`` keeps in CPU memory (training/offload.py streams the blocks of top-level ModuleLists)."""
    try:
        import diffusers
        from accelerate import init_empty_weights

        from apexctl.training.offload import transformer_blocks

        with init_empty_weights():
            model = getattr(diffusers, config["_class_name"]).from_config(config)
        sizes = [sum(p.numel() for p in b.parameters()) for b in transformer_blocks(model)]
        return (sum(sizes), max(sizes)) if sizes else None
    except Exception:  # an estimate only
        return None


def _transformer_config(r: Recipe) -> tuple[dict, Path | None, str, str | None] | None:
    """(transformer config, local model folder or None, where it came from, shipped config name or None)."""
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
        config = json.loads((folder / "transformer" / "config.json").read_text())
        return config, folder, "local config", architecture_name(config)
    if r.model.family != "auto":  # a hub id: the published config shipped with apexctl, when there is one
        name = published_config_name(r.model.family, path)
        if name is not None:
            return shipped_configs()[name]["transformer"], None, f"published config {name}.json", name
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


def _rows(r: Recipe) -> tuple[int, str]:
    """Rows per micro-batch the objective trains on: ``apex_full``'s ``full_batch`` gives every active group a copy."""
    m, mb = r.method, r.train.micro_batch
    if getattr(m, "full_batch", False):
        groups = sum(1 for share in m.groups if share > 0)
        return mb * groups, f"{mb} × {groups} groups (full_batch)"
    return mb, f"{mb}"


def measured_activations(r: Recipe, name: str | None, config: dict, image_tokens: int) -> tuple[float, str] | None:
    """Activation bytes from the measured table, or None where it has no entry for this architecture, training
    mode (LoRA / full), objective and checkpointing, or the run is not what was measured (bf16, no FSDP, no GAN
    term)::

        acts = blocks × (fixed + rows × N × per_token) + (fixed + rows × N × per_token of the rest)

    N = image tokens + the entry's text tokens (image tokens alone where the text is read by cross-attention);
    rows = micro_batch (× the active groups with ``full_batch``). Each part as the entry measured it: the whole
    step of the objective, every forward and backward pass included. With ``model.quantize``: the scheme's own fit
    (the entry's ``quantized``) where ``bench/memory.py --quantize`` measured it, else the bf16 base's."""
    entry = activation_table().get(name or "")
    m, h = r.method, r.hardware
    trained = "lora" if r.model.lora is not None else "full"
    if not entry or entry.get("trained") != trained or h.precision != "bf16" or h.strategy == "fsdp":
        return None
    if getattr(m, "gan_weight", 0.0) > 0:
        return None
    slot = "checkpointing" if h.gradient_checkpointing else "none"
    fit = entry.get("objectives", {}).get(m.objective, {}).get(slot)
    if fit is None:
        return None
    q, base = r.model.quantize, ""
    if q != "none":  # a quantised base's own fit where it was measured (int8 / fp8: one layer dequantised at the peak)
        fit_q = entry.get("quantized", {}).get(q, {}).get(m.objective, {}).get(slot)
        base = f"{q} base, " if fit_q is not None else f"bf16 base's fit, {q} not measured, "
        fit = fit_q or fit
    rows, rows_text = _rows(r)
    n = sequence_tokens(config, image_tokens)
    if entry.get("tokens", "image + text") == "image + text":
        n += sequence_tokens(config, int(entry["text_tokens"]))
    blocks, pb, rest = int(fit["blocks"]), fit["per_block"], fit["rest"]
    others = rest["fixed_bytes"] + rows * n * rest["bytes_per_row_token"]
    acts = blocks * (pb["fixed_bytes"] + rows * n * pb["bytes_per_row_token"]) + others
    ck = "checkpointing" if h.gradient_checkpointing else "no checkpointing"
    text = (
        f"measured: {blocks} blocks × ({pb['fixed_bytes'] / 2**20:,.0f} MiB + {rows_text} row(s) × {n} tokens × "
        f"{pb['bytes_per_row_token']:,.0f} B) + rest {others / _GIB:.2f}; {name} {trained} {m.objective}, {ck}, "
        f"{base}activations.json"
    )
    return max(acts, 0.0), text


def rough_activations(r: Recipe, config: dict, image_tokens: int) -> tuple[float, str]:
    """The rough formula, for what the table does not cover: micro_batch × trained branches (apex 2, apex_full 1 or 4
    with full_batch) × tokens × hidden × blocks × bytes × k, with k = 16 (every intermediate kept) or k = 2
    (gradient checkpointing: block inputs + one block recomputed)."""
    t, h, m = r.train, r.hardware, r.method
    tokens = image_tokens + 256  # image tokens + a typical prompt length
    hidden, blocks = hidden_size(config), block_count(config)
    act_bytes = 4 if h.precision == "fp32" or (h.precision == "auto" and h.device == "cpu") else 2
    branches = {"flow_matching": 1, "apex_full": 4 if getattr(m, "full_batch", False) else 1}.get(m.objective, 2)
    if getattr(m, "gan_weight", 0.0) > 0:  # the GAN term's critic passes with gradient: 3 × B (apex), 3 × B/4 (e2e)
        branches += 3 if m.objective == "apex" else 0.75
    k = 2 if h.gradient_checkpointing else 16
    acts = t.micro_batch * branches * tokens * hidden * blocks * act_bytes * k
    text = f"rough: {t.micro_batch} × {branches} branch(es) × {tokens} tokens × {hidden} × {blocks} blocks × "
    text += f"{act_bytes} B × {k}"
    return acts, text


def memory_lines(r: Recipe) -> list[str]:
    """Parameter counts and a per-GPU memory estimate for the recipe, from the model config alone.

    weights: frozen parameters in model.dtype; trained parameters in fp32 (full fine-tune: the whole denoiser,
    as the trainer keeps fp32 master weights) + fp32 gradients + optimizer states (AdamW: 2 × fp32; 8-bit:
    2 × 1 byte) + the EMA copy (fp32) when there is one. FSDP shards all of these over hardware.processes.
    Activations: :func:`measured_activations`, else :func:`rough_activations`.
    """
    found = _transformer_config(r)
    if found is None:
        names = ", ".join(sorted(FAMILY_CONFIGS))
        return [
            "memory    (no model config on disk for this hub id: estimate skipped; point model.path at a local folder,"
            f" or name model.family where apexctl ships the published config: {names})"
        ]
    config, folder, source, name = found
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
    scheme = r.model.quantize
    quantized = (quantized_on_meta(config, scheme) or 0) if scheme != "none" else 0
    from apexctl.models.quantize import BYTES_PER_WEIGHT

    # model.quantize: those base weights in the scheme's measured bytes per weight (codes + scales), the rest as is
    weights = (frozen - quantized) * dtype_bytes + quantized * BYTES_PER_WEIGHT.get(scheme, 0) + trainable * 4
    grads = trainable * 4
    adam = trainable * (2 if t.optimizer == "adamw8bit" else 8)
    ema = trainable * 4 if r.ema_decay is not None else 0
    host = {}  # what hardware.offload_* keeps in CPU memory instead
    if h.ema_on_cpu:
        host["EMA (ema_on_cpu)"], ema = ema, 0
    if h.offload_base and (blocks := block_weights_on_meta(config)) is not None:
        # all but two blocks: the one streamed in and the previous one, held by autograd until its backward ends
        in_blocks, largest = blocks
        host["base blocks (offload_base)"] = max(in_blocks - 2 * largest, 0) * dtype_bytes
        weights -= host["base blocks (offload_base)"]
    # reference = base with full tuning: a frozen fp32 copy of the starting weights
    base = trainable * 4 if ("base" in r.method.references and lora is None) else 0
    # critic = separate: a second copy of the trained parameters (LoRA: the adapter; the base is shared) with its
    # own gradients and optimizer states
    critic = (trainable * 8 + adam) if r.method.critic == "separate" else 0
    shards = h.processes if h.strategy == "fsdp" else 1
    state = (weights + grads + adam + ema + base + critic) / shards
    vae = shipped_configs()[name].get("vae") if name is not None and folder is None else None
    image_tokens = max(r.data.resolution // pixels_per_token(config, vae, folder), 1) ** 2
    acts_text = measured_activations(r, name, config, image_tokens)
    if acts_text is None:
        acts_text = rough_activations(r, config, image_tokens)
    acts, how = acts_text
    if h.offload_activations:  # saved tensors wait in CPU memory; about one block's working set stays
        host["activations (offload_activations)"] = acts - acts / block_count(config)
        acts -= host["activations (offload_activations)"]
    what = f"LoRA r={lora.rank}" if lora is not None else "full fine-tune"
    return [
        f"params     {total:,} denoiser parameters"
        + (f" (base {frozen:,} + adapter {trainable:,})" if lora is not None else "")
        + f", {trainable:,} trainable ({what}; {source}, meta device)"
        + (f"; {quantized:,} base weights stored {scheme} (model.quantize)" if quantized else ""),
        f"memory     per GPU ≈ {(state + acts) / _GIB:.2f} GiB: weights {weights / shards / _GIB:.2f} + grads "
        f"{grads / shards / _GIB:.2f} + {t.optimizer} states {adam / shards / _GIB:.2f} + EMA {ema / shards / _GIB:.2f}"
        + (f" + base copy {base / _GIB:.2f}" if base else "")
        + (f" + separate critic {critic / _GIB:.2f} (weights, grads, optimizer states)" if critic else "")
        + (f" (FSDP: /{shards})" if shards > 1 else "")
        + f" + activations ≈ {acts / _GIB:.2f} ({how})",
    ] + (
        [
            "offload    in CPU memory instead: "
            + " + ".join(f"{k} {v / _GIB:.2f}" for k, v in host.items())
            + " GiB (estimates; slower: every streamed block crosses PCIe each forward; not measured on a GPU)"
        ]
        if host
        else []
    )
