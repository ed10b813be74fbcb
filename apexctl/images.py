"""Image conversion and saving: tensors in [−1, 1] → uint8 arrays, PNG files and labelled grids.

Mapping: ``u8 = round((clamp(x, −1, 1) + 1) / 2 · 255)``, so −1 → 0 (black) and +1 → 255 (white); one channel is
repeated to RGB. Upscaling is nearest-neighbour (each pixel becomes an ``upscale × upscale`` block) so 8×8 digits
stay crisp. Every file is written atomically (temp file in the same folder, fsync, ``os.replace``; docs/design.md §3).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from apexctl.atomic import write_bytes

PAD = 2  # output pixels between cells and around the grid
BACKGROUND = (96, 96, 96)  # mid grey: separates white-on-black digit cells
LABEL_COLOR = (255, 255, 255)
MARK_COLORS = {True: (0, 200, 0), False: (220, 0, 0)}

ImageLike = torch.Tensor | np.ndarray


def to_uint8(images: ImageLike) -> np.ndarray:
    """``[B, 1|3, H, W]`` (or one ``[1|3, H, W]``) in [−1, 1] → uint8 ``[B, H, W, 3]``; values outside are clamped."""
    x = images.detach().to("cpu", torch.float32).numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    x = x.astype(np.float32, copy=False)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images [B, 1|3, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    u8 = np.rint((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return np.ascontiguousarray(u8.transpose(0, 2, 3, 1))


def load_image(path: str | os.PathLike[str]) -> torch.Tensor:
    """A PNG written by ``save_png`` back as ``[3, H, W]`` in [−1, 1] (``to_uint8`` of it gives the file's pixels)."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def _upscale(arr: np.ndarray, upscale: int) -> np.ndarray:
    """Nearest-neighbour upscale of ``[H, W, 3]`` by an integer factor."""
    if upscale < 1:
        raise ValueError(f"upscale must be >= 1, got {upscale}")
    return arr if upscale == 1 else np.repeat(np.repeat(arr, upscale, axis=0), upscale, axis=1)


def _save_atomic(image: Image.Image, path: str | os.PathLike[str]) -> Path:
    """Write ``image`` as PNG to ``path`` atomically (parent folders are created)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_bytes(path, buf.getvalue())
    return Path(path)


def save_png(image: ImageLike, path: str | os.PathLike[str], upscale: int = 1) -> Path:
    """Save one image (``[1|3, H, W]`` or ``[1, 1|3, H, W]`` in [−1, 1]) as an ``(H·upscale) × (W·upscale)`` PNG."""
    arr = to_uint8(image)
    if arr.shape[0] != 1:
        raise ValueError(f"save_png takes one image, got a batch of {arr.shape[0]}; use save_grid")
    return _save_atomic(Image.fromarray(_upscale(arr[0], upscale)), path)


def make_grid(
    images: ImageLike,
    nrow: int,
    upscale: int = 1,
    labels: Sequence[str] | None = None,
    marks: Sequence[bool | None] | None = None,
    mark_style: str = "square",
) -> Image.Image:
    """Tile ``images`` ``[B, 1|3, H, W]`` (in [−1, 1]) into rows of ``nrow`` cells; returns an RGB PIL image.

    Cells are ``(H·upscale) × (W·upscale)`` with ``PAD`` pixels between and around them. ``labels`` (one per row,
    ``ceil(B / nrow)`` of them) are drawn with PIL's default font in a left margin as wide as the widest label plus
    ``2·PAD``; a row is as tall as the larger of a cell and the text. ``marks`` (one per image): True draws a green,
    False a red square in the cell's top-right corner, None nothing; ``mark_style="glyph"`` draws a green ✓ / red ✗
    (lines, no font needed) on a dark patch instead. Without labels the size is exactly
    ``W_out = nrow·cw + (nrow+1)·PAD``, ``H_out = rows·ch + (rows+1)·PAD``.
    """
    arr = to_uint8(images)
    b, h, w, _ = arr.shape
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    rows = max(1, math.ceil(b / nrow))
    if labels is not None and len(labels) != rows:
        raise ValueError(f"labels: expected one per row ({rows}), got {len(labels)}")
    if marks is not None and len(marks) != b:
        raise ValueError(f"marks: expected one per image ({b}), got {len(marks)}")
    cw, ch = w * upscale, h * upscale

    font = ImageFont.load_default()
    margin, row_h = 0, ch
    if labels:
        boxes = [font.getbbox(text) for text in labels]
        margin = max(x1 for _, _, x1, _ in boxes) + 2 * PAD
        row_h = max(ch, max(y1 for _, _, _, y1 in boxes))

    canvas = Image.new("RGB", (margin + nrow * cw + (nrow + 1) * PAD, rows * row_h + (rows + 1) * PAD), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    mark_size = max(2, cw // 6)
    for i in range(b):
        r, c = divmod(i, nrow)
        x0 = margin + PAD + c * (cw + PAD)
        y0 = PAD + r * (row_h + PAD) + (row_h - ch) // 2  # centre cells vertically when text is taller
        canvas.paste(Image.fromarray(_upscale(arr[i], upscale)), (x0, y0))
        if marks is not None and marks[i] is not None:
            x1 = x0 + cw - 1
            box = (x1 - mark_size + 1, y0, x1, y0 + mark_size - 1)
            if mark_style == "glyph":
                _draw_glyph(draw, box, bool(marks[i]))
            else:
                draw.rectangle(box, fill=MARK_COLORS[bool(marks[i])])
    for r, text in enumerate(labels or []):
        _, top, _, bottom = font.getbbox(text)
        draw.text((PAD, PAD + r * (row_h + PAD) + (row_h - bottom - top) // 2), text, fill=LABEL_COLOR, font=font)
    return canvas


def _draw_glyph(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], ok: bool) -> None:
    """A ✓ (ok) or ✗ drawn with lines inside ``box`` on a dark patch, so it reads on any image."""
    x0, y0, x1, y1 = box
    s = x1 - x0
    width = max(1, s // 6)
    draw.rectangle(box, fill=(0, 0, 0))
    m = max(1, s // 6)  # inner margin
    if ok:
        pts = [(x0 + m, y0 + s // 2), (x0 + s * 2 // 5, y1 - m), (x1 - m, y0 + m)]
        draw.line(pts, fill=MARK_COLORS[True], width=width)
    else:
        draw.line([(x0 + m, y0 + m), (x1 - m, y1 - m)], fill=MARK_COLORS[False], width=width)
        draw.line([(x0 + m, y1 - m), (x1 - m, y0 + m)], fill=MARK_COLORS[False], width=width)


def save_grid(
    images: ImageLike,
    path: str | os.PathLike[str],
    nrow: int,
    upscale: int = 1,
    labels: Sequence[str] | None = None,
    marks: Sequence[bool | None] | None = None,
    mark_style: str = "square",
) -> Path:
    """``make_grid(...)`` saved atomically as PNG at ``path``; returns the path."""
    return _save_atomic(
        make_grid(images, nrow, upscale=upscale, labels=labels, marks=marks, mark_style=mark_style), path
    )
