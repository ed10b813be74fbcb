"""``apexctl eval geneval``: generate (resumable), detect, score, report."""

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
    check_quantize,
    eval_app,
    handle_errors,
    relaunched,
)
from apexctl.errors import BadInput


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
    quantize: QuantizeOpt = "none",
    set_: SetOpt = None,
    launch: LaunchOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """GenEval: the 553 prompts × 4 images (resumable), scored as the reference does; per-task table like Table 2.

    With --launch N the images are drawn on N processes (the same images as on one); rank 0 scores them."""
    from apexctl.eval.geneval.prompts import parse_prompt_selection
    from apexctl.eval.geneval.run import check_scoring_inputs, score_geneval
    from apexctl.eval.geneval.score import Options

    if not generate and not score:
        raise BadInput("nothing to do: --no-generate and --no-score")
    from apexctl.inference.settings import check_method

    check_method(method, guidance)  # before anything loads
    check_quantize(quantize)
    selection = parse_prompt_selection(prompts)
    opts = Options.parse(option)
    if score:  # before generation: a missing weight folder should not surface hours later
        check_scoring_inputs(detector=detector, detections=detections, clip=clip, selection=selection)
    if generate and relaunched(launch):
        return
    from apexctl.ranks import job_ranks

    ranks = job_ranks(device)
    name = None
    if generate:
        from apexctl.eval.geneval.generate import generate_geneval
        from apexctl.inference import ModelInfo, is_distilled, load_sampling_model, locate, model_info
        from apexctl.inference import resolve_sample_settings as resolve
        from apexctl.inference.models import samples_trained

        r = _recipe(recipe, set_) if recipe is not None else None
        if r is None and lora is not None and (lora / "recipe.yaml").is_file():
            r = _recipe(lora / "recipe.yaml", set_)
        given = model
        if lora is None:  # --model RUN(/model): that run's recipe; nothing: the newest run
            r, model = locate(r, model, set_)
        # what is drawn, as the table and generation.json name it: the run folder when locate chose a run
        shown = model or given or (r.output.dir if r is not None and lora is None else None)
        source = {"recipe": str(recipe) if recipe else None, "model": shown, "lora": str(lora) if lora else None}
        name = shown or str(lora or recipe)
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
                loaded.append(load_sampling_model(r, model, lora, quantize=quantize, device=ranks.device).backbone)
            return loaded[0]

        info = ModelInfo(distilled=samples_trained(r, model, lora) and is_distilled(r))
        if size is None and r is None:  # only the model's own configs can tell its size
            info = model_info(load_backbone(), distilled=info.distilled)
        s = resolve(
            r, info, size=size, steps=steps, method=method, guidance=guidance, seed=seed, batch=batch, what=name
        )
        settings = {"source": source, "steps": s.steps, "method": s.method, "guidance": s.guidance, "seed": s.seed}
        settings.update({"height": s.height, "width": s.width, "negative_prompt": s.negative_prompt})
        settings["quantize"] = quantize
        stats = generate_geneval(
            images,
            selection,
            load_backbone=load_backbone,
            settings=settings,
            per_prompt=per_prompt,
            sample=s,
            ranks=ranks,
            quiet=quiet,
        )
        if ranks.main:
            typer.echo(f"geneval images in {images}: {stats['generated']} generated, {stats['kept']} kept")
    elif images is None:
        raise BadInput("--images DIR is needed with --no-generate")
    if score and ranks.main:
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
