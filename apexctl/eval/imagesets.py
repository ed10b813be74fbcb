"""Prompt lists and image folders for FID / CLIP score: read prompts, list and load images, pair images with prompts.

Prompt files (``--prompts``): ``.txt`` (one prompt per line), ``.jsonl`` (per line a string or an object with
``prompt``, ``caption`` or ``text``), or ``.json`` (a list of those, or MJHQ-30K's ``meta_data.json``: an object
``{id: {"prompt": ..., "category": ...}}``). Blank prompts are skipped.

Image folders are read recursively (MJHQ keeps one sub-folder per category) in sorted path order. The prompt of
each image comes from ``samples.jsonl`` (written by apexctl's generation: ``{"file", "prompt", "seed"}``) or from a
Hugging Face imagefolder ``metadata.jsonl`` (``{"file_name", "text" | "prompt" | "caption"}``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from apexctl.errors import BadInput, read_text

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PROMPT_KEYS = ("prompt", "caption", "text")


def _prompt_of(item: object, where: str) -> str:
    if isinstance(item, str):
        return item.strip()
    if isinstance(item, dict):
        for key in PROMPT_KEYS:
            if isinstance(item.get(key), str):
                return item[key].strip()
    raise BadInput(f"{where}: expected a string or an object with one of {list(PROMPT_KEYS)}")


def _jsonl(text: str, where: str) -> Iterator[tuple[str, object]]:
    """(``where:line``, parsed object) for every non-blank line; a line that is not JSON is an error."""
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{where}:{n}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInput(f"{where}:{n}: not JSON ({exc.msg})") from None


def read_prompts(path: Path, limit: int | None = None) -> list[str]:
    """The prompts in ``path`` (see the module docstring), at most ``limit`` of them, in file order."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"--prompts {path}: no such file")
    text = read_text(path, "--prompts")
    if path.suffix == ".jsonl":
        prompts = [_prompt_of(item, where) for where, item in _jsonl(text, f"--prompts {path}")]
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadInput(f"--prompts {path}: not JSON ({exc.msg} at line {exc.lineno})") from None
        items = list(data.values()) if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise BadInput(f"--prompts {path}: expected a list or an object of prompts")
        prompts = [_prompt_of(item, f"--prompts {path}: entry {i}") for i, item in enumerate(items)]
    else:
        prompts = [ln.strip() for ln in text.splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise BadInput(f"--prompts {path}: no prompts in the file")
    return prompts[:limit] if limit is not None else prompts


def list_images(folder: Path, option: str = "folder") -> list[Path]:
    """Image files under ``folder`` (recursive, hidden entries skipped), sorted by relative path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInput(f"{option} {folder}: no such folder")
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTS
        and p.is_file()
        and not any(s.startswith(".") for s in p.relative_to(folder).parts)
    )
    if not files:
        raise BadInput(f"{option} {folder}: no images ({', '.join(IMAGE_EXTS)})")
    return files


def load_rgb(path: Path) -> Image.Image:
    """The image at ``path`` as RGB; a broken file is a BadInput naming it."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise BadInput(f"{path}: not a readable image ({type(exc).__name__})") from None


def to_uint8_chw(image: Image.Image) -> torch.Tensor:
    """PIL RGB → uint8 tensor ``[3, H, W]``."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def image_prompts(folder: Path, option: str = "--images") -> list[tuple[Path, str]]:
    """``(image path, prompt)`` for every image listed in ``folder``'s ``samples.jsonl`` or ``metadata.jsonl``."""
    folder = Path(folder)
    for name, file_key in (("samples.jsonl", "file"), ("metadata.jsonl", "file_name")):
        index = folder / name
        if not index.is_file():
            continue
        pairs = []
        for where, row in _jsonl(read_text(index, "--images index"), str(index)):
            if not isinstance(row, dict) or not isinstance(row.get(file_key), str):
                raise BadInput(f"{where}: expected an object with {file_key!r}")
            path = folder / row[file_key]
            if not path.is_file():
                raise BadInput(f"{where}: {path} does not exist")
            pairs.append((path, _prompt_of(row, where)))
        if not pairs:
            raise BadInput(f"{index}: lists no images")
        return pairs
    if not folder.is_dir():
        raise BadInput(f"{option} {folder}: no such folder")
    raise BadInput(
        f"{option} {folder}: no samples.jsonl or metadata.jsonl saying which prompt each image was made from"
    )
