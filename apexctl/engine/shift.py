"""ConditionShift (paper Eq. 9): ``c_fake = A·c + b`` on the rows a mask marks as fake.

Applied by a forward hook on the family's condition site (the DiT's text projection) so the architecture is
untouched: the same code serves full tuning, LoRA and sharded models. ``site = "embeddings"`` shifts the text
encoder output before the DiT instead (a forward *pre*-hook on the same module's input would change the
normalisation in front of it, so we transform ``Cond.embeds`` directly).

``mode = "scalar"``: A = a·I, b = b·1.  ``mode = "diag"``: A = diag(a), b a vector (size of the site's features).
With ``learnable = True``, a and b are parameters (trained with their own LR scale and saved with the run).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn


class ConditionShift(nn.Module):
    def __init__(
        self,
        a: float = -1.0,
        b: float = 0.0,
        mode: Literal["scalar", "diag"] = "scalar",
        learnable: bool = False,
        site: Literal["projection", "embeddings"] = "projection",
        dim: int | None = None,
    ) -> None:
        super().__init__()
        if mode == "diag" and dim is None:
            raise ValueError("a diag shift needs the feature size of its site (dim)")
        shape = (dim,) if mode == "diag" else ()
        a_t = torch.full(shape, float(a))
        b_t = torch.full(shape, float(b))
        if learnable:
            self.a = nn.Parameter(a_t)
            self.b = nn.Parameter(b_t)
        else:
            self.register_buffer("a", a_t)
            self.register_buffer("b", b_t)
        self.mode, self.site, self.learnable = mode, site, learnable

    def transform(self, h: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """Rows ``fake [B] bool`` of ``h [B, …, D]`` become ``a·h + b``; the other rows are returned unchanged."""
        if not bool(fake.any()):
            return h
        shifted = self.a.to(h.dtype) * h + self.b.to(h.dtype)
        m = fake.to(h.device).reshape(-1, *([1] * (h.dim() - 1)))
        return torch.where(m, shifted, h)

    @contextmanager
    def applied(self, site_module: nn.Module, fake: torch.Tensor | None) -> Iterator[None]:
        """Within the block, ``site_module``'s output is shifted on the ``fake`` rows; the hook is always removed."""
        if fake is None or self.site != "projection" or not bool(fake.any()):
            yield
            return

        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            if output.shape[0] != fake.shape[0]:
                raise RuntimeError(f"shift mask has {fake.shape[0]} rows but the condition site saw {output.shape[0]}")
            return self.transform(output, fake)

        handle = site_module.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def extra_repr(self) -> str:
        return f"mode={self.mode}, site={self.site}, learnable={self.learnable}"
