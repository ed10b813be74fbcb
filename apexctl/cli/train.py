"""``apexctl prepare`` and ``apexctl distill``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from apexctl.cli.common import LaunchOpt, QuietOpt, RecipeArg, SetOpt, _recipe, app, handle_errors, relaunched


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
    launch: LaunchOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Encode the recipe's data source (prompts + images) once into the latent cache (data.cache_dir).

    Resumable: rerun after an interruption (with any --launch) and only the unfinished shards are written."""
    r = _recipe(recipe, set_)
    if not verify and relaunched(launch):
        return
    if verify:
        from apexctl.data.prepare import verify as verify_cache

        cache = verify_cache(r.data.cache_dir)
        n = len(cache.manifest["shards"]["images"]) + len(cache.manifest["shards"]["prompts"])
        typer.echo(f"cache {r.data.cache_dir}: {n} shards verified (sha256), {len(cache)} pairs")
        return
    from apexctl.data.prepare import prepare as run_prepare
    from apexctl.data.report import read_report
    from apexctl.launch import is_rank_zero

    out = run_prepare(r, quiet=quiet, limit=limit)
    if not is_rank_zero():
        return
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
        extra = ["--set", f"hardware.processes={launch}"]
        rc = relaunch(launch, run=Path(r.output.dir), extra=extra, echo=lambda m: typer.echo(m, err=True))
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
