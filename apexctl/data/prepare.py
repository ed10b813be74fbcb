"""``apexctl prepare``: encode a data source once into the latent cache (data/cache.py)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from apexctl.data.cache import model_fingerprint, write_cache
from apexctl.progress import progress
from apexctl.recipe import Recipe


def cache_identity(recipe: Recipe, model_dir: str, family: str) -> dict:
    """The manifest fields a cache must match to serve ``recipe`` (checked by distill)."""
    d = recipe.data
    return {
        "source": d.source,
        "family": family,
        "model_fingerprint": model_fingerprint(model_dir),
        "data": {"resolution": d.resolution, "holdout": d.holdout, "seed": d.seed},
    }


@torch.no_grad()
def prepare(recipe: Recipe, *, quiet: bool = False, batch_size: int = 256) -> Path:
    from apexctl.data import digits
    from apexctl.models import load_for_recipe, resolve_model_path

    model_dir = resolve_model_path(recipe.model.path)
    backbone = load_for_recipe(recipe.model, model_dir)
    d = recipe.data
    split = digits.load_split(holdout=d.holdout, seed=d.seed)
    pairs = digits.training_pairs(split.train_labels, seed=d.seed)
    prompts = sorted(set(digits.all_prompts()) | {""})  # "" is the unconditional prompt (cond_dropout, CFG)
    index = {p: i for i, p in enumerate(prompts)}

    conds = []
    with progress(quiet) as bar:
        task = bar.add_task("encode prompts", total=len(prompts))
        for i in range(0, len(prompts), batch_size):
            conds.append(backbone.encode_prompts(prompts[i : i + batch_size]))
            bar.advance(task, len(prompts[i : i + batch_size]))
        from apexctl.models.base import Cond

        cond = Cond.cat(conds)
        images = split.train_images.expand(-1, 3, -1, -1)  # grey → RGB in [−1, 1]
        if images.shape[-1] != d.resolution:
            images = F.interpolate(images, size=(d.resolution, d.resolution), mode="bilinear", align_corners=False)
        lat = []
        task = bar.add_task("encode images", total=images.shape[0])
        for i in range(0, images.shape[0], batch_size):
            lat.append(backbone.encode_images(images[i : i + batch_size].to(backbone.device)).float().cpu())
            bar.advance(task, min(batch_size, images.shape[0] - i))
    latents = torch.cat(lat)
    meta = cache_identity(recipe, model_dir, backbone.family)
    return write_cache(
        d.cache_dir,
        latents=latents,
        embeds=cond.embeds.float().cpu(),
        mask=cond.mask.long().cpu(),
        pair_image=torch.tensor([i for i, _ in pairs]),
        pair_prompt=torch.tensor([index[p] for _, p in pairs]),
        prompts=prompts,
        meta=meta,
        pooled=None if cond.pooled is None else cond.pooled.float().cpu(),
    )
