"""Atomic writes (docs/design.md §3): write to a temporary name in the same folder, fsync, rename.

A file or folder is written as a hidden sibling ``.NAME.HOST.PID.XXXXXXXX.tmp``; an old folder ``NAME`` it replaces
is moved to ``.NAME.HOST.PID.XXXXXXXX.old`` before it is deleted. A writer killed before it could clean up leaves one of these
behind; the next write of ``NAME`` deletes those whose writer is gone (same host, process no longer running). One on
another host, or in the old unnamed form, is left alone: nothing here can tell whether its writer still runs.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=_sibling_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: give the file the mode open() would have
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _host() -> str:
    """This host's name as it can appear in a file name (no dots, so the sibling names parse)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_siblings(path: Path) -> list[Path]:
    """Delete the temporary (``.tmp``) and replaced (``.old``) siblings of ``path`` left by writers that died on
    this host; returns what was removed. Live writers', other hosts' and unnamed ones stay."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[^.]+\.(tmp|old)$")
    removed = []
    host, me = _host(), os.getpid()
    for p in path.parent.iterdir() if path.parent.is_dir() else []:
        m = pattern.match(p.name)
        if m is None or m["host"] != host or int(m["pid"]) == me or _pid_alive(int(m["pid"])):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


#: folders whose dead writers' temporary files this process has already removed
_SWEPT: set[Path] = set()


def _sweep_once(folder: Path) -> None:
    """Remove the ``.tmp`` files dead writers on this host left in ``folder``, once per folder per process: a
    listing per write would make writing N files into one folder (an FID sample set) cost N² directory entries."""
    key = folder.resolve()
    if key in _SWEPT:
        return
    _SWEPT.add(key)
    pattern = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[^.]+\.tmp$")
    host, me = _host(), os.getpid()
    for p in folder.iterdir():
        m = pattern.match(p.name)
        if m and m["host"] == host and int(m["pid"]) != me and p.is_file() and not _pid_alive(int(m["pid"])):
            p.unlink(missing_ok=True)


def _sibling_prefix(dest: Path) -> str:
    return f".{dest.name}.{_host()}.{os.getpid()}."


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move the complete folder ``tmp`` to ``dest``; an existing ``dest`` is replaced only now (after ``tmp`` is done)."""
    _fsync_tree(tmp)
    if dest.exists():
        old = dest.parent / f"{_sibling_prefix(dest)}{uuid.uuid4().hex[:8]}.old"
        os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dest)
    _fsync_dir(dest.parent)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` (an old ``path`` is removed only then)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    tmp = Path(tempfile.mkdtemp(prefix=_sibling_prefix(path), suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700: exports and caches are meant to be shared
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
