"""Prompts → latents → images with a Backbone and the engine's samplers, one generator per image.

Image i's generator is ``torch.Generator("cpu").manual_seed(seeds[i])``: its first draw is the initial noise
(``seeded_noise``), its later draws the few-step sampler's re-noising. So image i depends only on (model,
prompt i, seeds[i], settings), never on the batch it is drawn in, the batch size or the other prompts. For
classifier-free guidance the negative prompt is encoded once and broadcast to the batch (``Cond.expand``: every
field, ``pooled`` included).
"""

from __future__ import annotations

import torch

from apexctl.engine import sampler
from apexctl.engine.sampler import Method, Renoise
from apexctl.models.base import Backbone, Cond


def image_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image (CPU: the same numbers on every device the images are then drawn on)."""
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


def seeded_noise(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """One N(0, I) draw per seed (the first draw of its generator): image i's noise depends only on seeds[i]."""
    return sampler.randn_tensor((len(seeds), *shape), image_generators(seeds), "cpu", torch.float32)


def _dtype(backbone: Backbone) -> torch.dtype:
    return backbone.compute_dtype


@torch.no_grad()
def generate_latents(
    backbone: Backbone,
    cond: Cond,
    seeds: list[int],
    *,
    height: int,
    width: int,
    steps: int,
    method: Method,
    guidance: float = 1.0,
    uncond: Cond | None = None,
    renoise: Renoise = "stochastic",
    grid_power: float = 1.0,
    batch: int = 64,
    quiet: bool = True,
    label: str = "sample",
) -> torch.Tensor:
    """Latents ``[N, C, h, w]`` (float32, CPU) for ``cond`` rows, one per seed, in batches of ``batch``.

    ``method`` is explicit (``one | few | euler``: resolve ``auto`` with ``resolve_sample_settings``); ``uncond``
    is one row (the negative prompt), broadcast to each batch for guidance.
    """
    from apexctl.progress import progress

    if len(cond) != len(seeds):
        raise ValueError(f"{len(cond)} condition rows for {len(seeds)} seeds")
    shape = backbone.latent_shape(height, width)
    dev, dtype = backbone.device, _dtype(backbone)
    u_all = uncond.to(dev, dtype) if uncond is not None else None
    out = []
    with progress(quiet) as bar:
        task = bar.add_task(label, total=len(seeds))
        for i in range(0, len(seeds), batch):
            gens = image_generators(seeds[i : i + batch])
            z = sampler.randn_tensor((len(gens), *shape), gens, dev, dtype)
            c = cond[i : i + batch].to(dev, dtype)
            u = u_all.expand(len(c)) if u_all is not None else None
            lat = sampler.generate(
                backbone,
                z,
                c,
                steps,
                method=method,
                uncond=u,
                guidance_scale=guidance,
                renoise=renoise,
                generator=gens,
                grid_power=grid_power,
            )
            out.append(lat.float().cpu())
            bar.advance(task, len(c))
    return torch.cat(out)


@torch.no_grad()
def prompt_latents(
    backbone: Backbone, prompts: list[str], seeds: list[int], *, negative_prompt: str = "", **kw
) -> torch.Tensor:
    """Latents (float32, CPU) for ``prompts[i]`` with ``seeds[i]`` (each prompt encoded once; the negative prompt
    when ``guidance`` > 1); ``kw`` as :func:`generate_latents`."""
    unique = sorted(set(prompts))
    enc = backbone.encode_prompts(unique)
    cond = enc[torch.tensor([unique.index(p) for p in prompts])]
    uncond = backbone.encode_prompts([negative_prompt]) if kw.get("guidance", 1.0) > 1.0 else None
    return generate_latents(backbone, cond, seeds, uncond=uncond, **kw)


@torch.no_grad()
def decode_latents(backbone: Backbone, lat: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in [−1, 1] (float32, CPU) of ``lat``, decoded ``batch`` at a time."""
    dtype = _dtype(backbone)
    images = [
        backbone.decode_latents(lat[i : i + batch].to(backbone.device, dtype)).float().cpu()
        for i in range(0, lat.shape[0], batch)
    ]
    return torch.cat(images)


def generate_images(
    backbone: Backbone, prompts: list[str], seeds: list[int], *, negative_prompt: str = "", **kw
) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in [−1, 1] (float32, CPU) for ``prompts[i]`` with ``seeds[i]``; ``kw`` as
    :func:`generate_latents` (e.g. ``**SampleSettings.sampler_kwargs()``)."""
    lat = prompt_latents(backbone, prompts, seeds, negative_prompt=negative_prompt, **kw)
    return decode_latents(backbone, lat, kw.get("batch", 64))
