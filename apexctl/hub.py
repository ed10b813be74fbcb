"""Helpers for loading and writing diffusers / transformers folders (a local folder or a hub id).

Shared by the model adapters (``apexctl.models``) and the LoRA code (``apexctl.lora``); it imports neither, so
``models.base → lora → hub`` has no cycle. diffusers / transformers are imported only inside the functions.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from apexctl.errors import BadInput

T = TypeVar("T")


@contextmanager
def quiet_hub_progress() -> Iterator[None]:
    """No diffusers/transformers tqdm bars (e.g. transformers 5's "Loading weights") inside; our CLI shows its own."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    was = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            dlog.enable_progress_bar()
        if was[1]:
            tlog.enable_progress_bar()


def link_tree(src: Path, dst: Path) -> None:
    """Hard-link every file of ``src`` into ``dst`` (copy where linking fails, e.g. across filesystems)."""
    for root, _, files in os.walk(src):
        out = dst / Path(root).relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        for name in files:
            # realpath: hub-cache snapshots are symlinks to blobs; link the blob, not the symlink
            real = os.path.realpath(os.path.join(root, name))
            try:
                os.link(real, out / name)
            except OSError:
                shutil.copy2(real, out / name)


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def one_line(e: BaseException) -> str:
    """``Type: first line`` of an exception, for one-line error messages."""
    first = str(e).strip().splitlines()
    return f"{type(e).__name__}: {first[0] if first else ''}"


def load_component(path: str, sub: str, fn: Callable[[], T]) -> T:
    """Call a component loader; a failure becomes one ``BadInput`` line naming the folder and the component."""
    try:
        with quiet_hub_progress():
            return fn()
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise BadInput(f"{path}: cannot load {sub}/ ({one_line(e)})") from None


def load_tokenizer(path: str, sub: str, fn: Callable[[], Any], min_tokens: int) -> Any:
    """``load_component`` for a tokenizer, refusing an empty one: transformers 5 offline returns an empty tokenizer
    for an uncached hub id instead of raising."""
    tok = load_component(path, sub, fn)
    if len(tok) <= min_tokens:
        raise BadInput(f"{path}: {sub}/ loaded empty ({len(tok)} tokens): not a local folder or cached hub model")
    return tok
