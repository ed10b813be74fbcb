"""``apexctl prepare``: encode a data source once into the sharded latent cache (data/cache.py).

Steps: list the source (captions only) → drop empty / over-long captions → encode the distinct prompts into prompt
shards → decode images on DataLoader workers (or let the teacher synthesise them) and encode them into image shards
→ write ``prompts.json``, ``manifest.json`` and ``prepare_report.json``.

Resumable and idempotent (data/build.py): ``build.json`` records what is being built; each finished shard has a sidecar ``.json``
(written after the shard, both atomically). A rerun keeps every shard whose sha256 matches its sidecar and writes
only the rest; a rerun with other settings starts over. Nothing is written in place, so an interruption or a full
disk leaves every finished shard valid.

On N processes (``--launch N`` or ``accelerate launch``, apexctl/ranks.py) shard k — prompt or image — is written by
rank k mod N; rank 0 writes ``build.json`` before the others start and the manifest after all have finished. A shard
holds the same items, encoded (or synthesised from the same seeds) in the same batches, whatever N is: the cache is
independent of N, and a rerun with any N after a kill of any rank redoes only the missing shards.
"""

from __future__ import annotations

import errno
import hashlib
import json
import time
from pathlib import Path

import torch

from apexctl.atomic import write_text
from apexctl.data.build import BuildState, items_hash
from apexctl.data.cache import (
    CACHE_VERSION,
    MANIFEST,
    PROMPTS_FILE,
    LatentCache,
    manifest_hash,
    model_fingerprint,
)
from apexctl.data.report import Report
from apexctl.data.shards import quick_digest, sha256_file
from apexctl.data.sources import Item, Source
from apexctl.errors import ApexError, BadInput
from apexctl.ranks import Ranks, job_ranks
from apexctl.recipe import DataSpec, Recipe, torch_dtype


def resolved_cache_dtype(d: DataSpec) -> str:
    """``data.cache_dtype`` with ``auto`` resolved: fp32 for the digits (exact demo numbers), bf16 otherwise."""
    if d.cache_dtype != "auto":
        return d.cache_dtype
    return "fp32" if d.source in ("digits", "scenes") else "bf16"


def data_settings(d: DataSpec, model_dir: str) -> dict:
    """The data settings a cache's content depends on (not throughput knobs such as workers or batch sizes)."""
    s: dict = {"resolution": d.resolution, "cache_dtype": resolved_cache_dtype(d), "limit": d.limit}
    if d.source in ("digits", "scenes"):
        s.update(holdout=d.holdout, seed=d.seed)
        if d.source == "scenes":
            s["source"] = "scenes"
        return s
    s.update(
        path=d.path,
        buckets=[list(b) for b in d.buckets] if d.buckets else None,
        min_image_size=d.min_image_size,
        max_caption_tokens=d.max_caption_tokens,
        text_column=d.text_column,
    )
    if d.source in ("parquet", "datasets", "hub"):
        s["image_column"] = d.image_column
    if d.source in ("datasets", "hub"):
        s["split"] = d.split
    if d.synthesize is not None:
        sy = d.synthesize
        s["synthesize"] = {
            "steps": sy.steps,
            "guidance": sy.guidance,
            "negative_prompt": sy.negative_prompt,
            "images_per_prompt": sy.images_per_prompt,
            "seed": sy.seed,
            "teacher": model_fingerprint(model_dir, ("transformer", "scheduler")),
        }
        if sy.quantize != "none":  # only then: caches built before the key existed keep their identity
            s["synthesize"]["quantize"] = sy.quantize
    return s


def cache_identity(recipe: Recipe, model_dir: str, family: str) -> dict:
    """The manifest fields a cache must match to serve ``recipe`` (checked by distill)."""
    d = recipe.data
    settings = data_settings(d, model_dir)
    return {
        "source": d.source,
        "family": family,
        "model_fingerprint": model_fingerprint(model_dir),
        "data": settings,
        "data_hash": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16],
    }


# -- progress -------------------------------------------------------------------------------------------------------
def _speed_column():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class ItemsPerSecond(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:.1f} items/s" if task.speed else "– items/s")

    return ItemsPerSecond()


# -- the run --------------------------------------------------------------------------------------------------------
@torch.no_grad()
def prepare(recipe: Recipe, *, quiet: bool = False, limit: int | None = None) -> Path:
    """Build (or resume, or verify and keep) the cache of ``recipe.data``; returns the cache folder."""
    from apexctl.data.captions import filter_captions
    from apexctl.data.sources import open_source
    from apexctl.data.synthesize import load_teacher
    from apexctl.models import resolve_model_path

    ranks = job_ranks(recipe.hardware.device)
    if limit is not None:
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"limit": limit})})
    d = recipe.data
    if d.source == "prompts" and d.buckets:
        raise BadInput("data.buckets is not supported with data.source = 'prompts' (the teacher draws at resolution)")
    source = open_source(d)  # a missing source or column fails here, before any model is loaded
    model_dir = resolve_model_path(recipe.model.path)
    backbone = load_teacher(recipe, model_dir, ranks.device)  # encoders + codec there; the denoiser when it draws
    t0 = time.perf_counter()  # throughput counts listing checks + encoding, not imports and model loading
    identity = cache_identity(recipe, model_dir, backbone.family)
    root = Path(d.cache_dir)
    report = Report(source.name)
    items = source.items[: d.limit] if d.limit else list(source.items)
    last = items[-1].index if items else -1
    for index, key, reason in source.rejected:
        if d.limit is None or index <= last:
            report.skip(index, key, reason)
    items = filter_captions(items, backbone, d.max_caption_tokens, report)
    prompts = sorted({c for it in items for c in it.captions} | set(source.extra_prompts) | {""})
    buckets = _buckets(d, backbone)
    plan = {
        "version": CACHE_VERSION,
        "identity": identity,
        "shard_size": d.shard_size,
        "items": items_hash(items),
        "num_items": len(items),
        "num_prompts": len(prompts),
    }
    state = BuildState.open(root, plan, ranks)
    dtype = torch_dtype(resolved_cache_dtype(d))
    from apexctl.progress import progress

    try:
        with progress(quiet or not ranks.main, _speed_column()) as bar:
            prompt_mine = _prompt_shards(state, backbone, prompts, d, dtype, bar, ranks)
            if d.synthesize is not None:
                from apexctl.data.synthesize import teacher_to_device

                teacher_to_device(backbone, d.synthesize, ranks.device)
            image_mine, encoded = _image_shards(state, backbone, source, items, prompts, buckets, d, dtype, bar, ranks)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ApexError(
                f"{root}: disk full while writing the cache ({e.strerror}); finished shards are kept, free space "
                "and rerun `apexctl prepare` to resume"
            ) from None
        raise
    gathered = ranks.gather((prompt_mine, image_mine, encoded, time.perf_counter() - t0))
    prompt_entries = _in_shard_order([g[0] for g in gathered])
    image_entries = _in_shard_order([g[1] for g in gathered])
    encoded = sum(g[2] for g in gathered)
    for entry in image_entries:
        for s in entry["skipped"]:
            report.skip(s["index"], s["item"], s["reason"])
    seconds = max(g[3] for g in gathered)  # the job's wall time: its slowest rank
    num_images = sum(e["images"] for e in image_entries)
    counts = {
        "items": len(source.items[: d.limit] if d.limit else source.items) + len(source.rejected),
        "images": num_images,
        "pairs": sum(e["pairs"] for e in image_entries),
        "prompts": len(prompts),
        "skipped": len(report.skipped),
    }
    timing = {"seconds": round(seconds, 3), "encoded_items": encoded, "items_per_s": round(encoded / seconds, 2)}
    timing["processes"] = ranks.world
    if ranks.main:
        report.write(root, counts, timing)
    if num_images == 0:  # every rank sees the same gathered counts: all stop with the same error
        raise BadInput(
            f"{d.path or d.source}: no usable items ({counts['skipped']} skipped, see {root}/prepare_report.json)"
        )
    if ranks.main:
        _write_manifest(root, identity, d, prompts, prompt_entries, image_entries, buckets, counts)
        if d.synthesize is not None and d.synthesize.export_dir:
            from apexctl.data.synthesize import export_image_folder

            # one decode per image (the synthesis took 2 × steps forwards): rank 0 alone
            export_image_folder(root, backbone, d.synthesize.export_dir, batch=d.encode_batch)
    ranks.barrier()  # every rank returns a finished cache
    return root


def _in_shard_order(per_rank: list[dict[int, dict]]) -> list[dict]:
    """The sidecar entries every rank wrote or kept ({shard index: entry}), merged in shard order."""
    merged = {k: e for part in per_rank for k, e in part.items()}
    return [merged[k] for k in sorted(merged)]


def _buckets(d: DataSpec, backbone) -> list[tuple[int, int]]:
    """The recipe's buckets (or the square resolution), each checked against the model's size factor now, not at
    the first training step."""
    from apexctl.data.buckets import bucket_list

    buckets = bucket_list(d.resolution, d.buckets)
    for w, h in buckets:
        try:
            backbone.latent_shape(h, w)
        except BadInput as exc:
            key = "data.buckets" if d.buckets else "data.resolution"
            raise BadInput(f"{key}: [{w}, {h}] does not fit {backbone.family}: {exc}") from None
    return buckets


def _chunks(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def _prompt_shards(
    state: BuildState, backbone, prompts: list[str], d: DataSpec, dtype, bar, ranks: Ranks
) -> dict[int, dict]:
    """Write this rank's unfinished prompt shards; returns its shards' sidecar entries by shard index."""
    from apexctl.models.base import Cond

    entries = {}
    mine = ranks.share(list(enumerate(_chunks(len(prompts), d.shard_size))))
    task = bar.add_task("encode prompts", total=sum(len(c) for _, c in mine))
    for k, chunk in mine:
        name = f"prompts/shard-{k:05d}.safetensors"
        entry = state.done(name)
        if entry is None:
            texts = [prompts[i] for i in chunk]
            cond = Cond.cat(
                [backbone.encode_prompts(texts[i : i + d.encode_batch]) for i in range(0, len(texts), d.encode_batch)]
            )
            tensors = {"embeds": cond.embeds.float().cpu().to(dtype), "mask": cond.mask.cpu().to(torch.uint8)}
            if cond.pooled is not None:
                tensors["pooled"] = cond.pooled.float().cpu().to(dtype)
            entry = state.finish(
                name,
                tensors,
                {"count": len(texts), "embed_dim": int(cond.embeds.shape[-1]), "pooled_dim": _dim(cond.pooled)},
            )
        entries[k] = entry
        bar.advance(task, len(chunk))
    return entries


def _dim(t: torch.Tensor | None) -> int | None:
    return None if t is None else int(t.shape[-1])


def _image_shards(
    state: BuildState,
    backbone,
    source: Source,
    items: list[Item],
    prompts: list[str],
    buckets: list[tuple[int, int]],
    d: DataSpec,
    dtype,
    bar,
    ranks: Ranks,
) -> tuple[dict[int, dict], int]:
    """Write this rank's unfinished image shards; returns its shards' sidecar entries by shard index and how many
    items it encoded now."""
    from apexctl.data.buckets import DecodeDataset, decode_batches, image_preparer

    prompt_id = {p: i for i, p in enumerate(prompts)}
    chunks = _chunks(len(items), d.shard_size)
    names = [f"images/shard-{k:05d}.safetensors" for k in range(len(chunks))]
    mine = ranks.share(list(range(len(chunks))))
    entries: dict[int, dict | None] = {k: state.done(names[k]) for k in mine}
    pending = [k for k in mine if entries[k] is None]
    task = bar.add_task(
        "synthesise images" if d.synthesize else "encode images", total=sum(len(chunks[k]) for k in mine)
    )
    bar.advance(task, sum(len(chunks[k]) for k in mine if entries[k] is not None))
    synth = d.synthesize is not None
    if not synth:
        in_memory = source.name in ("digits", "scenes")  # already tensors: worker processes would only add pickling
        dataset = DecodeDataset(source, items, image_preparer(buckets, d.min_image_size, d.resolution))
        batches = [
            list(c[i : i + d.encode_batch])
            for k in pending
            for c in [chunks[k]]
            for i in range(0, len(c), d.encode_batch)
        ]
        stream = iter(decode_batches(dataset, batches, 0 if in_memory else d.num_workers))
    encoded = 0
    for k in pending:
        chunk = chunks[k]
        rows: dict[int, list[tuple[int, torch.Tensor]]] = {}  # bucket → (pos, latent) in item order
        skipped = []
        if synth:
            sub = [items[i] for i in chunk]
            from apexctl.data.synthesize import synthesize_latents

            for i in range(0, len(sub), d.synthesize.batch):
                part = sub[i : i + d.synthesize.batch]
                lat = synthesize_latents(
                    backbone,
                    [it.captions[0] for it in part],
                    [it.seed for it in part],
                    d.synthesize,
                    d.resolution,
                    d.resolution,
                )
                rows.setdefault(0, []).extend((chunk[i + j], lat[j].to(dtype)) for j in range(len(part)))
                bar.advance(task, len(part))
        else:
            for _ in range(-(-len(chunk) // d.encode_batch)):
                decoded = next(stream)
                by_bucket: dict[int, list] = {}
                for r in decoded:
                    if r.reason is not None:
                        it = items[r.pos]
                        skipped.append({"index": it.index, "item": it.key, "reason": r.reason})
                    else:
                        by_bucket.setdefault(r.bucket, []).append(r)
                for b, rs in by_bucket.items():
                    images = torch.stack([r.image for r in rs]).to(ranks.device)  # the codec's device
                    lat = backbone.encode_images(images).float().cpu().to(dtype)
                    rows.setdefault(b, []).extend((r.pos, lat[j]) for j, r in enumerate(rs))
                bar.advance(task, len(decoded))
        encoded += len(chunk)
        entries[k] = state.finish(names[k], *_shard_tensors(rows, items, prompt_id, skipped))
    return {k: e for k, e in entries.items() if e is not None}, encoded


def _shard_tensors(
    rows: dict[int, list[tuple[int, torch.Tensor]]], items: list[Item], prompt_id: dict[str, int], skipped: list[dict]
) -> tuple[dict[str, torch.Tensor], dict]:
    """Per-bucket latents / source index / seed, and one pair row per caption in item order."""
    tensors: dict[str, torch.Tensor] = {}
    where: dict[int, tuple[int, int]] = {}  # pos → (bucket, row)
    shapes = {}
    for b in sorted(rows):
        rs = sorted(rows[b], key=lambda r: r[0])
        tensors[f"latents.{b}"] = torch.stack([lat for _, lat in rs])
        tensors[f"index.{b}"] = torch.tensor([items[pos].index for pos, _ in rs], dtype=torch.long)
        if items[rs[0][0]].seed is not None:
            tensors[f"seed.{b}"] = torch.tensor([items[pos].seed for pos, _ in rs], dtype=torch.long)
        where.update({pos: (b, r) for r, (pos, _) in enumerate(rs)})
        shapes[str(b)] = [len(rs), *tensors[f"latents.{b}"].shape[1:]]
    pb, pr, pp = [], [], []
    for pos in sorted(where):
        b, r = where[pos]
        for c in items[pos].captions:
            pb.append(b)
            pr.append(r)
            pp.append(prompt_id[c])
    tensors["pair_bucket"] = torch.tensor(pb, dtype=torch.long)
    tensors["pair_row"] = torch.tensor(pr, dtype=torch.long)
    tensors["pair_prompt"] = torch.tensor(pp, dtype=torch.long)
    extra = {"images": len(where), "pairs": len(pp), "buckets": shapes, "skipped": skipped}
    return tensors, extra


def _write_manifest(
    root: Path,
    identity: dict,
    d: DataSpec,
    prompts: list[str],
    prompt_entries: list[dict],
    image_entries: list[dict],
    buckets: list[tuple[int, int]],
    counts: dict,
) -> None:
    write_text(root / PROMPTS_FILE, json.dumps(prompts, ensure_ascii=False))
    pf = root / PROMPTS_FILE
    per_bucket: dict[int, dict] = {}
    for e in image_entries:
        for b, (n, *shape) in e["buckets"].items():
            slot = per_bucket.setdefault(int(b), {"size": list(buckets[int(b)]), "latent_shape": shape, "images": 0})
            slot["images"] += n
    bucket_list = [per_bucket[b] for b in sorted(per_bucket)]
    keep = ("file", "bytes", "sha256", "quick")
    manifest = {
        "version": CACHE_VERSION,
        **identity,
        "cache_dtype": resolved_cache_dtype(d),
        "latent_shape": bucket_list[0]["latent_shape"] if len(bucket_list) == 1 else None,
        "buckets": bucket_list,
        "embed_dim": prompt_entries[0]["embed_dim"],
        "pooled_dim": prompt_entries[0]["pooled_dim"],
        "num_images": counts["images"],
        "num_prompts": len(prompts),
        "num_pairs": counts["pairs"],
        "num_skipped": counts["skipped"],
        "empty_prompt": prompts.index(""),
        "prompts_file": {
            "file": PROMPTS_FILE,
            "bytes": pf.stat().st_size,
            "sha256": sha256_file(pf),
            "quick": quick_digest(pf),
        },
        "shards": {
            "prompts": [{k: e[k] for k in (*keep, "count")} for e in prompt_entries],
            "images": [{k: e[k] for k in (*keep, "images", "pairs")} for e in image_entries],
        },
    }
    manifest["manifest_sha256"] = manifest_hash(manifest)
    write_text(root / MANIFEST, json.dumps(manifest, indent=1))


def verify(cache_dir: str | Path) -> LatentCache:
    """Full check of an existing cache: every file's sha256 against the manifest (BadInput naming the first bad file)."""
    return LatentCache.open(cache_dir, verify="full")
