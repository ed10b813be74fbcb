"""Aspect-ratio buckets: images go to the nearest bucket; every training batch comes from one bucket."""

from __future__ import annotations

import numpy as np
import pytest
from data_util import block_encoders, metrics, ok, recipe, write_folder

from apexctl.data.buckets import choose_bucket, fit_image
from apexctl.data.cache import LatentCache, PairSampler


@pytest.fixture(autouse=True)
def _home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("APEXCTL_HOME", str(tmp_path_factory.getbasetemp() / "apexctl-home"))


def _old_sampler(n: int, seed: int, p: float, size: int, calls: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The version-1 PairSampler, verbatim in effect: the unbucketed order must not change."""
    out, epoch, pos = [], 0, 0
    rng = np.random.default_rng([seed, epoch])
    perm, drop = rng.permutation(n), rng.random(n) < p
    for _ in range(calls):
        idx, dr, want = [], [], size
        while want > 0:
            take = min(want, n - pos)
            idx.append(perm[pos : pos + take])
            dr.append(drop[pos : pos + take])
            pos, want = pos + take, want - take
            if pos == n:
                epoch, pos = epoch + 1, 0
                rng = np.random.default_rng([seed, epoch])
                perm, drop = rng.permutation(n), rng.random(n) < p
        out.append((np.concatenate(idx), np.concatenate(dr)))
    return out


def test_single_bucket_sampler_is_unchanged():
    for buckets in (None, np.zeros(37, dtype=int)):
        s = PairSampler(37, seed=4, cond_dropout=0.3, buckets=buckets)
        for (i, d), (oi, od) in zip([s.next(8) for _ in range(12)], _old_sampler(37, 4, 0.3, 8, 12), strict=True):
            assert np.array_equal(i, oi) and np.array_equal(d, od)


def test_bucketed_sampler_batches_one_bucket_and_resumes():
    buckets = np.array([0] * 11 + [1] * 5 + [2] * 2)
    s = PairSampler(len(buckets), seed=1, cond_dropout=0.5, buckets=buckets)
    epoch0 = []
    while s.epoch == 0:
        epoch0.append(s.next(4)[0])
    assert all(len(set(buckets[b])) == 1 and len(b) == 4 for b in epoch0)
    assert set(np.concatenate(epoch0)) == set(range(len(buckets)))  # every pair at least once per epoch
    assert len(epoch0) == 3 + 2 + 1
    state = s.state_dict()
    ahead = [s.next(4) for _ in range(9)]
    r = PairSampler(len(buckets), seed=1, cond_dropout=0.5, buckets=buckets)
    r.load_state_dict(state)
    for (a, da), (b, db) in zip(ahead, [r.next(4) for _ in range(9)], strict=True):
        assert np.array_equal(a, b) and np.array_equal(da, db)
    with pytest.raises(ValueError, match="batches of 4"):
        r.next(3)


def test_choose_and_fit():
    from PIL import Image

    buckets = [(32, 32), (48, 24), (24, 48)]
    assert [choose_bucket(w, h, buckets) for w, h in [(100, 90), (300, 140), (50, 110)]] == [0, 1, 2]
    x = fit_image(Image.new("RGB", (90, 40), (255, 0, 0)), (48, 24))
    assert tuple(x.shape) == (3, 24, 48) and float(x[0].min()) == 1.0 and float(x[1].max()) == -1.0


def test_bucketed_cache_trains_on_one_bucket_per_batch(tmp_path, monkeypatch):
    sizes = [(64, 64), (96, 48), (48, 96), (60, 60), (100, 50), (40, 80), (70, 66)]
    rows = [(f"{i}.png", w, h, f"picture {i}") for i, (w, h) in enumerate(sizes)]
    folder = write_folder(tmp_path / "f", rows)
    data = {"source": "folder", "path": str(folder), "buckets": [[32, 32], [48, 24], [24, 48]], "shard_size": 4}
    r = recipe(tmp_path, "bk", data=data, train={"steps": 4, "micro_batch": 2})
    ok(["prepare", r, "-q"])
    cache = LatentCache.open(tmp_path / "cache-bk")
    m = cache.manifest
    assert m["latent_shape"] is None
    assert [(b["size"], b["latent_shape"], b["images"]) for b in m["buckets"]] == [
        ([32, 32], [4, 8, 8], 3),
        ([48, 24], [4, 6, 12], 2),
        ([24, 48], [4, 12, 6], 2),
    ]
    assert list(cache.pair_buckets) == [0, 1, 2, 0, 1, 2, 0]
    with pytest.raises(ValueError, match="one bucket"):
        cache.batch(np.array([0, 1]))

    seen = []
    real = LatentCache.batch

    def spy(self, idx, drop=None, empty=None):
        seen.append(set(self.pair_bucket[idx].tolist()))
        return real(self, idx, drop, empty)

    monkeypatch.setattr(LatentCache, "batch", spy)
    block_encoders(monkeypatch)
    ok(["distill", r, "-q"])
    assert len(seen) == 4 and all(len(b) == 1 for b in seen)
    assert [x["step"] for x in metrics(tmp_path / "run-bk")] == [1, 2, 3, 4]


def test_a_bucket_the_model_cannot_take_exits_2_before_encoding(tmp_path):
    from typer.testing import CliRunner

    from apexctl.cli import app

    folder = write_folder(tmp_path / "f", [("0.png", 64, 64, "a picture")])
    data = {"source": "folder", "path": str(folder), "buckets": [[32, 32], [30, 30]]}
    r = recipe(tmp_path, "bad", data=data)
    res = CliRunner().invoke(app, ["prepare", str(r), "-q"])
    assert res.exit_code == 2 and "data.buckets: [30, 30] does not fit qwen_image" in res.output
    assert not (tmp_path / "cache-bad").exists()
