"""``Cond``: encoded prompts as one batch-indexable record (docs/design.md §4).

Every field is a tensor whose first dimension is the batch, so the engine can slice, repeat, broadcast and
concatenate real, shifted and unconditional rows into one forward pass without knowing which fields a family has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch


@dataclass
class Cond:
    """Encoded prompts. ``embeds [B, L, D]``, ``mask [B, L]`` (1 = token, 0 = padding), optional ``pooled [B, P]``.

    Indexable and concatenable along the batch, so the engine can mix real, fake and unconditional rows in one
    forward pass.
    """

    embeds: torch.Tensor
    mask: torch.Tensor | None = None
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def __getitem__(self, idx) -> Cond:
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return Cond(
            **{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[idx]) for f in fields(self)}
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Cond:
        """Move to ``device``; cast floating tensors (not the mask) to ``dtype``."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                v = v.to(
                    device=device,
                    dtype=dtype if (dtype is not None and v.is_floating_point() and f.name != "mask") else None,
                )
            out[f.name] = v
        return Cond(**out)

    @staticmethod
    def cat(conds: Sequence[Cond]) -> Cond:
        """Concatenate along the batch, right-padding token dimensions to the longest (mask 0 on padding)."""
        L = max(c.embeds.shape[1] for c in conds)
        embeds, masks = [], []
        for c in conds:
            b, length, d = c.embeds.shape
            mask = c.mask if c.mask is not None else torch.ones(b, length, dtype=torch.long, device=c.embeds.device)
            pad = L - length
            embeds.append(torch.cat([c.embeds, c.embeds.new_zeros(b, pad, d)], 1) if pad else c.embeds)
            masks.append(torch.cat([mask, mask.new_zeros(b, pad)], 1) if pad else mask)
        pooled = None
        if all(c.pooled is not None for c in conds):
            pooled = torch.cat([c.pooled for c in conds])
        elif any(c.pooled is not None for c in conds):
            raise ValueError("cannot concatenate Cond rows with and without pooled embeddings")
        return Cond(torch.cat(embeds), torch.cat(masks), pooled)

    def with_embeds(self, embeds: torch.Tensor) -> Cond:
        return replace(self, embeds=embeds)

    def expand(self, n: int) -> Cond:
        """A one-row Cond broadcast to ``n`` rows, every field (views, no copy); an ``n``-row Cond is returned as is."""
        if len(self) == n:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot expand a Cond of {len(self)} rows to {n}")
        return Cond(
            **{
                f.name: (None if (v := getattr(self, f.name)) is None else v.expand(n, *v.shape[1:]))
                for f in fields(self)
            }
        )
