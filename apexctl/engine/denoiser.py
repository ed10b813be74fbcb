"""The narrow contract the engine needs from a model (docs/design.md §4): a velocity field, where its condition enters, how
its pipeline combines guidance, and its native sampling schedule. ``models.base.Backbone`` implements it; the
engine's tests use a few-line double.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from apexctl.engine.cond import Cond


@runtime_checkable
class Denoiser(Protocol):
    """F in our convention: ``t ∈ [0, 1]``, ``t = 1`` noise, ``x_t = t·z + (1−t)·x``, ``F ≈ z − x``."""

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """``x_t [B, C, h, w]``, ``t [B]`` → ``v [B, C, h, w]``."""
        ...

    def condition_site(self) -> nn.Module:
        """The module whose output is the text condition the shift edits (a forward hook goes there)."""
        ...

    def guidance_combine(self, v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """Classifier-free guidance as the family's stock pipeline combines the two velocities."""
        ...

    def teacher_sigmas(self, num_steps: int, latent_shape: tuple[int, int, int]) -> torch.Tensor:
        """``num_steps + 1`` times from 1 down to 0: the family's native Euler schedule."""
        ...
