"""``hardware.strategy: fsdp`` on torch FSDP2 (``torch.distributed.fsdp.fully_shard``), not accelerate's FSDP plugin.

accelerate only picks its FSDP plugin on multi-accelerator setups (on CPU it silently falls back to DDP), so
the trainer shards the denoiser itself: each transformer block (the items of the denoiser's ``nn.ModuleList`` children:
``transformer_blocks``, ``single_transformer_blocks``, ``layers``, the refiners, …) is one FSDP unit, then the root.
Parameters become DTensors sharded over the ranks; a frozen LoRA base and its trainable adapters live in the same
units (FSDP2 keeps ``requires_grad`` per parameter).

Checkpoints keep the DDP layout: ``model.safetensors`` holds the full (gathered) state dict, written by rank 0, so
``apexctl export`` reads FSDP checkpoints unchanged; the optimizer is one more registered object
(:class:`OptimizerState`) whose pickle holds the full (gathered) optimizer state, keyed by parameter name.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def shard(transformer: nn.Module, *, mixed_precision: torch.dtype | None, offload: bool) -> nn.Module:
    """Shard ``transformer`` in place (each block, then the root) over the default process group; returns it.

    ``mixed_precision``: compute dtype of the gathered parameters (bf16 on GPU), gradients reduced in fp32; None
    keeps the parameters' dtype. ``offload``: sharded parameters, gradients and optimizer states on the CPU."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    kw = {
        "reshard_after_forward": True,
        "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy(),
    }
    if mixed_precision is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
    for child in transformer.children():
        if isinstance(child, nn.ModuleList):
            for block in child:
                fully_shard(block, **kw)
    fully_shard(transformer, **kw)
    return transformer


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on CPU, gathered to rank 0 (a collective: every rank calls it; others get ``{}``)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Rank 0 passes the full state dict, the other ranks ``{}``: rank 0 broadcasts, each rank keeps its shards."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options(full_state_dict=True, broadcast_from_rank0=True, strict=True))


def save_model(model: nn.Module, path: Path, main: bool) -> None:
    """``model.safetensors`` of the full state dict (gathered on every rank, written by rank 0)."""
    from safetensors.torch import save_file

    state = full_model_state(model)
    if main:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))


class OptimizerState:
    """A checkpointing object for accelerate (``register_for_checkpointing``): the optimizer's full state, keyed by
    parameter name. accelerate calls ``state_dict`` on every rank (the gather is a collective) and writes rank 0's;
    ``load_state_dict`` runs on every rank with the full state read from disk.

    ``model`` holds every parameter the optimizer steps (the sharded denoiser and, when learnable, the replicated
    shift), so names are stable across world sizes."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return {
            "fsdp_optimizer": get_optimizer_state_dict(
                self.model, self.optimizer, options=_options(full_state_dict=True, cpu_offload=True)
            )
        }

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        # strict=False: a parameter that never received a gradient (e.g. the last block's unused text stream) has
        # no AdamW state yet, as in a single-process optimizer's state_dict
        opts = _options(full_state_dict=True, strict=False)
        set_optimizer_state_dict(self.model, self.optimizer, state["fsdp_optimizer"], options=opts)
