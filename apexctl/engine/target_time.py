"""A target-time input for a stock denoiser that folds away at export (docs/design.md §5.6).

The released code adds ``temb₂(tt)·(t − tt)`` to the time embedding, which is zero when tt = t: its stock path is
the instantaneous velocity and the one-step map needs the extra embedder at inference. We put the extra term on
the other side::

    temb ← temb + e(tt),   e(tt) = tt · MLP(sinusoid(1000·tt)),   MLP's last layer zero-initialised

so e(0) = 0 exactly: the stock module *is* the model at tt = 0, the average velocity to the data, which is how
the one- and few-step samplers call it (F(x_τ, τ, c) with tt = 0). The export writes the stock module alone and
loads in stock diffusers; the embedder (trained, checkpointed) is needed only by training, where rows with
tt > 0 (instantaneous velocities, jumps to tt) go through it. At initialisation e ≡ 0: the model is the teacher.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def sinusoid(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """``[B] → [B, dim]``: cos/sin of ``scale·t`` at geometrically spaced frequencies (period 2π … 2π·10⁴)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    arg = scale * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)


class TargetTimeEmbedding(nn.Module):
    """``e(tt) = tt · W₂ SiLU(W₁ sinusoid(1000·tt) + b₁)`` (+ b₂·tt), ``[B] → [B, dim]``; W₂, b₂ start at 0."""

    def __init__(self, dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = nn.Linear(freq_dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, tt: torch.Tensor) -> torch.Tensor:
        h = self.fc2(nn.functional.silu(self.fc1(sinusoid(tt, self.freq_dim).to(self.fc1.weight.dtype))))
        return tt.to(h.dtype)[:, None] * h

    @contextmanager
    def applied(self, site: nn.Module, tt: torch.Tensor) -> Iterator[None]:
        """Within the block, ``e(tt)`` is added to ``site``'s output (the time embedding ``[B, dim]``, or the first
        element of a tuple that starts with it); the hook is always removed."""

        def hook(_module: nn.Module, _inputs: tuple, output):
            first = output[0] if isinstance(output, tuple) else output
            if first.shape[0] != tt.shape[0]:
                raise RuntimeError(f"target time has {tt.shape[0]} rows but the time embedding has {first.shape[0]}")
            added = first + self(tt.to(first.device)).to(first.dtype)
            return (added, *output[1:]) if isinstance(output, tuple) else added

        handle = site.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()
