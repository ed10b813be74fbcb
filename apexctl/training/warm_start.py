"""The regression warm start (``method.warm_start_steps``): the teacher's (noise, sample) pairs of a synthesised cache.

``prepare`` with ``data.synthesize`` records the seed of every image it draws; image k's starting noise is the first
draw of ``torch.Generator().manual_seed(seed_k)`` (:func:`apexctl.inference.generate.seeded_noise`), so the pair
(z_k, x_k) is rebuilt exactly, with no noise stored. The pairs are read in their own resumable order (a second
``PairSampler``, checkpointed), never with classifier-free dropout: x_k is the teacher's sample for its own prompt.
The session opens the cache and its sampler (it alone imports the data package); this module checks and reads them.
"""

from __future__ import annotations

from typing import Any

import torch

from apexctl.engine.cond import Cond
from apexctl.errors import BadInput
from apexctl.inference.generate import seeded_noise


class WarmStartPairs:
    """(x, z, c) batches of teacher pairs from ``cache`` (a ``LatentCache``) in ``sampler``'s order (a checkpointed
    ``PairSampler`` over its pairs)."""

    def __init__(self, cache: Any, sampler: Any, train_shape: tuple[int, ...], key: str) -> None:
        if not cache.has_seeds:
            raise BadInput(
                f"{key}: the cache {cache.root} has no recorded synthesis seeds, so the teacher's noise cannot be "
                "rebuilt; point method.warm_start_cache at a cache prepared with data.source: prompts and "
                "data.synthesize"
            )
        if tuple(cache.latent_shape) != tuple(train_shape):
            raise BadInput(
                f"{key}: the cache {cache.root} has latents {list(cache.latent_shape)}, the training cache "
                f"{list(train_shape)}; prepare it with the training recipe's model and resolution"
            )
        self.cache, self.sampler = cache, sampler

    def batch(self, n: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor, Cond]:
        """This rank's rows ``rank::world`` of the next ``n·world`` pairs: data x, its noise z, its condition."""
        idx, _ = self.sampler.next(n * world)
        idx = idx[rank::world]
        x, cond = self.cache.batch(idx)
        z = seeded_noise(tuple(x.shape[1:]), self.cache.pair_seeds(idx).tolist())
        return x, z, cond
