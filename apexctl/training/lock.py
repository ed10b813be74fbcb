"""One writer per run folder: ``RUN/.lock`` holds the writer's pid, host and start time under an ``flock``.

The kernel drops the ``flock`` when its process dies (even on SIGKILL), so a lock file whose lock is free is stale:
the next run takes it over with a warning. A lock held by a live process makes a second run exit 2 with one line
naming the pid and host. A lock file written on *another* host is never taken over automatically (``flock`` does not
reach across hosts on every network file system): the message says to delete it once that run is known to be dead.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from apexctl.errors import BadInput

LOCK_NAME = ".lock"


def _describe(info: dict) -> str:
    since = info.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else ""
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}{when}"


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        info = json.loads(raw.decode() or "{}")
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``with RunLock(run) as lock: ...``; ``lock.warning`` is set when a stale lock was taken over."""

    def __init__(self, run: str | Path) -> None:
        self.run = Path(run)
        self.path = self.run / LOCK_NAME
        self.fd: int | None = None
        self.warning: str | None = None

    def _busy(self, info: dict) -> BadInput:
        return BadInput(
            f"{self.run} is in use by another run ({_describe(info)}); wait for it to finish, stop it, "
            f"or set another output.dir"
        )

    def acquire(self) -> RunLock:
        self.run.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = _read(fd)
                os.close(fd)
                raise self._busy(info) from None
            try:  # a finishing run unlinks the file it locked: make sure ours is still the one at the path
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = _read(fd)
        if old.get("pid") is not None and old.get("pid") != os.getpid():
            if old.get("host") not in (None, host):
                os.close(fd)
                raise BadInput(
                    f"{self.run} is locked by {_describe(old)} (another host: cannot tell whether it is alive); "
                    f"if that run is gone, delete {self.path}"
                )
            state = "still running but not holding it" if _pid_alive(int(old["pid"])) else "no longer running"
            self.warning = f"{self.run}: taking over a stale lock left by {_describe(old)} ({state})"
        info = {"pid": os.getpid(), "host": host, "started": time.time()}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding the lock: nobody can be between open and flock
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_free(run: str | Path) -> None:
    """Raise the 'in use' BadInput when a live process holds ``run``'s lock (no lock is taken)."""
    path = Path(run) / LOCK_NAME
    if not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLock(run)._busy(_read(fd)) from None
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
