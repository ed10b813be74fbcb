"""The ``apexctl`` command line: parse, validate, call the library. Errors: one line, exit 2 (input) or 1 (runtime).

One module per group of commands; importing them registers their commands on ``app``.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from apexctl.cli.common import app, eval_app, handle_errors
from apexctl.errors import ApexError

# importing a module registers its commands on ``app``, in this order in --help
for _group in ("train", "models", "toy", "geneval", "evaluate"):
    importlib.import_module(f"apexctl.cli.{_group}")

__all__ = ["app", "eval_app", "handle_errors", "main"]


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import apexctl.launch

    apexctl.launch.ARGV = sys.argv[1:]  # what `--launch N` re-runs on every rank
    try:
        app()
    except ApexError as exc:  # errors raised outside a command body
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
