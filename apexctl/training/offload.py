"""One-GPU memory offloads of the ``hardware`` section (docs/training.md, "Memory on one GPU").

- :func:`activations_on_cpu` (``hardware.offload_activations``): the tensors a training forward saves for backward
  go to pinned CPU memory and come back in backward — ``torch.autograd.graph.save_on_cpu``'s pack / unpack, except
  that parameters (and tensor subclasses such as quantised weights) are kept where they are: they are resident
  anyway, and copying the frozen base out and back every step would double its host memory and its PCIe traffic.
- :class:`BlockOffload` (``hardware.offload_base``): the frozen tensors of each transformer block (a LoRA's base:
  parameters with ``requires_grad = False`` and buffers) live in CPU memory; a forward pre-hook streams the block's
  copy to the device, a forward hook drops it again. The adapter's parameters never move (their gradients and
  optimizer state stay on the device). With gradient checkpointing (required) backward recomputes each block, which
  streams it in again; a recomputation stops early (no forward hook), so a block's pre-hook first drops every other
  block still resident: at most one block's frozen weights are referenced by the modules at any time (autograd may
  hold the previous one until its backward finishes).

Both are exact: the values are copied, never converted, so losses and gradients are bit-identical to a run
without them (on the CPU they move nothing at all).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

#: the attribute of the denoiser that holds its installed :class:`BlockOffload`
ATTR = "_apexctl_block_offload"


def _keep(t: torch.Tensor) -> bool:
    """Saved tensors that stay where they are: parameters, CPU tensors, subclasses and non-strided layouts."""
    return isinstance(t, nn.Parameter) or t.device.type == "cpu" or type(t) is not torch.Tensor or t.is_sparse


def pack_to_cpu(t: torch.Tensor, pin: bool):
    """A saved tensor → (its device, its CPU copy), or the tensor itself when :func:`_keep` says so."""
    if _keep(t):
        return t
    packed = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=pin)
    packed.copy_(t, non_blocking=pin)
    return (t.device, packed)


def unpack_from_cpu(packed, pin: bool) -> torch.Tensor:
    if isinstance(packed, torch.Tensor):
        return packed
    device, t = packed
    return t.to(device, non_blocking=pin)


def activations_on_cpu(device: torch.device):
    """The ``saved_tensors_hooks`` context of one training forward + backward (pinned host memory on CUDA)."""
    pin = device.type == "cuda"
    return torch.autograd.graph.saved_tensors_hooks(partial(pack_to_cpu, pin=pin), partial(unpack_from_cpu, pin=pin))


@dataclass
class _Frozen:
    owner: nn.Module
    name: str
    master: torch.Tensor  # the CPU tensor (a Parameter for parameters): what the module holds between forwards
    is_param: bool


def transformer_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The children of the denoiser's top-level ``nn.ModuleList`` s (its transformer blocks), in module order."""
    return [b for child in transformer.children() if isinstance(child, nn.ModuleList) for b in child]


class BlockOffload:
    """Streams each block's frozen tensors from CPU memory to ``device`` for the block's forward (module docs)."""

    def __init__(self, blocks: list[nn.Module], device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"
        self.blocks = blocks
        self.frozen: list[list[_Frozen]] = [self._frozen_of(b) for b in blocks]
        self.resident: set[int] = set()
        self.handles = []
        for i, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(partial(self._enter, i)))
            self.handles.append(block.register_forward_hook(partial(self._leave, i)))

    def _frozen_of(self, block: nn.Module) -> list[_Frozen]:
        out = []
        for owner in block.modules():
            for name, p in owner._parameters.items():
                if p is not None and not p.requires_grad:
                    out.append(_Frozen(owner, name, self._to_host(p, True), True))
            for name, b in owner._buffers.items():
                if b is not None:
                    out.append(_Frozen(owner, name, self._to_host(b, False), False))
        for f in out:
            self._set(f, f.master)
        return out

    def _to_host(self, t: torch.Tensor, is_param: bool) -> torch.Tensor:
        host = t.detach().cpu()
        if self.pin:  # asynchronous host → device copies need page-locked memory
            host = host.pin_memory()
        if host.data_ptr() == t.data_ptr():  # already in (unpinned) CPU memory: the module keeps its own tensor
            return t
        return nn.Parameter(host, requires_grad=False) if is_param else host

    @staticmethod
    def _set(f: _Frozen, t: torch.Tensor) -> None:
        (f.owner._parameters if f.is_param else f.owner._buffers)[f.name] = t

    def _enter(self, i: int, module: nn.Module, args) -> None:
        for j in [j for j in self.resident if j != i]:  # a stopped recomputation left it in
            self.evict(j)
        if i in self.resident:
            return
        for f in self.frozen[i]:
            if f.master.device == self.device:
                continue  # CPU training: nothing moves
            t = f.master.detach().to(self.device, non_blocking=self.pin)
            self._set(f, nn.Parameter(t, requires_grad=False) if f.is_param else t)
        self.resident.add(i)

    def _leave(self, i: int, module: nn.Module, args, output) -> None:
        self.evict(i)

    def evict(self, i: int) -> None:
        """Block ``i``'s modules hold the CPU masters again (its device copy lives on only inside autograd)."""
        for f in self.frozen[i]:
            self._set(f, f.master)
        self.resident.discard(i)

    def evict_all(self) -> None:
        for i in list(self.resident):
            self.evict(i)

    @contextmanager
    def parked(self) -> Iterator[None]:
        """The frozen block tensors taken out of their modules, so that ``module.to(device)`` (and DDP's set-up)
        moves everything else and leaves them in CPU memory."""
        self.evict_all()
        for fs in self.frozen:
            for f in fs:
                (f.owner._parameters if f.is_param else f.owner._buffers).pop(f.name)
        try:
            yield
        finally:
            for fs in self.frozen:
                for f in fs:
                    self._set(f, f.master)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def install_block_offload(transformer: nn.Module, device: torch.device | str) -> BlockOffload:
    """:class:`BlockOffload` on every block of ``transformer`` (kept as its attribute ``ATTR``)."""
    off = BlockOffload(transformer_blocks(transformer), device)
    object.__setattr__(transformer, ATTR, off)
    return off


def evict_all(transformer: nn.Module) -> None:
    """After a training step: no block's device copy stays referenced by the modules (no-op without offload)."""
    off = getattr(transformer, ATTR, None)
    if off is not None:
        off.evict_all()
