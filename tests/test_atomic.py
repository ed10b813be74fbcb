"""Atomic writes leave complete files with the modes a plain open()/mkdir() would give (not tempfile's 0600/0700),
and nothing under the final name when the write fails."""

from __future__ import annotations

import os
import stat

import pytest

from apexctl.atomic import atomic_dir, write_bytes


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_modes_follow_the_umask(tmp_path, umask_022):
    write_bytes(tmp_path / "a.json", b"{}")
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "w.bin").write_bytes(b"x")
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755
    assert (tmp_path / "model" / "w.bin").read_bytes() == b"x"


def test_failed_dir_write_keeps_the_old_folder(tmp_path):
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "v1").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "model") as tmp:
        (tmp / "v2").write_text("2")
        raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["v1"]
