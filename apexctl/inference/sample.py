"""``apexctl sample``: prompts → one PNG per image, a grid and ``samples.json``."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

from apexctl.atomic import write_text
from apexctl.inference.models import load_sampling_model, resolve_model
from apexctl.inference.settings import SampleSettings, is_distilled, model_info, resolve_sample_settings
from apexctl.recipe import Recipe


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "empty"


def run_sample(
    prompts: list[str],
    *,
    recipe: Recipe | None,
    model: str | None,
    num_images: int,
    out: Path | None = None,
    quiet: bool = False,
    quantize: str = "none",
    **options,
) -> tuple[Path, SampleSettings]:
    """Draw ``num_images`` per prompt (image k of a prompt: seed + k) and save them; ``options`` are the command's
    sample options (``size``, ``steps``, ``method``, ``guidance``, ``seed``, ``batch``; None = not given), resolved
    with the recipe's ``sample`` section by ``resolve_sample_settings``. Returns (folder, settings).

    In a launched job the images are split across the ranks (inference/draw.py); rank 0 writes the grid and
    ``samples.json``. A rerun with the same model, settings and prompts into the same folder draws only the
    missing images (``samples.json`` is written first with ``"complete": false``); any other rerun draws all. ``quantize``: the
    base's transformer blocks quantised (``--quantize``; recorded in the model's description)."""
    import torch

    from apexctl.images import load_image, save_grid
    from apexctl.inference.draw import ImageJob, draw_jobs
    from apexctl.ranks import job_ranks

    ranks = job_ranks()
    path = resolve_model(recipe, model)  # a missing trained model fails before anything loads
    loaded = load_sampling_model(recipe, model, quantize=quantize, device=ranks.device)
    info = model_info(loaded.backbone, distilled=loaded.trained and is_distilled(recipe))
    s = resolve_sample_settings(recipe, info, what=path, **options)
    all_prompts = [p for p in prompts for _ in range(num_images)]
    seeds = [s.seed + k for _ in prompts for k in range(num_images)]
    if out is not None:
        folder = out
    elif recipe is not None and model is None:
        folder = Path(recipe.output.dir) / "samples"
    else:
        folder = Path(path).parent / "samples" if Path(path).is_dir() else Path("samples")
    jobs = [
        ImageJob(folder / f"{i:03d}_{_slug(p)}_seed{seed}.png", p, seed)
        for i, (p, seed) in enumerate(zip(all_prompts, seeds, strict=True))
    ]
    record = {"model": loaded.description, **asdict(s), "prompts": prompts, "seeds": seeds}
    if ranks.main:
        folder.mkdir(parents=True, exist_ok=True)
        if _read_record(folder) != record:  # other settings: nothing in the folder is this command's image
            for job in jobs:
                job.path.unlink(missing_ok=True)
        write_text(folder / "samples.json", json.dumps({**record, "complete": False}, indent=1))
    ranks.barrier()
    draw_jobs(
        jobs,
        load=lambda: loaded.backbone,
        sampler_kwargs=s.sampler_kwargs(),
        batch=s.batch,
        ranks=ranks,
        quiet=quiet,
    )
    if ranks.main:
        images = torch.stack([load_image(j.path) for j in jobs])
        upscale = max(1, 64 // min(s.height, s.width))
        save_grid(images, nrow=num_images, path=folder / "grid.png", upscale=upscale, labels=list(prompts))
        write_text(folder / "samples.json", json.dumps({**record, "complete": True}, indent=1))
    return folder, s


def _read_record(folder: Path) -> dict | None:
    """The settings ``samples.json`` records (without its completion flag), or None."""
    try:
        old = json.loads((folder / "samples.json").read_text())
    except (OSError, ValueError):
        return None
    old.pop("complete", None)
    return old
