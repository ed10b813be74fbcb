"""The latent cache: sharded, memory-mapped latents + prompt embeddings + (image, prompt) pairs, with a manifest.

Layout (``data.cache_dir``)::

    manifest.json                     identity (source, family, model fingerprint, data settings + hash), shapes,
                                      counts, buckets, per-file size / quick digest / sha256, its own hash
    prompts.json                      prompt texts; prompt id = position
    prompts/shard-NNNNN.safetensors   embeds [n, L, D] (L padded per shard), mask [n, L] (uint8), pooled [n, P]
    images/shard-NNNNN.safetensors    latents.B [n_B, C, h, w] per bucket B, index.B (source item), seed.B
                                      (synthesised data), pair_bucket / pair_row / pair_prompt [m] (one row per pair)
    prepare_report.json               skipped items with reasons, counts, throughput

A training example is a pair; one image may carry several prompts and a prompt may serve many images. Pairs are
numbered in shard order, so an unbucketed cache numbers them exactly as the single-file cache of version 1 did.
Training reads only this folder (memory-mapped): the text encoder and the codec are never loaded.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from apexctl.data.shards import MappedShard, quick_digest, sha256_file
from apexctl.errors import BadInput
from apexctl.models.base import Cond

CACHE_VERSION = 2
MANIFEST = "manifest.json"
PROMPTS_FILE = "prompts.json"

Verify = Literal["none", "quick", "full"]


def _sha256_head(path: Path, limit: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(limit))
    return h.hexdigest()


def model_fingerprint(model_dir: str | Path, parts: tuple[str, ...] = ("text_encoder", "tokenizer", "vae")) -> str:
    """Identity of what produced the cache: the files of ``parts`` (name, size, first MiB) plus the pixel codec config.

    The denoiser is excluded by default: a distilled student shares its teacher's cache. Synthesised data also
    fingerprints the teacher's ``transformer`` (its images depend on it).
    """
    root = Path(model_dir)
    if not root.is_dir():
        return f"hub:{model_dir}"
    h = hashlib.sha256()
    for sub in (*parts, "apexctl_codec.json"):
        p = root / sub
        files = sorted(p.rglob("*")) if p.is_dir() else ([p] if p.is_file() else [])
        for f in files:
            if f.is_file():
                h.update(f"{f.relative_to(root)}:{f.stat().st_size}:{_sha256_head(f, 1 << 20)}\n".encode())
    return h.hexdigest()[:16]


def manifest_hash(manifest: dict) -> str:
    """sha256 of the manifest without its own ``manifest_sha256`` (detects an edited or damaged manifest)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def verify_file(root: Path, entry: dict, level: Verify) -> str | None:
    """None if ``root / entry['file']`` matches its manifest entry at ``level``, else the reason."""
    p = root / entry["file"]
    if not p.is_file():
        return "missing"
    if level == "none":
        return None
    if p.stat().st_size != entry["bytes"]:
        return f"size {p.stat().st_size} != {entry['bytes']}"
    if level == "quick" and quick_digest(p) != entry["quick"]:
        return "quick digest differs"
    if level == "full" and sha256_file(p) != entry["sha256"]:
        return "sha256 differs"
    return None


def manifest_files(manifest: dict) -> list[dict]:
    return [manifest["prompts_file"], *manifest["shards"]["prompts"], *manifest["shards"]["images"]]


class LatentCache:
    """An opened cache. Shards stay memory-mapped; only the pair table (4 integers per pair) is in memory."""

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root, self.manifest = root, manifest
        self._prompt_shards = [MappedShard(root / e["file"]) for e in manifest["shards"]["prompts"]]
        self._image_shards = [MappedShard(root / e["file"]) for e in manifest["shards"]["images"]]
        counts = [s["embeds"].shape[0] for s in self._prompt_shards]
        self._prompt_start = torch.tensor(np.cumsum([0, *counts])[:-1], dtype=torch.long)
        cols: dict[str, list[torch.Tensor]] = {"shard": [], "bucket": [], "row": [], "prompt": []}
        for i, s in enumerate(self._image_shards):
            cols["shard"].append(torch.full_like(s["pair_row"], i))
            for k in ("bucket", "row", "prompt"):
                cols[k].append(s[f"pair_{k}"])
        cat = {k: torch.cat(v).long() if v else torch.zeros(0, dtype=torch.long) for k, v in cols.items()}
        self.pair_shard, self.pair_bucket, self.pair_row = cat["shard"], cat["bucket"], cat["row"]
        self.pair_prompt = cat["prompt"]

    @classmethod
    def open(cls, root: str | Path, verify: Verify = "quick") -> LatentCache:
        """Open ``root``; ``verify``: ``quick`` (default: manifest hash, file sizes and quick digests — cheap on a
        large cache), ``full`` (sha256 of every file) or ``none``. A mismatch is a one-line BadInput."""
        root = Path(root)
        mf = root / MANIFEST
        if not mf.is_file():
            raise BadInput(f"no latent cache at {root} (missing manifest.json); run `apexctl prepare RECIPE` first")
        try:
            manifest = json.loads(mf.read_text())
        except ValueError:
            raise BadInput(f"{mf}: not valid JSON; rerun `apexctl prepare`") from None
        if manifest.get("version") != CACHE_VERSION:
            raise BadInput(
                f"{mf}: cache version {manifest.get('version')} is not {CACHE_VERSION}; rerun `apexctl prepare`"
            )
        if verify != "none" and manifest.get("manifest_sha256") != manifest_hash(manifest):
            raise BadInput(
                f"{mf}: manifest hash does not match its content (edited or damaged); rerun `apexctl prepare`"
            )
        for entry in manifest_files(manifest):
            why = verify_file(root, entry, verify)
            if why is not None:
                raise BadInput(f"{root / entry['file']}: {why} (vs manifest.json); rerun `apexctl prepare`")
        try:
            return cls(root, manifest)
        except (ValueError, KeyError, OSError) as e:
            raise BadInput(
                f"{root}: cannot read cache shards ({type(e).__name__}: {e}); rerun `apexctl prepare`"
            ) from None

    @cached_property
    def prompts(self) -> list[str]:
        return list(json.loads((self.root / PROMPTS_FILE).read_text()))

    def __len__(self) -> int:
        return int(self.pair_prompt.shape[0])

    @property
    def pair_buckets(self) -> np.ndarray | None:
        """Bucket id per pair for a multi-bucket cache (batches must not mix them); None with one bucket."""
        return self.pair_bucket.numpy() if len(self.manifest.get("buckets", [])) > 1 else None

    def check(self, expected: dict) -> None:
        """Refuse a cache that another model or data setting produced: exit 2 naming the differing field."""

        def walk(want: dict, got: dict | None, prefix: str) -> None:
            got = got if isinstance(got, dict) else {}
            for key, w in want.items():
                g = got.get(key)
                if isinstance(w, dict) and isinstance(g, dict):
                    walk(w, g, f"{prefix}{key}.")
                elif g != w:
                    raise BadInput(
                        f"{self.root / MANIFEST}: '{prefix}{key}' is {g!r} but the recipe/model needs {w!r}; "
                        f"rerun `apexctl prepare` (or point data.cache_dir elsewhere)"
                    )

        walk(expected, self.manifest, "")

    def cond(self, prompt_idx: torch.Tensor) -> Cond:
        """Cond rows for prompt ids (float32, mask long), trimmed to the longest valid length in the batch."""
        idx = torch.as_tensor(prompt_idx, dtype=torch.long).reshape(-1)
        shard = torch.searchsorted(self._prompt_start, idx, right=True) - 1
        row = idx - self._prompt_start[shard]
        used = shard.unique().tolist()
        width = max(self._prompt_shards[s]["embeds"].shape[1] for s in used)
        dim = self._prompt_shards[used[0]]["embeds"].shape[2]
        embeds = torch.zeros(len(idx), width, dim)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        has_pooled = "pooled" in self._prompt_shards[used[0]]
        pooled = torch.zeros(len(idx), self._prompt_shards[used[0]]["pooled"].shape[1]) if has_pooled else None
        for s in used:
            sel = (shard == s).nonzero().squeeze(1)
            sh = self._prompt_shards[s]
            e = sh["embeds"][row[sel]]
            embeds[sel, : e.shape[1]] = e.float()
            mask[sel, : e.shape[1]] = sh["mask"][row[sel]].long()
            if pooled is not None:
                pooled[sel] = sh["pooled"][row[sel]].float()
        length = max(int(mask.sum(1).max()), 1)
        return Cond(embeds[:, :length].contiguous(), mask[:, :length].contiguous(), pooled)

    def prompt_index(self, prompt: str) -> int:
        try:
            return self.prompts.index(prompt)
        except ValueError:
            raise BadInput(
                f"prompt {prompt!r} is not in the cache {self.root}; add it to the data source and rerun prepare"
            ) from None

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """``(C, h, w)`` of the latents (of the first bucket when there are several)."""
        return tuple(self.manifest["buckets"][0]["latent_shape"])

    @property
    def latents(self) -> _LatentsView:
        """The images' latents as one ``[N, C, h, w]`` view (single-bucket caches; version-1 API: ``.shape``, ``[i]``)."""
        return _LatentsView(self)

    def pair_latents(self, pair_idx: np.ndarray | torch.Tensor) -> torch.Tensor:
        """float32 latents of pairs that all share one bucket."""
        return self._pair_rows(pair_idx, "latents").float()

    @property
    def has_seeds(self) -> bool:
        """Every image has its recorded synthesis seed (``data.synthesize``: the teacher's noise is reproducible)."""
        return bool(self._image_shards) and all(
            any(k.startswith("seed.") for k in s.tensors) for s in self._image_shards
        )

    def pair_seeds(self, pair_idx: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The synthesis seed (long) of each pair's image, pairs sharing one bucket (needs :attr:`has_seeds`)."""
        return self._pair_rows(pair_idx, "seed")

    def _pair_rows(self, pair_idx: np.ndarray | torch.Tensor, kind: str) -> torch.Tensor:
        """Rows of the image tensor ``kind.B`` (latents, seed) for pairs that all share one bucket B."""
        idx = torch.as_tensor(pair_idx, dtype=torch.long).reshape(-1)
        buckets = self.pair_bucket[idx].unique().tolist()
        if len(buckets) != 1:
            raise ValueError(f"a batch must come from one bucket, got buckets {buckets}")
        name = f"{kind}.{buckets[0]}"
        shard, row = self.pair_shard[idx], self.pair_row[idx]
        used = shard.unique().tolist()
        first = self._image_shards[used[0]][name]
        out = torch.empty((len(idx), *first.shape[1:]), dtype=torch.float32 if kind == "latents" else first.dtype)
        for s in used:
            sel = (shard == s).nonzero().squeeze(1)
            out[sel] = self._image_shards[s][name][row[sel]].to(out.dtype)
        return out

    def batch(
        self, pair_idx: np.ndarray, drop: np.ndarray | None = None, empty_prompt: int | None = None
    ) -> tuple[torch.Tensor, Cond]:
        """Latents and Cond for pairs; rows where ``drop`` is set use the empty prompt (classifier-free dropout)."""
        idx = torch.as_tensor(pair_idx, dtype=torch.long)
        p = self.pair_prompt[idx].clone()
        if drop is not None and empty_prompt is not None:
            p[torch.as_tensor(drop, dtype=torch.bool)] = empty_prompt
        return self.pair_latents(idx), self.cond(p)

    def image_shards(self) -> list[MappedShard]:
        """The mapped image shards in order (export and tests read latents, source indices and seeds from them)."""
        return list(self._image_shards)


class _LatentsView:
    """Image-indexed access to a single-bucket cache's latents across shards (float32 rows on indexing)."""

    def __init__(self, cache: LatentCache) -> None:
        self._shards = [s["latents.0"] for s in cache.image_shards() if "latents.0" in s]
        counts = [t.shape[0] for t in self._shards]
        self._start = torch.tensor(np.cumsum([0, *counts])[:-1], dtype=torch.long)
        self.shape = torch.Size([sum(counts), *cache.latent_shape])
        self._single = len(cache.manifest["buckets"]) == 1

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, image_idx) -> torch.Tensor:
        if not self._single:
            raise ValueError("a bucketed cache has no single latents tensor; use LatentCache.pair_latents")
        idx = torch.arange(self.shape[0])[image_idx]
        flat = idx.reshape(-1)
        shard = torch.searchsorted(self._start, flat, right=True) - 1
        out = torch.empty((len(flat), *self.shape[1:]))
        for s in shard.unique().tolist():
            sel = (shard == s).nonzero().squeeze(1)
            out[sel] = self._shards[s][flat[sel] - self._start[s]].float()
        return out.reshape(*idx.shape, *self.shape[1:])


class PairSampler:
    """Deterministic, resumable order over the cache's pairs.

    Epoch e uses a permutation (and a dropout mask) from ``numpy.random.default_rng([seed, e])``, so the state is
    just ``(epoch, position)``; a resumed run draws exactly the batches an uninterrupted one would. Each call
    returns the *global* batch; rank r of W takes rows r::W.

    With ``buckets`` (bucket id per pair, several buckets) every batch comes from one bucket: each bucket's pairs,
    in the epoch's permutation order, are cut into batches (the last one filled up from the start of that bucket),
    and the batches are shuffled with the same generator. The batch size is then fixed by the first call.
    """

    def __init__(self, n: int, seed: int, cond_dropout: float = 0.0, buckets: np.ndarray | None = None) -> None:
        self.n, self.seed, self.cond_dropout = n, seed, cond_dropout
        self.buckets = None if buckets is None or len(np.unique(buckets)) <= 1 else np.asarray(buckets)
        self.size: int | None = None
        self.epoch, self.pos = 0, 0
        self._load_epoch()

    def _load_epoch(self) -> None:
        rng = np.random.default_rng([self.seed, self.epoch])
        self._perm = rng.permutation(self.n)
        self._drop = rng.random(self.n) < self.cond_dropout
        if self.buckets is not None and self.size is not None:
            drop_of = np.empty(self.n, dtype=bool)
            drop_of[self._perm] = self._drop
            batches = []
            for b in np.unique(self.buckets):
                members = self._perm[self.buckets[self._perm] == b]
                k = -(-len(members) // self.size)
                members = np.resize(members, k * self.size)  # wraps around: a full last batch
                batches.extend(members.reshape(k, self.size))
            self._batches = [batches[i] for i in rng.permutation(len(batches))]
            self._batch_drop = [drop_of[b] for b in self._batches]

    def next(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        if self.buckets is not None:
            return self._next_bucketed(size)
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

    def _next_bucketed(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        if self.size is None:
            self.size = size
            self._load_epoch()
        elif size != self.size:
            raise ValueError(f"a bucketed PairSampler draws batches of {self.size}, asked for {size}")
        idx, drop = self._batches[self.pos], self._batch_drop[self.pos]
        self.pos += 1
        if self.pos == len(self._batches):
            self.epoch, self.pos = self.epoch + 1, 0
            self._load_epoch()
        return idx, drop

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "n": self.n}
        if self.buckets is not None:
            state["size"] = self.size
        return state

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n or state["seed"] != self.seed:
            raise BadInput("checkpoint's data order does not match this cache/seed; resume with the same recipe")
        if self.buckets is not None:
            self.size = state.get("size")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._load_epoch()
