"""``apexctl eval fid | clip-score | report``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from apexctl.cli.common import LaunchOpt, QuantizeOpt, QuietOpt, check_quantize, eval_app, handle_errors, relaunched

RunArg = Annotated[
    Optional[Path], typer.Argument(help="a run folder (output.dir): its student/teacher and where eval/ is written")
]
PromptsOpt = Annotated[
    Optional[Path],
    typer.Option("--prompts", help="prompt list: .txt (one per line), .jsonl, or .json (MJHQ-30K meta_data.json)"),
]
NumOpt = Annotated[Optional[int], typer.Option("--num", min=1, help="use only the first N prompts")]
PerPromptOpt = Annotated[int, typer.Option("--per-prompt", min=1, help="images per prompt (seeds seed+k)")]
StepsOpt = Annotated[int, typer.Option("--steps", min=1, help="student sampling steps")]
TeacherStepsOpt = Annotated[
    Optional[int],
    typer.Option("--teacher-steps", min=1, help="teacher Euler steps (default: data.synthesize.steps, else 50)"),
]
TeacherGuidanceOpt = Annotated[
    Optional[float],
    typer.Option(
        "--teacher-guidance",
        min=1.0,
        help="teacher CFG (default: data.synthesize.guidance, else the teacher run's sample.guidance)",
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="first seed; image k of a prompt uses seed + k")]
BatchOpt = Annotated[int, typer.Option("--batch", min=1, help="images per generation / feature batch")]


@eval_app.command("fid")
@handle_errors
def eval_fid(
    run: RunArg = None,
    generated: Annotated[
        Optional[Path], typer.Option("--generated", help="generated images (default: the run's student on --prompts)")
    ] = None,
    reference: Annotated[
        Optional[Path],
        typer.Option("--reference", help="reference images, e.g. MJHQ-30K (default: the run's teacher on --prompts)"),
    ] = None,
    inception: Annotated[
        Optional[Path],
        typer.Option("--inception", help="FID Inception weights file pt_inception-2015-12-05-6726825d.pth"),
    ] = None,
    prompts: PromptsOpt = None,
    num: NumOpt = None,
    per_prompt: PerPromptOpt = 1,
    steps: StepsOpt = 1,
    teacher_steps: TeacherStepsOpt = None,
    teacher_guidance: TeacherGuidanceOpt = None,
    seed: SeedOpt = 0,
    batch: BatchOpt = 16,
    out: Annotated[Optional[Path], typer.Option("--out", help="summary JSON (default RUN/eval/fid.json)")] = None,
    quantize: QuantizeOpt = "none",
    launch: LaunchOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """FID (torchmetrics, FID Inception-v3) of generated vs reference images; either side a folder or drawn from RUN."""
    from apexctl.eval.fid.run import run_eval_fid

    kwargs = dict(
        generated=generated,
        reference=reference,
        inception=inception,
        prompts_file=prompts,
        num=num,
        per_prompt=per_prompt,
        steps=steps,
        teacher_steps=teacher_steps,
        teacher_guidance=teacher_guidance,
        seed=seed,
        batch=batch,
        out=out,
        quiet=quiet,
        quantize=quantize,
    )
    check_quantize(quantize)
    if launch is not None and launch > 1:
        run_eval_fid(run, **kwargs, check_only=True)  # bad input: exit 2 here, before any process starts
    if not relaunched(launch):
        run_eval_fid(run, **kwargs)


@eval_app.command("clip-score")
@handle_errors
def eval_clip_score(
    run: RunArg = None,
    clip: Annotated[
        Optional[Path], typer.Option("--clip", help="local CLIP folder (transformers CLIPModel + CLIPProcessor)")
    ] = None,
    images: Annotated[
        Optional[list[Path]],
        typer.Option("--images", help="image folder with samples.jsonl or metadata.jsonl (repeatable)"),
    ] = None,
    prompts: PromptsOpt = None,
    num: NumOpt = None,
    per_prompt: PerPromptOpt = 1,
    steps: StepsOpt = 1,
    teacher: Annotated[bool, typer.Option("--teacher", help="also score the teacher on the same prompts")] = False,
    teacher_steps: TeacherStepsOpt = None,
    teacher_guidance: TeacherGuidanceOpt = None,
    seed: SeedOpt = 0,
    batch: BatchOpt = 16,
    out: Annotated[
        Optional[Path], typer.Option("--out", help="summary JSON (default RUN/eval/clip_score.json)")
    ] = None,
    quantize: QuantizeOpt = "none",
    launch: LaunchOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """CLIP score (torchmetrics) of images against their prompts: --images folders, or the run's student on --prompts."""
    from apexctl.eval.clip.run import run_eval_clip_score

    kwargs = dict(
        clip=clip,
        images=images,
        prompts_file=prompts,
        num=num,
        per_prompt=per_prompt,
        steps=steps,
        teacher=teacher,
        teacher_steps=teacher_steps,
        teacher_guidance=teacher_guidance,
        seed=seed,
        batch=batch,
        out=out,
        quiet=quiet,
        quantize=quantize,
    )
    check_quantize(quantize)
    if launch is not None and launch > 1:
        run_eval_clip_score(run, **kwargs, check_only=True)  # bad input: exit 2 here, before any process starts
    if not relaunched(launch):
        run_eval_clip_score(run, **kwargs)


@eval_app.command("report")
@handle_errors
def eval_report(
    run: Annotated[Path, typer.Argument(help="a run folder (output.dir of the recipe)")],
    no_samples: Annotated[
        bool, typer.Option("--no-samples", help="no sample grids (nothing is generated, no model is loaded)")
    ] = False,
    steps: Annotated[
        Optional[list[int]], typer.Option("--steps", min=1, help="grid step counts (repeatable; default 1, 2, 4)")
    ] = None,
    prompts: PromptsOpt = None,
    per_prompt: Annotated[int, typer.Option("--per-prompt", min=1, help="images per prompt row")] = 4,
    seed: SeedOpt = 0,
    out: Annotated[Optional[Path], typer.Option("--out", help="HTML file (default RUN/report/report.html)")] = None,
    quiet: QuietOpt = False,
) -> None:
    """One self-contained HTML page: loss curves, sample grids at 1/2/4 steps, every summary under RUN/eval/."""
    from apexctl.eval.imagesets import read_prompts
    from apexctl.eval.report.report import write_report

    texts = read_prompts(prompts, 8) if prompts is not None else None
    dest = write_report(
        run,
        out=out,
        samples=not no_samples,
        steps=steps or [1, 2, 4],
        prompts=texts,
        per_prompt=per_prompt,
        seed=seed,
        quiet=quiet,
    )
    typer.echo(f"report: {dest}")
