"""Corrupt, truncated, too-small or missing images and empty / over-long captions are skipped and reported; exit 0."""

from __future__ import annotations

import json

import pytest
from data_util import ok, png_bytes, recipe, write_folder

from apexctl.data.cache import LatentCache


@pytest.fixture(autouse=True)
def _home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("APEXCTL_HOME", str(tmp_path_factory.getbasetemp() / "apexctl-home"))


def test_bad_items_are_skipped_with_reasons(tmp_path):
    folder = write_folder(
        tmp_path / "f",
        [
            ("good0.png", 40, 40, "a red fox"),
            ("good1.png", 64, 48, "a blue bird"),
            ("corrupt.png", 32, 32, "a cat"),
            ("truncated.png", 32, 32, "a dog"),
            ("small.png", 8, 8, "a tiny thing"),
            ("empty.png", 32, 32, "   "),
            ("long.png", 32, 32, "a very long caption " * 10),
            ("good2.png", 32, 48, "a green tree"),
        ],
    )
    (folder / "corrupt.png").write_bytes(b"this is not an image at all")
    (folder / "truncated.png").write_bytes(png_bytes(3, 32, 32)[:60])
    with open(folder / "metadata.jsonl", "a") as f:
        f.write('{"file_name": "missing.png", "text": "nowhere"}\n{not json\n')
    r = recipe(
        tmp_path,
        "bad",
        data={
            "source": "folder",
            "path": str(folder),
            "min_image_size": 16,
            "max_caption_tokens": 12,
            "num_workers": 2,
            "shard_size": 3,
        },
    )
    out = ok(["prepare", r, "-q"])
    assert "3 images" in out and "7 skipped" in out
    cache = tmp_path / "cache-bad"
    report = json.loads((cache / "prepare_report.json").read_text())
    reasons = {s["item"]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {
        "corrupt.png",
        "truncated.png",
        "small.png",
        "empty.png",
        "long.png",
        "missing.png",
        "metadata.jsonl line 10",
    }
    assert reasons["corrupt.png"].startswith("unreadable image (UnidentifiedImageError")
    assert reasons["truncated.png"].startswith("unreadable image")
    assert reasons["small.png"] == "image too small (8x8 < data.min_image_size 16)"
    assert reasons["empty.png"] == "empty caption"
    assert reasons["long.png"].startswith("caption too long (") and "> 12)" in reasons["long.png"]
    assert "FileNotFoundError" in reasons["missing.png"]
    assert "bad metadata line" in reasons["metadata.jsonl line 10"]
    # prompts are encoded before images are decoded: captions of items skipped for their image stay in the
    # prompt table (unused by any pair); bad captions never get there
    assert report["counts"] == {"items": 10, "images": 3, "pairs": 3, "prompts": 8, "skipped": 7}
    c = LatentCache.open(cache, verify="full")
    assert "a very long caption" not in " ".join(c.prompts) and "   " not in c.prompts
    assert sorted(c.prompts[p] for p in c.pair_prompt.tolist()) == ["a blue bird", "a green tree", "a red fox"]
    # the good ones, in source order, by their source index
    idx = [i for s in c.image_shards() if "index.0" in s for i in s["index.0"].tolist()]
    assert idx == [0, 1, 7]
