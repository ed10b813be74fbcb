"""``apexctl eval fid``: FID of generated vs reference images; either side a folder or drawn on the fly from a run.

Generated = ``--generated DIR`` or the run's student on ``--prompts``; reference = ``--reference DIR`` (e.g. the
MJHQ-30K images) or the run's teacher on the same prompts and seeds ("FID to teacher", as pi-Flow reports it).
Writes ``RUN/eval/fid.json`` (or ``--out``; without a run, ``fid.json`` in the generated folder) atomically.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from apexctl.atomic import write_text
from apexctl.errors import BadInput
from apexctl.ranks import job_ranks


def run_eval_fid(
    run: Path | None,
    *,
    generated: Path | None = None,
    reference: Path | None = None,
    inception: Path | None = None,
    prompts_file: Path | None = None,
    num: int | None = None,
    per_prompt: int = 1,
    steps: int = 1,
    teacher_steps: int | None = None,
    teacher_guidance: float | None = None,
    seed: int = 0,
    batch: int = 16,
    out: Path | None = None,
    quiet: bool = False,
    quantize: str = "none",
    check_only: bool = False,
) -> dict[str, Any] | None:
    """Returns the summary (None on a rank > 0 of a launched job: it only helps draw the image sets).
    ``check_only``: check every input (run, prompts, folders, weights) and return None (before a launch)."""
    from rich.console import Console
    from rich.table import Table

    from apexctl.eval.fid import inception as inception_mod
    from apexctl.eval.fid.frechet import fid_between
    from apexctl.eval.fid.inception import load_fid_inception, sha256_file
    from apexctl.eval.imagesets import list_images, read_prompts
    from apexctl.eval.sample_sets import SetSpec, ensure_set, load_run, student_spec, teacher_spec

    # every input is checked before anything slow: run, prompts, folders, then the weights, then drawing
    recipe = load_run(run) if run is not None else None
    prompts = read_prompts(prompts_file, num) if prompts_file is not None else None
    plan: list[tuple[Path | None, SetSpec | None]] = []
    for folder, option, role in ((generated, "--generated", "student"), (reference, "--reference", "teacher")):
        if folder is not None:
            list_images(folder, option)
            plan.append((folder, None))
        elif recipe is None or prompts is None:
            raise BadInput(f"{option} not given: pass {option} DIR, or a RUN and --prompts FILE to draw the {role}")
        elif role == "student":
            plan.append((None, student_spec(recipe, steps, quantize)))
        else:
            plan.append((None, teacher_spec(recipe, teacher_steps, teacher_guidance, quantize)))
    extractor = load_fid_inception(inception, device="cpu")  # on rank 0's device once the images exist
    if check_only:
        return None
    ranks = job_ranks()

    sides: list[tuple[Path, dict[str, Any]]] = []
    for folder, spec in plan:
        if spec is None:
            sides.append((folder, {"source": "folder", "label": str(folder), "path": str(folder)}))
        else:
            path = ensure_set(
                recipe, spec, prompts, per_prompt=per_prompt, seed=seed, batch=batch, ranks=ranks, quiet=quiet
            )
            sides.append(
                (path, {"source": "generated", "label": spec.label, "path": str(path), "settings": asdict(spec)})
            )
    (gen_dir, gen_info), (ref_dir, ref_info) = sides
    if not ranks.main:
        return None
    extractor = extractor.to(ranks.device)
    gen_files, ref_files = list_images(gen_dir, "--generated"), list_images(ref_dir, "--reference")
    t0 = time.perf_counter()
    value = fid_between(gen_files, ref_files, extractor, batch=batch, quiet=quiet)
    import torchmetrics

    summary = {
        "metric": "fid",
        "fid": value,
        "generated": {**gen_info, "n": len(gen_files)},
        "reference": {**ref_info, "n": len(ref_files)},
        "prompts": None if prompts_file is None else {"file": str(prompts_file), "n": len(prompts), "seed": seed},
        "inception": {"path": str(inception), "sha256": sha256_file(Path(inception))},
        "features": f"FID Inception-v3 pool3, 2048-d; bilinear antialiased resize to {inception_mod.INPUT_SIZE}, "
        "(x - 128) / 128",
        "torchmetrics": torchmetrics.__version__,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    dest = out or (Path(run) / "eval" / "fid.json" if run is not None else Path(gen_dir) / "fid.json")
    write_text(dest, json.dumps(summary, indent=1) + "\n")

    table = Table(title="FID ↓")
    for col in ("generated", "reference", "n gen", "n ref", "FID"):
        table.add_column(col, justify="right" if col.startswith(("n ", "FID")) else "left")
    table.add_row(gen_info["label"], ref_info["label"], str(len(gen_files)), str(len(ref_files)), f"{value:.3f}")
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(table)
    console.print(f"summary: {dest}")
    return summary
