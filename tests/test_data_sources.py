"""Every source kind → prepare → a sharded cache → distill a few steps with no text encoder or codec loaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from data_util import CAPTIONS, TINY_DIGITS, block_encoders, fails, metrics, ok, png_bytes, recipe, write_folder

from apexctl.data.cache import LatentCache


@pytest.fixture(autouse=True)
def _home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("APEXCTL_HOME", str(tmp_path_factory.getbasetemp() / "apexctl-home"))


def _hf_dataset(n: int):
    import datasets

    rows = {"image": [{"bytes": png_bytes(i, 36 + 4 * i, 32), "path": None} for i in range(n)], "caption": CAPTIONS[:n]}
    return datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())


def _source(kind: str, tmp: Path) -> tuple[dict, int]:
    """The recipe's data section for a tiny source of ``kind`` written under ``tmp``, and its image count."""
    if kind == "folder":
        rows = [(f"{i}.png", 40 + 8 * i, 32 + 4 * i, c) for i, c in enumerate(CAPTIONS)]
        return {"source": "folder", "path": str(write_folder(tmp / "folder", rows)), "shard_size": 4}, 6
    if kind == "parquet":
        # two files through a glob: raw image bytes in one, datasets' {bytes, path} struct in the other
        (tmp / "pq").mkdir()
        pq.write_table(
            pa.table({"img": [png_bytes(i, 40, 36) for i in range(3)], "txt": CAPTIONS[:3]}), tmp / "pq" / "a.parquet"
        )
        structs = [{"bytes": png_bytes(10 + i, 48, 32), "path": None} for i in range(2)]
        pq.write_table(pa.table({"img": structs, "txt": CAPTIONS[3:5]}), tmp / "pq" / "b.parquet")
        data = {"source": "parquet", "path": str(tmp / "pq" / "*.parquet"), "image_column": "img"}
        return {**data, "text_column": "txt", "num_workers": 2}, 5
    if kind == "datasets":
        import datasets

        datasets.DatasetDict({"train": _hf_dataset(4)}).save_to_disk(str(tmp / "ds"))
        return {"source": "datasets", "path": str(tmp / "ds"), "text_column": "caption"}, 4
    if kind == "hub":
        return {"source": "hub", "path": "someone/tiny-captions", "text_column": "caption"}, 3
    if kind == "prompts":
        (tmp / "prompts.txt").write_text("a red fox\n\na blue bird\n")
        synth = {"steps": 2, "guidance": 2.0, "images_per_prompt": 2, "batch": 3}
        return {"source": "prompts", "path": str(tmp / "prompts.txt"), "synthesize": synth}, 4
    return {"source": "digits", "limit": 40, "shard_size": 16}, 40


@pytest.mark.parametrize("kind", ["folder", "parquet", "datasets", "hub", "prompts", "digits"])
def test_source_to_cache_to_distill(tmp_path, monkeypatch, kind):
    import datasets

    data, n = _source(kind, tmp_path)
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda path, split: calls.append((path, split)) or _hf_dataset(3))
    model = TINY_DIGITS if kind == "digits" else "tiny:test"
    r = recipe(tmp_path, kind, model=model, data={**data, "resolution": 8 if kind == "digits" else 32})
    out = ok(["prepare", r, "-q"])
    assert "skipped" in out and "items/s" in out
    cache = LatentCache.open(tmp_path / f"cache-{kind}", verify="full")
    m = cache.manifest
    assert m["num_images"] == n and m["source"] == kind and m["num_skipped"] == 0
    assert m["cache_dtype"] == ("fp32" if kind == "digits" else "bf16")
    if kind != "digits":
        assert m["latent_shape"] == [4, 8, 8] and m["num_pairs"] == n
    assert "" in cache.prompts and len(m["shards"]["images"]) >= 1
    if kind == "hub":
        assert calls == [("someone/tiny-captions", "train")]
    x, cond = cache.batch(np.arange(min(len(cache), 3)))
    assert x.dtype == cond.embeds.dtype == torch.float32
    assert cond.mask.sum(1).min() >= 1 and np.isfinite(x.numpy()).all()

    block_encoders(monkeypatch)
    ok(["distill", r, "-q"])
    rows = metrics(tmp_path / f"run-{kind}")
    assert [x["step"] for x in rows] == [1, 2] and all(np.isfinite(x["loss"]) for x in rows)


def test_digits_cache_holds_the_digits_exactly(tmp_path):
    """fp32 latents are the digits pixels, pairs are ``training_pairs`` image-major, prompts sorted with ''."""
    from apexctl.data import digits

    r = recipe(tmp_path, "dig", model=TINY_DIGITS, data={"source": "digits", "resolution": 8, "shard_size": 500})
    ok(["prepare", r, "-q"])
    cache = LatentCache.open(tmp_path / "cache-dig")
    split = digits.load_split()
    pairs = digits.training_pairs(split.train_labels)
    assert cache.prompts == sorted(set(digits.all_prompts()) | {""})
    assert len(cache) == len(pairs) and len(cache.manifest["shards"]["images"]) == 3
    idx = np.arange(len(pairs))
    x = cache.pair_latents(idx)
    assert cache.latents.shape == (len(split.train_images), 1, 8, 8)
    assert torch.equal(cache.latents[:], split.train_images)
    want = split.train_images[torch.tensor([i for i, _ in pairs])]
    assert x.dtype == torch.float32 and torch.equal(x, want)
    assert [cache.prompts[p] for p in cache.pair_prompt.tolist()] == [p for _, p in pairs]


def test_missing_source_or_column_exits_2(tmp_path):
    r = recipe(tmp_path, "nofolder", data={"source": "folder", "path": str(tmp_path / "nope")})
    assert "no such folder" in fails(["prepare", r, "-q"])
    write_folder(tmp_path / "f", [("a.png", 32, 32, "x")])
    r = recipe(tmp_path, "nocol", data={"source": "folder", "path": str(tmp_path / "f"), "text_column": "caption"})
    out = fails(["prepare", r, "-q"])
    assert "text column 'caption'" in out and len(out.strip().splitlines()) == 1
    pq.write_table(pa.table({"image": [b"x"], "text": ["a"]}), tmp_path / "t.parquet")
    r = recipe(tmp_path, "pqcol", data={"source": "parquet", "path": str(tmp_path / "t.parquet"), "text_column": "cap"})
    out = fails(["prepare", r, "-q"])
    assert "no column 'cap'" in out and "data.text_column" in out and "columns: image, text" in out
    r = recipe(tmp_path, "nopq", data={"source": "parquet", "path": str(tmp_path / "none" / "*.parquet")})
    assert "no parquet files" in fails(["prepare", r, "-q"])
    _hf_dataset(2).save_to_disk(str(tmp_path / "ds"))
    r = recipe(tmp_path, "dscol", data={"source": "datasets", "path": str(tmp_path / "ds"), "image_column": "pic"})
    assert "no column 'pic'" in fails(["prepare", r, "-q"])
    r = recipe(tmp_path, "noprompts", data={"source": "prompts", "path": str(tmp_path / "p.txt"), "synthesize": {}})
    assert "no such prompts file" in fails(["prepare", r, "-q"])


def test_limit_and_verify(tmp_path):
    rows = [(f"{i}.png", 32, 32, c) for i, c in enumerate(CAPTIONS)]
    r = recipe(tmp_path, "lim", data={"source": "folder", "path": str(write_folder(tmp_path / "f", rows))})
    ok(["prepare", r, "--limit", "2", "-q"])
    cache_dir = tmp_path / "cache-lim"
    m = json.loads((cache_dir / "manifest.json").read_text())
    assert m["num_images"] == 2 and m["data"]["limit"] == 2
    assert "verified" in ok(["prepare", r, "--verify"])
    # distill refuses the --limit cache for the full recipe and names the field
    assert "'data.limit'" in fails(["distill", r, "-q"])
