"""Atomic writes (docs/design.md §3): write to a temporary name in the same folder, fsync, rename.

A file or folder is written as a hidden sibling ``.NAME.HOST.PID.XXXXXXXX.tmp``; an old folder ``NAME`` it replaces
is moved to ``.NAME.HOST.PID.XXXXXXXX.old`` before it is deleted. A writer killed before it could clean up leaves one
of these behind; the next folder write of ``NAME``, and this process's first file write into the same folder, delete
those whose writer is gone (same host, process no longer running). One on another host, or in the old unnamed form,
is left alone: nothing here can tell whether its writer still runs. (Containers that share a file system and a host
name but not a PID namespace would defeat the liveness check: give them distinct host names.)
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


#: ``.NAME.HOST.PID.RANDOM.tmp`` (a write in progress) or ``.old`` (a folder being replaced)
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[^.]+\.(tmp|old)$")


def remove_stale_siblings(folder: Path, name: str | None = None) -> None:
    """Delete the temporary and replaced siblings in ``folder`` (of ``name`` only, when given) left by writers that
    died on this host. Live writers', other hosts' and unnamed ones stay."""
    host, me = _host(), os.getpid()
    for p in folder.iterdir() if folder.is_dir() else []:
        m = _SIBLING.match(p.name)
        if m is None or (name is not None and m["name"] != name) or m["host"] != host or int(m["pid"]) == me:
            continue
        if _pid_alive(int(m["pid"])):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


#: folders whose dead writers' leftovers this process has already removed
_SWEPT: set[Path] = set()


def _sweep_once(folder: Path) -> None:
    """``remove_stale_siblings(folder)`` once per folder per process: a listing per write would make writing N files
    into one folder (an FID sample set) cost N² directory entries."""
    key = folder.resolve()
    if key not in _SWEPT:
        _SWEPT.add(key)
        remove_stale_siblings(folder)


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
    remove_stale_siblings(path.parent, path.name)
    tmp = Path(tempfile.mkdtemp(prefix=_sibling_prefix(path), suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700: exports and caches are meant to be shared
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
