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


def test_a_killed_file_write_leaves_a_temp_that_the_next_write_removes(tmp_path):
    """``write_bytes`` killed between writing and renaming leaves ``.NAME.HOST.PID.*.tmp``; the next write of NAME
    deletes it once its writer is gone, and never a live writer's (this process's, here)."""
    import subprocess
    import sys

    from apexctl.atomic import write_bytes

    dest = tmp_path / "step-000010.png"
    code = (
        "import os, sys\n"
        "from apexctl import atomic\n"
        "atomic.os.replace = lambda *a: os.kill(os.getpid(), 9)  # die just before the rename\n"
        "atomic.write_bytes(sys.argv[1], b'half')\n"
    )
    assert subprocess.run([sys.executable, "-c", code, str(dest)]).returncode == -9
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".step-000010.png.")]
    assert len(left) == 1 and left[0].read_bytes() == b"half" and not dest.exists()
    mine = tmp_path / f".step-000010.png.{left[0].name.split('.')[3]}.{os.getpid()}.abcd1234.tmp"
    mine.write_bytes(b"live writer")  # same host, a process that is running: kept
    write_bytes(dest, b"whole")
    assert dest.read_bytes() == b"whole" and not left[0].exists() and mine.exists()
