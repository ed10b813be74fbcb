"""``apexctl eval digits`` and ``eval scenes``: the embedded toy settings' judges, teacher vs student."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from apexctl.cli.common import QuietOpt, SetOpt, _recipe, eval_app, handle_errors


def _judged_eval_command(setting: str, default_recipe: str, doc: str) -> None:
    """Register ``apexctl eval <setting>`` (digits, scenes): one command body, the setting picks prompts and judge."""

    def command(
        recipe: Annotated[
            Path,
            typer.Option("--recipe", help="the student's recipe (teacher = model.path, student = output.dir/model)"),
        ] = Path(default_recipe),
        per_prompt: Annotated[int, typer.Option("--per-prompt", min=2, help="images per evaluation prompt")] = 100,
        teacher_steps: Annotated[
            Optional[int],
            typer.Option(
                "--teacher-steps",
                min=1,
                help="Euler steps of the multi-step teacher row (default: data.synthesize.steps, else 50)",
            ),
        ] = None,
        student_steps: Annotated[
            Optional[list[int]], typer.Option("--student-steps", min=1, help="student rows (repeatable)")
        ] = None,
        teacher_guidance: Annotated[
            Optional[float],
            typer.Option(
                "--teacher-guidance",
                min=1.0,
                help="CFG of the teacher row (default: the teacher run's sample.guidance)",
            ),
        ] = None,
        out: Annotated[Optional[Path], typer.Option("--out", help="output folder (default RUN/eval/<setting>)")] = None,
        set_: SetOpt = None,
        quiet: QuietOpt = False,
    ) -> None:
        from apexctl.eval.toy import run as run_digits

        r = _recipe(recipe, set_)
        run_digits.run_eval(
            r,
            getattr(run_digits, f"{setting}_setting")(r),
            per_prompt=per_prompt,
            teacher_steps=teacher_steps,
            student_steps=student_steps or [1],
            teacher_guidance=teacher_guidance,
            out=out,
            quiet=quiet,
        )

    command.__doc__ = doc
    command.__name__ = f"eval_{setting}"
    eval_app.command(setting)(handle_errors(command))


_judged_eval_command(
    "digits",
    "recipes/digits.yaml",
    "Prompt alignment (single-digit and multi-mode prompts), Fréchet distance and diversity: teacher vs student.",
)
_judged_eval_command(
    "scenes",
    "recipes/scenes.yaml",
    "Scenes (coloured digits at positions): attribute checks per prompt (count, position, colour, class), "
    "multi-prompt mode coverage, Fréchet distance and diversity: teacher vs student.",
)
