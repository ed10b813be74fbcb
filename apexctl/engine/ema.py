"""Exponential moving average of trained parameters: ``θ̄ ← d·θ̄ + (1−d)·θ``.

The shadow weights live beside the model (fp32), or on ``device`` (``hardware.ema_on_cpu``: the CPU; each update
copies the live weights there, and a reference forward copies the shadows back). ``shadow_dict()`` gives them by
parameter name for a forward pass through ``torch.func.functional_call`` (the ``ema`` reference of the ``apex``
objective, ``training/closures.py``'s ``ShadowForward``: nothing is modified in place, so the autograd graph of the
live weights stays valid); ``swapped()`` copies them into the model (exports). No second copy of the network is
ever built.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    """``decay`` is the target d; with ``warmup`` each update uses the current dₖ, which starts at 0 and ramps
    ``dₖ₊₁ = dₖ + (1 − dₖ)(d − dₖ)/2`` (the released code's ramp: the shadow follows the live weights at first)."""

    def __init__(
        self,
        named_params: list[tuple[str, nn.Parameter]],
        decay: float,
        warmup: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        """``device``: where the shadows live; None = beside each parameter."""
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.decay = decay
        self.current = 0.0 if warmup else decay
        self.device = torch.device(device) if device is not None else None
        self.shadow = [p.detach().to(self._home(p), torch.float32, copy=True) for p in self.params]

    def _home(self, p: torch.Tensor) -> torch.device:
        return self.device if self.device is not None else p.device

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params, strict=True):
            # the same fp32 lerp wherever the shadow lives (a CPU shadow: the live weight copied over first)
            s.lerp_(p.detach().to(s.device, torch.float32), 1.0 - self.current)
        if self.current != self.decay:
            self.current += (1.0 - self.current) * (self.decay - self.current) * 0.5

    def shadow_dict(self) -> dict[str, torch.Tensor]:
        """name → shadow tensor in the live parameter's dtype, on its device (for ``torch.func.functional_call``)."""
        return {n: s.to(p.device, p.dtype) for n, s, p in zip(self.names, self.shadow, self.params, strict=True)}

    @contextmanager
    def swapped(self) -> Iterator[None]:
        live = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params, strict=True):
                p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for v, p in zip(live, self.params, strict=True):
                    p.copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "current": self.current, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError("EMA state does not match the trained parameters")
        self.decay = float(state["decay"])
        self.current = float(state.get("current", self.decay))  # older checkpoints: no warm-up
        self.shadow = [s.to(self._home(p)).float() for s, p in zip(state["shadow"], self.params, strict=True)]
