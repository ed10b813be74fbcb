"""Errors that the CLI turns into a one-line message and an exit code (DESIGN §3)."""

from __future__ import annotations


class ApexError(Exception):
    """Runtime failure: exit code 1."""

    exit_code = 1


class BadInput(ApexError):
    """Bad usage or bad input (recipe, file, value): exit code 2. The message names the file/key and what is allowed."""

    exit_code = 2
