"""LoRA on any family's denoiser with peft, and export in the diffusers format (alpha kept in the metadata).

Only the adapter (and a learnable shift) trains; the base stays frozen in its dtype. The ``base`` reference of
the ``apex`` objective is the same module with its adapters disabled, so one copy of the base weights serves
student, EMA (an EMA of the adapter tensors) and reference.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from apexctl.errors import ApexError, BadInput

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
COMFYUI_NAME = "comfyui_lora.safetensors"
#: written beside every LoRA apexctl exports: {"family": ..., "pipeline": ...}
LORA_MARKER = "apexctl_lora.json"


def _layer_names(transformer: nn.Module, limit: int = 40) -> list[str]:
    """The distinct names LoRA targets can use (last name component, ``to_out.0`` style for list items)."""
    names: list[str] = []
    for name, module in transformer.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            parts = name.split(".")
            short = ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]
            if short not in names:
                names.append(short)
    return names[:limit] + (["…"] if len(names) > limit else [])


def add_lora(transformer: nn.Module, *, rank: int, alpha: float, targets: list[str], dropout: float, init: str) -> None:
    """Freeze ``transformer`` and attach a trainable fp32 LoRA adapter named ``default`` to ``targets``."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets,
        lora_dropout=dropout,
        init_lora_weights=True if init == "default" else init,
    )
    try:
        with warnings.catch_warnings():
            # a torchao-quantised base (model.quantize): peft warns that merge() would fail; apexctl never merges
            # into the quantised base (merge-lora merges into the unquantised one from disk)
            warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
            transformer.add_adapter(config)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise BadInput(
            f"model.lora.targets {targets}: {str(exc).splitlines()[0]} Module names that exist in "
            f"{type(transformer).__name__}: {', '.join(_layer_names(transformer))}"
        ) from None
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)


def make_trainable(backbone, lora) -> None:
    """The trained parameters of a recipe (``lora`` = its ``model.lora``): a fresh fp32 adapter on the frozen base,
    which stays in its dtype; or, without LoRA, every denoiser weight in fp32 (master weights; autocast gives bf16
    compute on GPU). Training, exports from checkpoints and the FSDP gather all rebuild the model this one way."""
    if lora is None:
        backbone.transformer.float().requires_grad_(True)
        return
    add_lora(
        backbone.transformer,
        rank=lora.rank,
        alpha=lora.alpha,
        targets=lora.targets or backbone.lora_targets,
        dropout=lora.dropout,
        init=lora.init,
    )


@contextmanager
def adapters_disabled(transformer: nn.Module) -> Iterator[None]:
    """The base model: adapters off within the block (a flag, no weights touched)."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def adapter_state(transformer: nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


def check_not_zero(state: dict[str, torch.Tensor]) -> None:
    """Refuse an adapter whose update B·A is identically zero (a known silent failure of LoRA exports)."""
    ups = [v for k, v in state.items() if "lora_B" in k]
    if not ups or all(float(v.abs().max()) == 0.0 for v in ups):
        raise ApexError("refusing to export a LoRA whose lora_B weights are all zero (the adapter never trained)")


def adapter_metadata(transformer: nn.Module) -> dict:
    cfg = transformer.peft_config["default"].to_dict()
    cfg["target_modules"] = sorted(cfg["target_modules"]) if cfg.get("target_modules") else cfg.get("target_modules")
    return cfg


def check_lora_formats(backbone, formats: list[str]) -> None:
    """Refuse, before any training, an export format the family cannot be loaded in."""
    if "comfyui" in formats and not backbone.comfyui:
        raise BadInput(
            f"output.lora_formats: 'comfyui' is not available for family {backbone.family} (core ComfyUI has no "
            f"loader for it); allowed: [diffusers]"
        )


def to_comfyui(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """peft/diffusers adapter keys (``<module>.lora_A.weight``) → the keys ComfyUI's LoRA loader maps.

    Rule (ComfyUI ``comfy/lora.py``, ``model_lora_keys_unet``): for SD3, Flux, QwenImage and Lumina2 (Z-Image)
    models it maps ``transformer.<diffusers module name>`` onto its own weights (for SD3 and Flux through
    ``mmdit_to_diffusers`` / ``flux_to_diffusers``, fused qkv slices included), and reads the scale from
    ``<that key>.alpha``. So each module gets ``transformer.<module>.lora_A.weight``, ``.lora_B.weight`` and
    ``.alpha``; ComfyUI applies ΔW = (alpha / rank)·B·A, the same update peft applies with ``lora_alpha``. The
    ``diffusion_model.<module>`` spelling would only load where ComfyUI's own names equal diffusers' (Qwen-Image).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("transformer.")
        module, _, kind = key.rpartition(".lora_")
        if not module or kind not in ("A.weight", "B.weight"):
            raise ApexError(f"unexpected LoRA key {key!r} (expected <module>.lora_A.weight / .lora_B.weight)")
        out[f"transformer.{module}.lora_{kind}"] = value
        out[f"transformer.{module}.alpha"] = torch.tensor(float(alpha))
    return out


def save_comfyui(transformer: nn.Module, folder: Path) -> Path:
    """Write ``folder/comfyui_lora.safetensors`` from the ``default`` adapter (uniform rank and alpha only)."""
    from safetensors.torch import save as safetensors_bytes

    from apexctl.atomic import write_bytes

    cfg = transformer.peft_config["default"]
    if cfg.rank_pattern or cfg.alpha_pattern:
        raise ApexError("ComfyUI export supports one rank and alpha for all modules (rank_pattern/alpha_pattern set)")
    state = adapter_state(transformer)
    check_not_zero(state)
    path = Path(folder) / COMFYUI_NAME
    meta = {"format": "pt", "lora_alpha": str(cfg.lora_alpha), "rank": str(cfg.r)}
    write_bytes(path, safetensors_bytes(to_comfyui(state, cfg.lora_alpha), metadata=meta))
    return path


def save_diffusers_lora(
    transformer: nn.Module, pipeline_class: str, dest: str | Path, *, family: str, info: dict | None = None
) -> Path:
    """``<pipeline_class>.save_lora_weights`` with the adapter metadata (so ``lora_alpha`` survives) plus
    ``apexctl_lora.json`` naming the family (and ``info``'s keys), written to a temporary sibling folder and renamed;
    an all-zero adapter is refused."""
    import diffusers

    from apexctl.atomic import atomic_dir
    from apexctl.hub import quiet_hub_progress

    state = adapter_state(transformer)
    check_not_zero(state)
    dest = Path(dest)
    with atomic_dir(dest) as tmp, quiet_hub_progress():
        getattr(diffusers, pipeline_class).save_lora_weights(
            tmp,
            transformer_lora_layers=state,
            weight_name=WEIGHT_NAME,
            transformer_lora_adapter_metadata=adapter_metadata(transformer),
        )
        (tmp / LORA_MARKER).write_text(json.dumps({"family": family, "pipeline": pipeline_class} | (info or {})))
    return dest


def check_lora_file(path: Path) -> None:
    """Refuse, with one line, a file that is not safetensors or whose keys are not a diffusers-format LoRA of the
    denoiser (``transformer.<module>.lora_A.weight`` / ``.lora_B.weight``): diffusers would raise an IndexError, or
    load nothing at all and let ``merge-lora`` write the base model unchanged."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as exc:
        raise BadInput(f"{path}: not a safetensors file ({str(exc).splitlines()[0]})") from None
    foreign = [k for k in keys if not (k.startswith("transformer.") and ".lora_" in k)]
    if not keys or foreign:
        found = f"{len(foreign)} of its {len(keys)} keys are not, e.g. {foreign[0]!r}" if keys else "no tensors"
        raise BadInput(
            f"{path}: not a LoRA of the denoiser in the diffusers format (keys 'transformer.<module>.lora_A.weight' "
            f"and '.lora_B.weight'): {found}"
        )


def load_diffusers_lora(transformer: nn.Module, folder: str | Path, family: str) -> None:
    """Attach a diffusers-format LoRA folder (``transformer.``-prefixed keys) as the ``default`` adapter.

    A LoRA written by apexctl names its family (``apexctl_lora.json``) and must match; any LoRA whose keys or shapes
    do not fit this denoiser is refused with one line (exit 2) instead of peft's traceback.
    """
    from apexctl.hub import one_line, quiet_hub_progress

    folder = Path(folder)
    if not (folder / WEIGHT_NAME).is_file():
        raise BadInput(f"{folder}: no {WEIGHT_NAME} (a diffusers-format LoRA folder is expected)")
    check_lora_file(folder / WEIGHT_NAME)
    marker = folder / LORA_MARKER
    if marker.is_file():
        made_for = json.loads(marker.read_text()).get("family")
        if made_for != family:
            raise BadInput(f"{folder}: a LoRA for family {made_for} cannot be applied to a {family} base model")
    try:
        with quiet_hub_progress(), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # peft's "inconsistency" warning precedes the error
            transformer.load_lora_adapter(
                str(folder), weight_name=WEIGHT_NAME, prefix="transformer", adapter_name="default"
            )
    except (RuntimeError, ValueError, KeyError) as exc:
        if getattr(transformer, "peft_config", None) and "default" in transformer.peft_config:
            transformer.delete_adapters("default")
        raise BadInput(f"{folder}: this LoRA does not fit the {family} base model: {one_line(exc)}") from None
