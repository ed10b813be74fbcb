"""The build state of a cache being prepared: ``build.json`` (what is being built) and the finished shards.

Each finished shard has a sidecar ``.json`` written after it (both atomically); a shard counts as finished while its
sha256 matches the sidecar. A build of another plan (other settings, items or shard size) starts over: it clears the
folder's shards, manifest and report first. On N processes rank 0 starts or resumes the build, then the others join.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from apexctl.atomic import write_text
from apexctl.data.cache import MANIFEST, PROMPTS_FILE
from apexctl.data.report import REPORT_NAME
from apexctl.data.shards import sha256_file, write_shard
from apexctl.data.sources import Item
from apexctl.errors import ApexError
from apexctl.ranks import Ranks

BUILD = "build.json"
_V1_FILES = ("latents.safetensors", "prompts.safetensors", "pairs.safetensors")


class BuildState:
    """What is being built (``build.json``) and which shards are finished (sidecars whose sha256 still matches)."""

    def __init__(self, root: Path, plan: dict, *, join: bool = False) -> None:
        """Start (or resume) the build of ``plan``; ``join``: a rank > 0, after rank 0 has done that."""
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        old = root / BUILD
        same = old.is_file() and _read_json(old) == plan
        if join and not same:
            raise ApexError(f"{old}: does not describe this build (another prepare is writing {root}?)")
        if not same:
            # _V1_FILES: a version-1 (single-file) cache left in the same folder by an older apexctl
            for name in (MANIFEST, PROMPTS_FILE, BUILD, REPORT_NAME, *_V1_FILES):
                (root / name).unlink(missing_ok=True)
            for sub in ("prompts", "images"):
                shutil.rmtree(root / sub, ignore_errors=True)
            write_text(old, json.dumps(plan, indent=1, sort_keys=True))
        self.resumed = same

    @classmethod
    def open(cls, root: Path, plan: dict, ranks: Ranks) -> BuildState:
        """The build state on every rank: rank 0 starts or resumes the build, then the others join it."""
        state = cls(root, plan) if ranks.main else None
        ranks.barrier()
        return state if state is not None else cls(root, plan, join=True)

    def done(self, name: str) -> dict | None:
        """The sidecar of a finished, verified shard ``name`` (relative path), else None (a bad one is removed)."""
        shard, side = self.root / name, self.root / (name.removesuffix(".safetensors") + ".json")
        if side.is_file() and shard.is_file():
            entry = _read_json(side)
            if entry is not None and entry.get("sha256") == sha256_file(shard):
                return entry
        shard.unlink(missing_ok=True)
        side.unlink(missing_ok=True)
        return None

    def finish(self, name: str, tensors: dict[str, torch.Tensor], extra: dict) -> dict:
        """Write shard ``name`` and then its sidecar; the manifest is stale from now until the end of the run."""
        (self.root / MANIFEST).unlink(missing_ok=True)
        entry = write_shard(self.root / name, tensors)
        entry = {**entry, "file": name, **extra}
        write_text(self.root / (name.removesuffix(".safetensors") + ".json"), json.dumps(entry, sort_keys=True))
        return entry


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def items_hash(items: Sequence[Item]) -> str:
    """A digest of the item list (index, key, captions, seed of each): a rerun over other items starts over."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.index, it.key, list(it.captions), it.seed]).encode())
    return h.hexdigest()[:16]
