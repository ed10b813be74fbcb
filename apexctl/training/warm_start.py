"""The regression warm start (``method.warm_start_steps``): the teacher's (noise, sample) pairs of a synthesised cache.

``prepare`` with ``data.synthesize`` records the seed of every image it draws; image k's starting noise is the first
draw of ``torch.Generator().manual_seed(seed_k)`` (:func:`apexctl.inference.generate.seeded_noise`), so the pair
(z_k, x_k) is rebuilt exactly, with no noise stored. The pairs are read in their own resumable order (a second
:class:`~apexctl.data.cache.PairSampler`, checkpointed), never with classifier-free dropout: x_k is the teacher's
sample for its own prompt.
"""

from __future__ import annotations

from pathlib import Path

import torch

from apexctl.data.cache import MANIFEST, LatentCache, PairSampler
from apexctl.engine.cond import Cond
from apexctl.errors import BadInput
from apexctl.inference.generate import seeded_noise


class WarmStartPairs:
    """(x, z, c) batches of teacher pairs from ``cache``; ``sampler`` is its checkpointed data order."""

    def __init__(self, cache: LatentCache, seed: int) -> None:
        self.cache = cache
        self.sampler = PairSampler(len(cache), seed=seed, buckets=cache.pair_buckets)

    @classmethod
    def open(cls, root: str | Path, train_cache: LatentCache, identity: dict, seed: int, key: str) -> WarmStartPairs:
        """The pair cache at ``root``, checked: the model that encoded it (``identity``: family and fingerprint, as
        in the training cache's manifest), recorded seeds, and the training cache's latent shape."""
        if Path(root).resolve() == train_cache.root.resolve():
            cache = train_cache
        elif not (Path(root) / MANIFEST).is_file():
            raise BadInput(f"{key}: {root} is not a prepared cache (no {MANIFEST}); run `apexctl prepare` for it")
        else:
            cache = LatentCache.open(root)
            cache.check(identity)
        if not cache.has_seeds:
            raise BadInput(
                f"{key}: the cache {cache.root} has no recorded synthesis seeds, so the teacher's noise cannot be "
                "rebuilt; point method.warm_start_cache at a cache prepared with data.source: prompts and "
                "data.synthesize"
            )
        if cache.latent_shape != train_cache.latent_shape:
            raise BadInput(
                f"{key}: the cache {cache.root} has latents {list(cache.latent_shape)}, the training cache "
                f"{list(train_cache.latent_shape)}; prepare it with the training recipe's model and resolution"
            )
        return cls(cache, seed)

    def batch(self, n: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor, Cond]:
        """This rank's rows ``rank::world`` of the next ``n·world`` pairs: data x, its noise z, its condition."""
        idx, _ = self.sampler.next(n * world)
        idx = idx[rank::world]
        x, cond = self.cache.batch(idx)
        z = seeded_noise(tuple(x.shape[1:]), self.cache.pair_seeds(idx).tolist())
        return x, z, cond
