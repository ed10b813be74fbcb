"""LoRA on any family's denoiser with peft, and export in the diffusers format (alpha kept in the metadata).

Only the adapter (and a learnable shift) trains; the base stays frozen in its dtype. The ``base`` reference of
the ``apex`` objective is the same module with its adapters disabled, so one copy of the base weights serves
student, EMA (an EMA of the adapter tensors) and reference.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from apexctl.errors import ApexError

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


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
        transformer.add_adapter(config)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise ApexError(f"model.lora.targets {targets}: {str(exc).splitlines()[0]}") from None
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)


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
