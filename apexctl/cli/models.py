"""``apexctl sample``, ``merge-lora`` and ``export``: images and model folders from a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from apexctl.cli.common import (
    LaunchOpt,
    QuantizeOpt,
    QuietOpt,
    SetOpt,
    _recipe,
    app,
    check_quantize,
    handle_errors,
    relaunched,
)
from apexctl.errors import BadInput, read_text


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
    quantize: QuantizeOpt = "none",
    set_: SetOpt = None,
    launch: LaunchOpt = None,
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
    from apexctl.inference.settings import check_method

    check_method(method, guidance)  # before anything loads
    check_quantize(quantize)
    if relaunched(launch):
        return
    r, model = locate(_recipe(recipe, set_) if recipe is not None else None, model, set_)
    folder, _ = run_sample(
        texts,
        recipe=r,
        model=model,
        num_images=num_images,
        out=out,
        quiet=quiet,
        quantize=quantize,
        size=size,
        steps=steps,
        method=method,
        guidance=guidance,
        seed=seed,
        batch=batch,
    )
    from apexctl.launch import is_rank_zero

    if is_rank_zero():
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
