"""The Typer apps, shared options and the one-line error handling every command uses (exit 2: input, 1: runtime)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Optional

import typer

from apexctl.errors import ApexError

app = typer.Typer(
    help="APEX one-step distillation for text-to-image flow models: prepare → distill → sample → eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
eval_app = typer.Typer(help="Score a model: digits (the embedded default), scenes, geneval.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")

RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML (see recipes/)", show_default=False)]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="override a recipe value, e.g. --set train.steps=100 (repeatable)"),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]
LaunchOpt = Annotated[
    Optional[int],
    typer.Option(
        "--launch",
        min=1,
        help="run on N local processes (re-executes under `accelerate launch`; multi-node: `accelerate launch` "
        "yourself); the work is split across them and the result is the same as on one",
    ),
]

QuantizeOpt = Annotated[
    str,
    typer.Option(
        "--quantize",
        help="none | int8 | fp8 | nf4: draw with the base's transformer blocks quantised (less GPU memory; a "
        "LoRA goes on top, as in a model.quantize training run; docs/quantization.md)",
    ),
]


def check_quantize(quantize: str) -> None:
    """``--quantize``: a known scheme whose library is installed (exit 2 before anything loads or launches)."""
    from apexctl.models.quantize import require

    require(quantize, "--quantize")


def relaunched(launch: int | None) -> bool:
    """Run this command on ``launch`` processes when asked (True: done, the caller returns); exit with the
    launcher's status when a rank failed."""
    if launch is None or launch < 2:
        return False
    from apexctl.launch import relaunch

    rc = relaunch(launch, echo=lambda m: typer.echo(m, err=True))
    if rc != 0:
        raise typer.Exit(rc)
    return True


def _fail(exc: ApexError) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(exc.exit_code)


def handle_errors(fn):
    """Turn ApexError/BadInput into a one-line message and its exit code; never a traceback for bad input."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ApexError as exc:
            raise _fail(exc) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _recipe(path: Path, overrides: list[str] | None):
    from apexctl.recipe import load_recipe

    return load_recipe(path, overrides or [])
