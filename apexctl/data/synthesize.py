"""Teacher synthesis for prompt-only data (``data.synthesize``): the recipe's model draws each image itself.

Image k of prompt i is the teacher's multi-step Euler sample (``synthesize.steps``, CFG ``synthesize.guidance``
against ``negative_prompt``) from ``seeded_noise`` with seed ``synthesize.seed + images_per_prompt·i + k`` — the same
call ``apexctl sample --steps S --guidance G --seed …`` makes, so a cached image can be reproduced from its recorded
seed. The latents go into the cache as they come out of the sampler (no decode/encode round trip).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from apexctl.atomic import atomic_dir
from apexctl.models.base import Backbone
from apexctl.recipe import Recipe, SynthesizeSpec


def load_teacher(recipe: Recipe, model_dir: str | Path, device: torch.device | str) -> Backbone:
    """The recipe's model as ``prepare`` uses it: loaded in host memory, its text encoders and codec on ``device``
    (the prompt shards and image encoding need only those, so a GPU that only encodes never holds the denoiser:
    Qwen-Image's transformer is 40.9 GB in bf16, its text encoder 16.6 GB); :func:`teacher_to_device` brings the
    denoiser when the teacher draws. ``data.synthesize.quantize``'s library is checked before anything loads."""
    from apexctl.models import load_for_recipe
    from apexctl.models.quantize import require

    if recipe.data.synthesize is not None:
        require(recipe.data.synthesize.quantize, "data.synthesize.quantize")
    backbone = load_for_recipe(recipe.model, model_dir)
    for module in backbone.frozen_components():
        module.to(device)
    return backbone


def teacher_to_device(backbone: Backbone, spec: SynthesizeSpec, device: torch.device | str) -> None:
    """Before the teacher draws (the prompt shards are written): the text encoders back to host memory when
    ``spec.offload_text_encoder``, then the transformer blocks quantised on ``device`` by ``spec.quantize`` (layer
    by layer: the bf16 blocks never need to fit there together) and the denoiser moved there."""
    from apexctl.models.quantize import quantize_backbone

    if spec.offload_text_encoder:
        codec = getattr(backbone, "codec", None)
        for module in backbone.frozen_components():
            if module is not codec:
                module.to("cpu")
    quantize_backbone(backbone, spec.quantize, key="data.synthesize.quantize", device=device)
    backbone.transformer.to(device)


@torch.no_grad()
def synthesize_latents(
    backbone: Backbone, prompts: Sequence[str], seeds: Sequence[int], spec: SynthesizeSpec, height: int, width: int
) -> torch.Tensor:
    """Teacher latents ``[N, C, h, w]`` (float32) for ``prompts[i]`` with ``seeds[i]``, in batches of ``spec.batch``."""
    from apexctl.inference.generate import prompt_latents

    return prompt_latents(
        backbone,
        list(prompts),
        [int(s) for s in seeds],
        negative_prompt=spec.negative_prompt,
        height=height,
        width=width,
        steps=spec.steps,
        method="euler",
        guidance=spec.guidance,
        batch=spec.batch,
    )


@torch.no_grad()
def export_image_folder(cache_root: Path, backbone: Backbone, out_dir: str | Path, batch: int = 16) -> Path:
    """Decode every cached image into ``out_dir`` as PNGs + ``metadata.jsonl`` (``file_name``, ``text``, ``seed``),
    written atomically (the folder appears complete or not at all). The result is a valid ``folder`` source."""
    from PIL import Image

    from apexctl.data.cache import LatentCache
    from apexctl.images import to_uint8

    cache = LatentCache.open(cache_root, verify="none")
    prompts = cache.prompts
    dtype = backbone.compute_dtype
    rows = []
    with atomic_dir(Path(out_dir)) as tmp:
        for shard in cache.image_shards():
            text_of: dict[tuple[int, int], str] = {}
            pb, pr, pp = shard["pair_bucket"].tolist(), shard["pair_row"].tolist(), shard["pair_prompt"].tolist()
            for b, r, p in zip(pb, pr, pp, strict=True):
                text_of.setdefault((b, r), prompts[p])
            buckets = sorted({int(k.split(".")[1]) for k in shard.tensors if k.startswith("latents.")})
            for b in buckets:
                lat, index = shard[f"latents.{b}"], shard[f"index.{b}"].tolist()
                seeds = shard[f"seed.{b}"].tolist() if f"seed.{b}" in shard else [None] * len(index)
                for i in range(0, lat.shape[0], batch):
                    images = backbone.decode_latents(lat[i : i + batch].to(backbone.device, dtype)).float().cpu()
                    for j, u8 in enumerate(to_uint8(images)):
                        row = i + j
                        name = f"{index[row]:06d}.png"
                        Image.fromarray(u8).save(tmp / name)
                        rec = {"file_name": name, "text": text_of[(b, row)]}
                        if seeds[row] is not None:
                            rec["seed"] = int(seeds[row])
                        rows.append((index[row], rec))
        rows.sort(key=lambda r: r[0])
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for _, r in rows))
    return Path(out_dir)
