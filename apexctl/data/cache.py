"""The latent cache: latents + prompt embeddings + (image, prompt) pairs, with a manifest training can trust.

Layout (one folder, written atomically)::

    manifest.json        source, family, model fingerprint, shapes, counts, per-file sha256, prompts
    latents.safetensors  latents [N, C, h, w]
    prompts.safetensors  embeds [P, L, D], mask [P, L], pooled [P, D'] (families with pooled text embeddings)
    pairs.safetensors    image [M], prompt [M]     (a training example is a pair; one image may carry many prompts)

Training reads only this folder: the text encoder and the codec are never loaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from apexctl.atomic import atomic_dir
from apexctl.errors import BadInput
from apexctl.models.base import Cond

CACHE_VERSION = 1
_FILES = ("latents.safetensors", "prompts.safetensors", "pairs.safetensors")


def _sha256(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = limit
        while True:
            chunk = f.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not chunk:
                break
            h.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
                if remaining <= 0:
                    break
    return h.hexdigest()


def model_fingerprint(model_dir: str | Path) -> str:
    """Identity of what produced the cache: text encoder, tokenizer and codec files (name, size, first MiB).

    The denoiser is deliberately excluded: a distilled student shares its teacher's cache.
    """
    root = Path(model_dir)
    if not root.is_dir():
        return f"hub:{model_dir}"
    h = hashlib.sha256()
    for sub in ("text_encoder", "tokenizer", "vae", "apexctl_codec.json"):
        p = root / sub
        files = sorted(p.rglob("*")) if p.is_dir() else ([p] if p.is_file() else [])
        for f in files:
            if f.is_file():
                h.update(f"{f.relative_to(root)}:{f.stat().st_size}:{_sha256(f, 1 << 20)}\n".encode())
    return h.hexdigest()[:16]


def write_cache(
    out_dir: str | Path,
    *,
    latents: torch.Tensor,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    pair_image: torch.Tensor,
    pair_prompt: torch.Tensor,
    prompts: list[str],
    meta: dict,
    pooled: torch.Tensor | None = None,
) -> Path:
    """Write a complete cache atomically (a half-written cache never has a manifest under the final name)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file({"latents": latents.contiguous()}, str(tmp / "latents.safetensors"))
        text = {"embeds": embeds.contiguous(), "mask": mask.contiguous()}
        if pooled is not None:
            text["pooled"] = pooled.contiguous()
        save_file(text, str(tmp / "prompts.safetensors"))
        save_file(
            {"image": pair_image.long().contiguous(), "prompt": pair_prompt.long().contiguous()},
            str(tmp / "pairs.safetensors"),
        )
        manifest = {
            "version": CACHE_VERSION,
            **meta,
            "latent_shape": list(latents.shape[1:]),
            "embed_dim": int(embeds.shape[-1]),
            "num_images": int(latents.shape[0]),
            "num_prompts": len(prompts),
            "num_pairs": int(pair_image.shape[0]),
            "checksums": {f: _sha256(tmp / f) for f in _FILES},
            "prompts": prompts,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out_dir


@dataclass
class LatentCache:
    """An opened cache, held in memory (the digits cache is a few MB; issue 5 shards and memory-maps)."""

    root: Path
    manifest: dict
    latents: torch.Tensor
    embeds: torch.Tensor
    mask: torch.Tensor
    pair_image: torch.Tensor
    pair_prompt: torch.Tensor
    pooled: torch.Tensor | None = None

    @classmethod
    def open(cls, root: str | Path, verify_checksums: bool = True) -> LatentCache:
        root = Path(root)
        mf = root / "manifest.json"
        if not mf.is_file():
            raise BadInput(f"no latent cache at {root} (missing manifest.json); run `apexctl prepare RECIPE` first")
        manifest = json.loads(mf.read_text())
        if manifest.get("version") != CACHE_VERSION:
            raise BadInput(
                f"{mf}: cache version {manifest.get('version')} is not {CACHE_VERSION}; rerun `apexctl prepare`"
            )
        if verify_checksums:
            for f, digest in manifest["checksums"].items():
                if not (root / f).is_file() or _sha256(root / f) != digest:
                    raise BadInput(f"{root / f}: checksum does not match manifest.json; rerun `apexctl prepare`")
        lat = load_file(str(root / "latents.safetensors"))
        pr = load_file(str(root / "prompts.safetensors"))
        pa = load_file(str(root / "pairs.safetensors"))
        return cls(
            root, manifest, lat["latents"], pr["embeds"], pr["mask"], pa["image"], pa["prompt"], pr.get("pooled")
        )

    @property
    def prompts(self) -> list[str]:
        return list(self.manifest["prompts"])

    def __len__(self) -> int:
        return int(self.pair_image.shape[0])

    def check(self, expected: dict) -> None:
        """Refuse a cache that another model or data setting produced: exit 2 naming the differing field."""
        for key, want in expected.items():
            got = self.manifest.get(key)
            if got != want:
                raise BadInput(
                    f"{self.root / 'manifest.json'}: '{key}' is {got!r} but the recipe/model needs {want!r}; "
                    f"rerun `apexctl prepare` (or point data.cache_dir elsewhere)"
                )

    def cond(self, prompt_idx: torch.Tensor) -> Cond:
        """Cond rows for prompt indices, trimmed to the longest valid length in the batch."""
        m = self.mask[prompt_idx]
        length = max(int(m.sum(1).max()), 1)
        pooled = self.pooled[prompt_idx] if self.pooled is not None else None
        return Cond(self.embeds[prompt_idx, :length], m[:, :length], pooled)

    def prompt_index(self, prompt: str) -> int:
        try:
            return self.prompts.index(prompt)
        except ValueError:
            raise BadInput(
                f"prompt {prompt!r} is not in the cache {self.root}; add it to the data source and rerun prepare"
            ) from None

    def batch(
        self, pair_idx: np.ndarray, drop: np.ndarray | None = None, empty_prompt: int | None = None
    ) -> tuple[torch.Tensor, Cond]:
        """Latents and Cond for pairs; rows where ``drop`` is set use the empty prompt (classifier-free dropout)."""
        idx = torch.as_tensor(pair_idx, dtype=torch.long)
        p = self.pair_prompt[idx].clone()
        if drop is not None and empty_prompt is not None:
            p[torch.as_tensor(drop, dtype=torch.bool)] = empty_prompt
        return self.latents[self.pair_image[idx]], self.cond(p)


class PairSampler:
    """Deterministic, resumable order over the cache's pairs.

    Epoch e uses a permutation (and a dropout mask) from ``numpy.random.default_rng([seed, e])``, so the state is
    just ``(epoch, position)``; a resumed run draws exactly the batches an uninterrupted one would. Each call
    returns the *global* batch; rank r of W takes rows r::W.
    """

    def __init__(self, n: int, seed: int, cond_dropout: float = 0.0) -> None:
        self.n, self.seed, self.cond_dropout = n, seed, cond_dropout
        self.epoch, self.pos = 0, 0
        self._load_epoch()

    def _load_epoch(self) -> None:
        rng = np.random.default_rng([self.seed, self.epoch])
        self._perm = rng.permutation(self.n)
        self._drop = rng.random(self.n) < self.cond_dropout

    def next(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        idx, drop = [], []
        while size > 0:
            take = min(size, self.n - self.pos)
            idx.append(self._perm[self.pos : self.pos + take])
            drop.append(self._drop[self.pos : self.pos + take])
            self.pos += take
            size -= take
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._load_epoch()
        return np.concatenate(idx), np.concatenate(drop)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n or state["seed"] != self.seed:
            raise BadInput("checkpoint's data order does not match this cache/seed; resume with the same recipe")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._load_epoch()
