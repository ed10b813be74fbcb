"""prepare is resumable shard by shard and idempotent; damaged shards are found; a full disk keeps finished shards."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from data_util import CAPTIONS, fails, ok, recipe, write_folder

import apexctl.data.build as prep  # where shards are written
from apexctl.data.cache import LatentCache


@pytest.fixture(autouse=True)
def _home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("APEXCTL_HOME", str(tmp_path_factory.getbasetemp() / "apexctl-home"))


def _folder_recipe(tmp: Path, name: str) -> Path:
    folder = tmp / "imgs"
    if not folder.exists():
        write_folder(folder, [(f"{i}.png", 40, 32 + 8 * (i % 2), c) for i, c in enumerate(CAPTIONS)])
    # 6 images → 3 image shards; 5 distinct captions + "" → 3 prompt shards
    return recipe(tmp, name, data={"source": "folder", "path": str(folder), "shard_size": 2})


def _checksums(cache_dir: Path) -> dict:
    m = json.loads((cache_dir / "manifest.json").read_text())
    return {e["file"]: e["sha256"] for e in [m["prompts_file"], *m["shards"]["prompts"], *m["shards"]["images"]]}


def _count_writes(monkeypatch, fail_at: int | None = None, exc: BaseException | None = None) -> list[str]:
    calls: list[str] = []
    real = prep.write_shard

    def wrapped(path, tensors, metadata=None):
        calls.append(Path(path).name)
        if fail_at is not None and len(calls) == fail_at:
            raise exc or KeyboardInterrupt()
        return real(path, tensors, metadata)

    monkeypatch.setattr(prep, "write_shard", wrapped)
    return calls


def test_interrupted_prepare_resumes_to_the_same_cache(tmp_path, monkeypatch):
    full = _folder_recipe(tmp_path, "full")
    ok(["prepare", full, "-q"])
    want = _checksums(tmp_path / "cache-full")
    assert len(want) == 1 + 3 + 3

    part = _folder_recipe(tmp_path, "part")
    with monkeypatch.context() as mp:
        calls = _count_writes(mp, fail_at=5)  # 3 prompt shards + 1 image shard done, interrupted in the 5th
        assert fails(["prepare", part, "-q"], code=130).strip().endswith("interrupted")
    cache = tmp_path / "cache-part"
    assert not (cache / "manifest.json").exists() and len(calls) == 5
    done = sorted(p.name for p in (cache / "images").glob("*.safetensors"))
    assert done == ["shard-00000.safetensors"] and not list(cache.rglob("*.tmp"))

    with monkeypatch.context() as mp:
        calls = _count_writes(mp)
        ok(["prepare", part, "-q"])
    assert calls == ["shard-00001.safetensors", "shard-00002.safetensors"]  # only the unfinished image shards
    assert _checksums(cache) == want

    # idempotent: a rerun verifies and keeps everything, and writes the same manifest
    before = (cache / "manifest.json").read_bytes()
    with monkeypatch.context() as mp:
        calls = _count_writes(mp)
        ok(["prepare", part, "-q"])
    assert calls == [] and (cache / "manifest.json").read_bytes() == before


def test_damaged_shards_are_found_and_rewritten(tmp_path, monkeypatch):
    r = _folder_recipe(tmp_path, "dmg")
    ok(["prepare", r, "-q"])
    cache = tmp_path / "cache-dmg"
    want = _checksums(cache)
    shard = cache / "images" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    # the cheap open (size + quick digest) notices a flipped byte near the end, --verify (sha256) anywhere
    with pytest.raises(Exception, match="shard-00001"):
        LatentCache.open(cache)
    assert "shard-00001" in fails(["prepare", r, "--verify"])
    shard.write_bytes(bytes(data[:-10]))  # truncated
    assert "size" in fails(["distill", r, "-q"])
    with monkeypatch.context() as mp:
        calls = _count_writes(mp)
        ok(["prepare", r, "-q"])
    assert calls == ["shard-00001.safetensors"] and _checksums(cache) == want
    # an edited manifest is refused too
    m = json.loads((cache / "manifest.json").read_text())
    m["num_pairs"] += 1
    (cache / "manifest.json").write_text(json.dumps(m))
    assert "manifest hash" in fails(["distill", r, "-q"])


def test_disk_full_keeps_finished_shards(tmp_path, monkeypatch):
    r = _folder_recipe(tmp_path, "full-disk")
    with monkeypatch.context() as mp:
        _count_writes(mp, fail_at=6, exc=OSError(errno.ENOSPC, "No space left on device"))
        out = fails(["prepare", r, "-q"], code=1)
    assert "disk full" in out and "rerun" in out and len(out.strip().splitlines()) == 1
    cache = tmp_path / "cache-full-disk"
    sides = sorted((cache / "images").glob("*.json"))
    assert [p.name for p in sides] == ["shard-00000.json", "shard-00001.json"]
    for side in sides:  # each finished shard is complete and matches its recorded sha256
        entry = json.loads(side.read_text())
        assert prep.sha256_file(cache / entry["file"]) == entry["sha256"]
    ok(["prepare", r, "-q"])
    assert len(LatentCache.open(cache, verify="full")) == 6


def test_changed_settings_start_over(tmp_path, monkeypatch):
    r = _folder_recipe(tmp_path, "chg")
    (tmp_path / "cache-chg").mkdir()
    (tmp_path / "cache-chg" / "latents.safetensors").write_bytes(b"a version-1 cache")
    ok(["prepare", r, "-q"])
    assert not (tmp_path / "cache-chg" / "latents.safetensors").exists()
    r2 = recipe(
        tmp_path, "chg", data={"source": "folder", "path": str(tmp_path / "imgs"), "shard_size": 2, "resolution": 16}
    )
    with monkeypatch.context() as mp:
        calls = _count_writes(mp)
        ok(["prepare", r2, "-q"])
    assert len(calls) == 6  # nothing of the 32-px cache is reused
    assert LatentCache.open(tmp_path / "cache-chg").manifest["latent_shape"] == [4, 4, 4]
