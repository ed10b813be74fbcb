"""Fixed-seed sample grids during training: ``RUN/samples/step-N.png``, one row per prompt."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from apexctl.training.closures import ShadowForward

if TYPE_CHECKING:
    from apexctl.training.state import Session


def sample_rows(prompts: list[str] | None, cache) -> list[int]:
    """Cache rows of ``train.sample_prompts`` (BadInput, exit 2, for a prompt the cache lacks), else the first four
    non-empty prompts of the cache."""
    if prompts:
        return [cache.prompt_index(p) for p in prompts]
    return [i for i, p in enumerate(cache.prompts) if p][:4]


@torch.no_grad()
def sample_grid(sess: Session, step: int) -> Path | None:
    """1-step samples of the current model (the EMA when that is what gets exported), fixed seeds, as
    ``RUN/samples/step-N.png``: one row per prompt, ``train.sample_images`` seeds per row.

    Every rank runs the (tiny) forward on the unwrapped module, with no collective; rank 0 decodes and saves.
    The noise comes from per-image generators, so the training RNG streams are untouched.
    """
    from apexctl.engine.sampler import one_step
    from apexctl.images import save_grid
    from apexctl.inference import seeded_noise

    tr, cache, bb = sess.recipe.train, sess.cache, sess.backbone
    k = tr.sample_images
    rows = [r for r in sess.sample_rows for _ in range(k)]
    seeds = [sess.recipe.sample.seed + j for _ in sess.sample_rows for j in range(k)]
    dtype = bb.compute_dtype
    z = seeded_noise(tuple(cache.latents.shape[1:]), seeds).to(sess.acc.device, dtype)
    cond = cache.cond(torch.tensor(rows)).to(sess.acc.device, dtype)
    use_ema = sess.ema is not None and tr.export != "live"
    module = ShadowForward(sess.transformer, sess.ema.shadow_dict()) if use_ema else sess.transformer
    was_training = sess.transformer.training
    sess.transformer.eval()
    bb.set_forward_module(module)
    try:
        with sess.acc.autocast():
            lat = one_step(bb, z, cond)
    finally:
        bb.set_forward_module(sess.wrapped)
        sess.transformer.train(was_training)
    if not sess.main:
        return None
    images = bb.decode_latents(lat).float().cpu()
    upscale = max(1, 64 // max(images.shape[-1], 1))
    labels = [cache.prompts[r] for r in sess.sample_rows]
    return save_grid(images, sess.run / "samples" / f"step-{step:06d}.png", nrow=k, upscale=upscale, labels=labels)
