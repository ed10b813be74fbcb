"""Images → training tensors: aspect-ratio buckets, resize + centre crop, and batched decoding on DataLoader workers.

Buckets are ``(width, height)`` pairs; without ``data.buckets`` there is one square bucket at ``data.resolution``.
An image goes to the bucket whose aspect ratio is closest in log space, is resized so it covers the bucket (shorter
relative side fits, bicubic) and centre-cropped to it. Output: ``[3, H, W]`` float32 in [−1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from apexctl.data.sources import Item, Source


def bucket_list(resolution: int, buckets: Sequence[Sequence[int]] | None) -> list[tuple[int, int]]:
    """The recipe's buckets as ``(w, h)`` tuples (one square bucket when none are given)."""
    return [(int(w), int(h)) for w, h in buckets] if buckets else [(resolution, resolution)]


def choose_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest to ``width / height`` (first one on a tie)."""
    r = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - r))


def fit_image(img, size: tuple[int, int]) -> torch.Tensor:
    """PIL RGB image → ``[3, h, w]`` in [−1, 1]: scale to cover ``size = (w, h)``, then centre crop."""
    from PIL import Image

    w, h = size
    scale = max(w / img.width, h / img.height)
    nw, nh = max(w, round(img.width * scale)), max(h, round(img.height * scale))
    if (nw, nh) != img.size:
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - w) // 2, (nh - h) // 2
    img = img.crop((left, top, left + w, top + h))
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def fit_digit(img: torch.Tensor, resolution: int) -> torch.Tensor:
    """A digits image ``[1, 8, 8]`` → RGB ``[3, r, r]`` (bilinear, exactly as the original batched prepare did)."""
    x = img.expand(3, -1, -1)
    if x.shape[-1] != resolution:
        x = F.interpolate(x[None], size=(resolution, resolution), mode="bilinear", align_corners=False)[0]
    return x


@dataclass
class Decoded:
    """One decoded item: ``image`` and ``bucket`` set, or ``reason`` why it is skipped."""

    pos: int
    image: torch.Tensor | None = None
    bucket: int = 0
    reason: str | None = None


class DecodeDataset(torch.utils.data.Dataset):
    """Map-style view over ``items`` that decodes, size-checks, buckets and fits one image per index."""

    def __init__(self, source: Source, items: Sequence[Item], prepare: Callable[[object], tuple[int, torch.Tensor]]):
        self.source, self.items, self.prepare = source, items, prepare

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, pos: int) -> Decoded:
        try:
            img = self.source.load(self.items[pos].ref)
        except Exception as e:  # PIL raises many types for unreadable data; each is one skipped, reported item
            msg = (str(e).strip().splitlines() or [""])[0][:160]
            return Decoded(pos, reason=f"unreadable image ({type(e).__name__}: {msg})")
        try:
            bucket, tensor = self.prepare(img)
        except ValueError as e:
            return Decoded(pos, reason=str(e))
        return Decoded(pos, tensor, bucket)


def image_preparer(
    buckets: list[tuple[int, int]], min_size: int, digits_resolution: int | None = None
) -> Callable[[object], tuple[int, torch.Tensor]]:
    """The per-image transform: ValueError (with the reason) for a too-small image, else ``(bucket, tensor)``."""

    def prepare(img) -> tuple[int, torch.Tensor]:
        if isinstance(img, torch.Tensor):
            return 0, fit_digit(img, digits_resolution or buckets[0][0])
        if min(img.width, img.height) < max(min_size, 1):
            raise ValueError(f"image too small ({img.width}x{img.height} < data.min_image_size {min_size})")
        b = choose_bucket(img.width, img.height, buckets)
        return b, fit_image(img, buckets[b])

    return prepare


def _as_list(batch: list) -> list:
    return batch


def decode_batches(dataset: DecodeDataset, batches: list[list[int]], num_workers: int) -> Iterator[list[Decoded]]:
    """Decode ``batches`` (lists of positions) in order, on ``num_workers`` DataLoader worker processes."""
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=_as_list,
        prefetch_factor=4 if num_workers else None,
    )
    yield from loader
