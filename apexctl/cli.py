"""The ``apexctl`` command line: parse, validate, call the engine. Errors: one line, exit 2 (input) or 1 (runtime)."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from apexctl.errors import ApexError, BadInput, read_text

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


@app.command()
@handle_errors
def prepare(
    recipe: RecipeArg,
    set_: SetOpt = None,
    limit: Annotated[
        Optional[int], typer.Option("--limit", min=1, help="encode only the first N items (a quick look)")
    ] = None,
    verify: Annotated[
        bool, typer.Option("--verify", help="check every cache file's sha256 against the manifest; encode nothing")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Encode the recipe's data source (prompts + images) once into the latent cache (data.cache_dir).

    Resumable: rerun after an interruption and only the unfinished shards are written."""
    r = _recipe(recipe, set_)
    if verify:
        from apexctl.data.prepare import verify as verify_cache

        cache = verify_cache(r.data.cache_dir)
        n = len(cache.manifest["shards"]["images"]) + len(cache.manifest["shards"]["prompts"])
        typer.echo(f"cache {r.data.cache_dir}: {n} shards verified (sha256), {len(cache)} pairs")
        return
    from apexctl.data.prepare import prepare as run_prepare
    from apexctl.data.report import read_report

    out = run_prepare(r, quiet=quiet, limit=limit)
    m = json.loads((out / "manifest.json").read_text())
    rep = read_report(out) or {}
    shape = m["latent_shape"] or [b["latent_shape"] for b in m["buckets"]]
    speed = rep.get("timing", {}).get("items_per_s")
    typer.echo(
        f"cache {out}: {m['num_images']} images, {m['num_prompts']} prompts, {m['num_pairs']} pairs, latents {shape}; "
        f"{m['num_skipped']} skipped (see {out / 'prepare_report.json'})" + (f"; {speed:.1f} items/s" if speed else "")
    )


@app.command()
@handle_errors
def distill(
    recipe: RecipeArg,
    set_: SetOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="validate the recipe and print the plan; train nothing")
    ] = False,
    resume: Annotated[
        Optional[str],
        typer.Option("--resume", help="'auto' (newest complete checkpoint in the run) or a checkpoint folder"),
    ] = None,
    until: Annotated[
        Optional[int],
        typer.Option("--until", min=1, help="stop after this step (checkpointed); continue later with --resume auto"),
    ] = None,
    launch: Annotated[
        Optional[int],
        typer.Option(
            "--launch",
            min=1,
            help="run on N local processes (DDP, or FSDP per hardware.strategy; re-executes under `accelerate launch`; "
            "sets hardware.processes=N)",
        ),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Train with the recipe's objective (apex, apex_paper, flow_matching) from the latent cache."""
    if launch is not None and launch > 1 and not dry_run:
        from apexctl.launch import relaunch
        from apexctl.training.hardware import check_world

        r = _recipe(recipe, [*(set_ or []), f"hardware.processes={launch}"])
        check_world(r, launch)  # a global_batch that cannot hold: exit 2 before any process starts
        args = [str(recipe), *[a for item in set_ or [] for a in ("--set", item)]]
        args += ["--resume", resume] if resume else []
        args += ["--until", str(until)] if until is not None else []
        args += ["--quiet"] if quiet else []
        rc = relaunch(launch, args, Path(r.output.dir), echo=lambda m: typer.echo(m, err=True))
        if rc != 0:
            raise typer.Exit(rc)
        return
    r = _recipe(recipe, [*(set_ or []), f"hardware.processes={launch}"] if launch else set_)
    if dry_run:
        from apexctl.plan import describe_plan

        typer.echo(describe_plan(r))
        return
    from apexctl.launch import is_rank_zero
    from apexctl.training.loop import train

    run = train(r, resume=resume, until=until, quiet=quiet)
    if is_rank_zero():
        done = next((run / d for d in ("model", "lora") if (run / d).is_dir()), None)
        typer.echo(f"run {run}: " + (f"saved to {done}" if done is not None else "checkpointed"))


def _newest_run(root: Path = Path("runs")) -> Path:
    """The run under ``root`` trained last (full runs: ``model/``, LoRA runs: ``lora/``)."""
    from apexctl.inference import newest_run

    return newest_run(root)


@app.command()
@handle_errors
def sample(
    prompts: Annotated[Optional[list[str]], typer.Argument(help="prompts to draw", show_default=False)] = None,
    prompts_file: Annotated[
        Optional[Path], typer.Option("--prompts-file", help="text file, one prompt per line")
    ] = None,
    recipe: Annotated[
        Optional[Path], typer.Option("--recipe", help="use this recipe's trained model (output.dir/model)")
    ] = None,
    model: Annotated[
        Optional[str],
        typer.Option(
            "--model", help="model folder, run folder (RUN or RUN/model: its recipe applies) or tiny:<preset>"
        ),
    ] = None,
    steps: Annotated[
        Optional[int], typer.Option("--steps", min=1, help="sampling steps (default: recipe sample.steps, else 1)")
    ] = None,
    method: Annotated[
        Optional[str], typer.Option("--method", help="auto | one | few | euler (default: recipe sample.method)")
    ] = None,
    guidance: Annotated[
        Optional[float], typer.Option("--guidance", min=1.0, help="classifier-free guidance scale")
    ] = None,
    seed: Annotated[
        Optional[int],
        typer.Option(
            "--seed", help="first seed; image k of a prompt uses seed + k (default: recipe sample.seed, else 0)"
        ),
    ] = None,
    num_images: Annotated[int, typer.Option("--num-images", "-n", min=1, help="images per prompt")] = 4,
    out: Annotated[Optional[Path], typer.Option("--out", help="output folder (default RUN/samples)")] = None,
    size: Annotated[
        Optional[int],
        typer.Option(
            "--size",
            min=8,
            help="image height = width in pixels (default: recipe sample.height/width, else data.resolution, else "
            "the model's native size)",
        ),
    ] = None,
    batch: Annotated[
        Optional[int], typer.Option("--batch", min=1, help="images per forward pass (default: recipe sample.batch)")
    ] = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Generate images (PNG per image + grid.png). Model: --model, --recipe, or the newest run under ./runs."""
    from apexctl.inference import locate
    from apexctl.inference.sample import run_sample

    texts = list(prompts or [])
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise BadInput(f"--prompts-file {prompts_file}: no such file")
        texts += [ln.strip() for ln in read_text(prompts_file, "--prompts-file").splitlines() if ln.strip()]
    if not texts:
        raise BadInput("no prompts: give them as arguments or with --prompts-file")
    if method is not None and method not in ("auto", "one", "few", "euler"):
        raise BadInput(f"--method {method!r}: expected one of auto, one, few, euler")
    r, model = locate(_recipe(recipe, set_) if recipe is not None else None, model, set_)
    folder, _ = run_sample(
        texts,
        recipe=r,
        model=model,
        num_images=num_images,
        out=out,
        quiet=quiet,
        size=size,
        steps=steps,
        method=method,
        guidance=guidance,
        seed=seed,
        batch=batch,
    )
    typer.echo(f"wrote {len(texts) * num_images} images and grid.png to {folder}")


@app.command("merge-lora")
@handle_errors
def merge_lora_cmd(
    lora: Annotated[Path, typer.Option("--lora", help="a LoRA run folder (base from its recipe) or a LoRA folder")],
    out: Annotated[Path, typer.Option("--out", help="output model folder (written atomically)")],
    base: Annotated[Optional[str], typer.Option("--base", help="base model folder / hub id / tiny:<preset>")] = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help="fp32 | bf16 | fp16 (merged in fp32, cast at the end)")
    ] = "fp32",
    tolerance: Annotated[
        float, typer.Option("--tolerance", help="max relative velocity difference merged vs adapter")
    ] = 1e-4,
    keep_scheduler: Annotated[
        bool,
        typer.Option("--keep-scheduler", help="keep the base scheduler's shift_terminal (NaN at 1 step in diffusers)"),
    ] = False,
) -> None:
    """Merge a LoRA into its base: a plain diffusers model folder, checked for parity before it is kept."""
    from apexctl.merge import merge_lora

    info = merge_lora(lora, out, base=base, dtype=dtype, tolerance=tolerance, one_step_scheduler=not keep_scheduler)
    typer.echo(
        f"merged {info['lora']} into {info['base']} → {info['out']} ({info['dtype']}, parity {info['parity_rel_err']:.1e})"
    )


@app.command("export")
@handle_errors
def export_cmd(
    run: Annotated[Path, typer.Argument(help="a run folder (output.dir of the recipe)")],
    checkpoint: Annotated[
        str, typer.Option("--checkpoint", help="latest | step-N | N | a checkpoint folder (complete ones only)")
    ] = "latest",
    weights: Annotated[str, typer.Option("--weights", help="ema | live (ema needs train.ema_decay)")] = "ema",
    out: Annotated[
        Optional[Path], typer.Option("--out", help="output folder (default RUN/exports/step-N-<lora|model>-<weights>)")
    ] = None,
) -> None:
    """Write the LoRA (LoRA runs, in the recipe's formats) or the model folder (full runs) of any checkpoint."""
    from apexctl.export import export_checkpoint

    folder = export_checkpoint(run, checkpoint, weights, out)  # type: ignore[arg-type]
    typer.echo(f"exported {checkpoint} ({weights} weights) of {run} → {folder}")


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
        from apexctl.eval import run_digits

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


@eval_app.command("geneval")
@handle_errors
def eval_geneval(
    images: Annotated[
        Optional[Path],
        typer.Option(
            "--images", help="image folder, reference layout NNNNN/samples/00000.png (default RUN/eval/geneval)"
        ),
    ] = None,
    generate: Annotated[
        bool, typer.Option("--generate/--no-generate", help="generate missing images (existing ones are kept)")
    ] = True,
    score: Annotated[bool, typer.Option("--score/--no-score", help="score the image folder")] = True,
    recipe: Annotated[
        Optional[Path], typer.Option("--recipe", help="generate with this recipe's trained model")
    ] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="model folder, hub id or tiny:<preset>")] = None,
    lora: Annotated[
        Optional[Path], typer.Option("--lora", help="a LoRA run folder, or a LoRA folder (base from --model)")
    ] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="sampling steps (default: recipe)")] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="auto | one | few | euler")] = None,
    guidance: Annotated[Optional[float], typer.Option("--guidance", min=1.0, help="classifier-free guidance")] = None,
    seed: Annotated[int, typer.Option("--seed", help="image k of every prompt uses seed + k")] = 42,
    per_prompt: Annotated[int, typer.Option("--per-prompt", min=1, help="images per prompt (GenEval: 4)")] = 4,
    size: Annotated[Optional[int], typer.Option("--size", min=8, help="image height = width (default: recipe)")] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="images per generation batch")] = 16,
    prompts: Annotated[
        Optional[str], typer.Option("--prompts", help="a subset, e.g. 0:50 or 3,17,40 (reported as partial)")
    ] = None,
    detector: Annotated[
        Optional[str], typer.Option("--detector", help="hf-mask2former weights: a local folder (or cached hub id)")
    ] = None,
    detections: Annotated[
        Optional[Path], typer.Option("--detections", help="score a detections JSONL from any detector instead")
    ] = None,
    clip: Annotated[Optional[str], typer.Option("--clip", help="CLIP folder for the colour tasks")] = None,
    option: Annotated[
        Optional[list[str]], typer.Option("--option", help="scoring option key=value (the reference's --options)")
    ] = None,
    allow_partial: Annotated[
        bool, typer.Option("--allow-partial", help="score an incomplete folder (the report lists what is missing)")
    ] = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="results folder (default: the image folder)")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cuda | cpu (default: cuda if present)")] = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """GenEval: the 553 prompts × 4 images (resumable), scored as the reference does; per-task table like Table 2."""
    from apexctl.eval.geneval_prompts import parse_prompt_selection
    from apexctl.eval.geneval_score import Options
    from apexctl.eval.run_geneval import check_scoring_inputs, score_geneval

    if not generate and not score:
        raise BadInput("nothing to do: --no-generate and --no-score")
    if method is not None and method not in ("auto", "one", "few", "euler"):
        raise BadInput(f"--method {method!r}: expected one of auto, one, few, euler")
    selection = parse_prompt_selection(prompts)
    opts = Options.parse(option)
    if score:  # before generation: a missing weight folder should not surface hours later
        check_scoring_inputs(detector=detector, detections=detections, clip=clip, selection=selection)
    name = None
    if generate:
        from apexctl.eval.geneval_generate import generate_geneval
        from apexctl.inference import ModelInfo, is_distilled, load_sampling_model, locate, model_info
        from apexctl.inference import resolve_sample_settings as resolve
        from apexctl.inference.models import samples_trained

        source = {"recipe": str(recipe) if recipe else None, "model": model, "lora": str(lora) if lora else None}
        name = model or str(lora or recipe)
        r = _recipe(recipe, set_) if recipe is not None else None
        if r is None and lora is not None and (lora / "recipe.yaml").is_file():
            r = _recipe(lora / "recipe.yaml", set_)
        if lora is None:  # --model RUN(/model): that run's recipe; nothing: the newest run
            r, model = locate(r, model, set_)
        if images is None:
            if lora is not None and (lora / "lora").is_dir():
                images = lora / "eval" / "geneval"
            elif model is None and r is not None:
                images = Path(r.output.dir) / "eval" / "geneval"
            elif model is not None and Path(model).is_dir():
                images = Path(model).parent / "eval" / "geneval"
            else:
                images = Path("geneval")
        loaded: list = []

        def load_backbone():
            if not loaded:
                loaded.append(load_sampling_model(r, model, lora).backbone)
            return loaded[0]

        info = ModelInfo(distilled=samples_trained(r, model, lora) and is_distilled(r))
        if size is None and r is None:  # only the model's own configs can tell its size
            info = model_info(load_backbone(), distilled=info.distilled)
        s = resolve(
            r, info, size=size, steps=steps, method=method, guidance=guidance, seed=seed, batch=batch, what=name
        )
        settings = {"source": source, "steps": s.steps, "method": s.method, "guidance": s.guidance, "seed": s.seed}
        settings.update({"height": s.height, "width": s.width, "negative_prompt": s.negative_prompt})
        stats = generate_geneval(
            images,
            selection,
            load_backbone=load_backbone,
            settings=settings,
            per_prompt=per_prompt,
            sample=s,
            quiet=quiet,
        )
        typer.echo(f"geneval images in {images}: {stats['generated']} generated, {stats['kept']} kept")
    elif images is None:
        raise BadInput("--images DIR is needed with --no-generate")
    if score:
        score_geneval(
            images,
            selection=selection,
            per_prompt=per_prompt,
            detector=detector,
            detections=detections,
            clip=clip,
            options=opts,
            allow_partial=allow_partial,
            out=out,
            device=device,
            name=name,
            quiet=quiet,
        )


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
    quiet: QuietOpt = False,
) -> None:
    """FID (torchmetrics, FID Inception-v3) of generated vs reference images; either side a folder or drawn from RUN."""
    from apexctl.eval.run_fid import run_eval_fid

    run_eval_fid(
        run,
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
    )


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
    quiet: QuietOpt = False,
) -> None:
    """CLIP score (torchmetrics) of images against their prompts: --images folders, or the run's student on --prompts."""
    from apexctl.eval.run_clip_score import run_eval_clip_score

    run_eval_clip_score(
        run,
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
    )


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
    from apexctl.eval.report import write_report

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


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except ApexError as exc:  # errors raised outside a command body
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
