"""Errors that the CLI turns into a one-line message and an exit code (docs/design.md §3)."""

from __future__ import annotations

from pathlib import Path


class ApexError(Exception):
    """Runtime failure: exit code 1."""

    exit_code = 1


class BadInput(ApexError):
    """Bad usage or bad input (recipe, file, value): exit code 2. The message names the file/key and what is allowed."""

    exit_code = 2


def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of ``path``; a file that is not UTF-8 text is bad input (one line naming it and the byte)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise BadInput(
            f"{what} {path}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); save it as UTF-8"
        ) from None
