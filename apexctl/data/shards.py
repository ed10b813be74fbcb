"""Cache shards: safetensors files written atomically, read memory-mapped, checked by size, quick digest or sha256.

A shard is written to a hidden temporary name, fsynced and renamed, so a file under its final name is always complete.
Reading maps the file (``mmap``, copy-on-write) and wraps each tensor with ``torch.frombuffer``: opening a shard
reads its header only, and indexing touches just the rows it needs.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from apexctl.atomic import _fsync_dir

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_QUICK_SPAN = 1 << 16  # bytes hashed at each end of a file by quick_digest


def sha256_file(path: str | Path) -> str:
    """Full sha256 of a file (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def quick_digest(path: str | Path) -> str:
    """sha256 of (size, first 64 KiB, last 64 KiB): catches truncation, a swapped file or a damaged header/tail
    without reading the whole shard (what ``LatentCache.open`` checks on every start)."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(p, "rb") as f:
        h.update(f.read(_QUICK_SPAN))
        if size > _QUICK_SPAN:
            f.seek(max(size - _QUICK_SPAN, _QUICK_SPAN))
            h.update(f.read(_QUICK_SPAN))
    return h.hexdigest()


def write_shard(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> dict:
    """Write ``tensors`` to ``path`` atomically; returns ``{"file", "bytes", "sha256", "quick"}`` for the manifest.

    An error (e.g. a full disk) removes the temporary file and leaves any earlier shard untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path), "quick": quick_digest(path)}


def read_header(path: str | Path) -> tuple[dict, int]:
    """The safetensors JSON header and the byte offset where tensor data starts."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("file is shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise ValueError("safetensors header length is implausible")
        header = json.loads(f.read(n))
    return header, 8 + n


class MappedShard:
    """One shard opened memory-mapped: ``shard[name]`` is a tensor view of the file (no copy, read lazily)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        header, start = read_header(self.path)
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._file = open(self.path, "rb")
        size = os.fstat(self._file.fileno()).st_size
        # ACCESS_COPY: a writable private mapping, so torch.frombuffer needs no copy and warns about nothing
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        self.tensors: dict[str, torch.Tensor] = {}
        for name, info in header.items():
            dtype = _DTYPES[info["dtype"]]
            b, e = info["data_offsets"]
            if start + e > size:
                raise ValueError(f"{self.path}: tensor {name!r} runs past the end of the file (truncated?)")
            if e == b:
                t = torch.empty(info["shape"], dtype=dtype)
            else:
                t = torch.frombuffer(self._map, dtype=dtype, count=(e - b) // dtype.itemsize, offset=start + b)
            self.tensors[name] = t.reshape(info["shape"])

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)
