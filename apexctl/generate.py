"""Prompts → images with a Backbone and the engine's samplers; one seed per image, independent of batching."""

from __future__ import annotations

import torch

from apexctl.engine import sampler
from apexctl.models.base import Backbone, Cond


def seeded_noise(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """One N(0, I) draw per seed: image i's noise depends only on seeds[i]."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def generate_latents(
    backbone: Backbone,
    cond: Cond,
    seeds: list[int],
    *,
    height: int,
    width: int,
    steps: int,
    method: str = "auto",
    guidance: float = 1.0,
    uncond: Cond | None = None,
    renoise: str = "stochastic",
    batch: int = 64,
    quiet: bool = True,
    label: str = "sample",
) -> torch.Tensor:
    """Latents for ``cond`` rows (one per seed). ``uncond`` is one row (broadcast) for guidance."""
    from apexctl.progress import progress

    shape = backbone.latent_shape(height, width)
    dev = backbone.device
    dtype = next(backbone.transformer.parameters()).dtype
    u_all = uncond.to(dev, dtype) if uncond is not None else None
    out = []
    with progress(quiet) as bar:
        task = bar.add_task(label, total=len(seeds))
        for i in range(0, len(seeds), batch):
            sl = slice(i, i + batch)
            z = seeded_noise(shape, seeds[sl]).to(dev, dtype)
            c = cond[sl].to(dev, dtype)
            u = None
            if u_all is not None:  # one unconditional row, broadcast to the batch
                mask = None if u_all.mask is None else u_all.mask.expand(len(c), -1)
                u = Cond(u_all.embeds.expand(len(c), -1, -1), mask, u_all.pooled)
            # few-step re-noising draws from its own generator, seeded by the batch's first image
            gen = torch.Generator(device="cpu").manual_seed(int(seeds[i]) + 7919)
            lat = sampler.generate(
                backbone, z, c, steps, method=method, uncond=u, guidance_scale=guidance, renoise=renoise, generator=gen
            )
            out.append(lat.float().cpu())
            bar.advance(task, len(c))
    return torch.cat(out)


@torch.no_grad()
def generate_images(backbone: Backbone, prompts: list[str], seeds: list[int], **kw) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in [−1, 1] for ``prompts[i]`` with ``seeds[i]``."""
    guidance = kw.get("guidance", 1.0)
    negative = kw.pop("negative_prompt", "")
    unique = sorted(set(prompts))
    enc = backbone.encode_prompts(unique)
    rows = torch.tensor([unique.index(p) for p in prompts])
    cond = enc[rows]
    uncond = backbone.encode_prompts([negative]) if guidance > 1.0 else None
    lat = generate_latents(backbone, cond, seeds, uncond=uncond, **kw)
    dtype = next(backbone.transformer.parameters()).dtype
    images = []
    for i in range(0, lat.shape[0], kw.get("batch", 64)):
        images.append(
            backbone.decode_latents(lat[i : i + kw.get("batch", 64)].to(backbone.device, dtype)).float().cpu()
        )
    return torch.cat(images)
