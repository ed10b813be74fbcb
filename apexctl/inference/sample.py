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
    **options,
) -> tuple[Path, SampleSettings]:
    """Draw ``num_images`` per prompt (image k of a prompt: seed + k) and save them; ``options`` are the command's
    sample options (``size``, ``steps``, ``method``, ``guidance``, ``seed``, ``batch``; None = not given), resolved
    with the recipe's ``sample`` section by ``resolve_sample_settings``. Returns (folder, settings)."""
    from apexctl.images import save_grid, save_png
    from apexctl.inference import generate_images  # the package attribute: tests may replace it

    path = resolve_model(recipe, model)  # a missing trained model fails before anything loads
    loaded = load_sampling_model(recipe, model)
    info = model_info(loaded.backbone, distilled=loaded.trained and is_distilled(recipe))
    s = resolve_sample_settings(recipe, info, what=path, **options)
    all_prompts = [p for p in prompts for _ in range(num_images)]
    seeds = [s.seed + k for _ in prompts for k in range(num_images)]
    images = generate_images(loaded.backbone, all_prompts, seeds, quiet=quiet, **s.sampler_kwargs())
    if out is not None:
        folder = out
    elif recipe is not None and model is None:
        folder = Path(recipe.output.dir) / "samples"
    else:
        folder = Path(path).parent / "samples" if Path(path).is_dir() else Path("samples")
    folder.mkdir(parents=True, exist_ok=True)
    for i, (p, seed) in enumerate(zip(all_prompts, seeds, strict=True)):
        save_png(images[i], folder / f"{i:03d}_{_slug(p)}_seed{seed}.png")
    upscale = max(1, 64 // min(s.height, s.width))
    save_grid(images, nrow=num_images, path=folder / "grid.png", upscale=upscale, labels=list(prompts))
    record = {"model": loaded.description, **asdict(s), "prompts": prompts, "seeds": seeds}
    write_text(folder / "samples.json", json.dumps(record, indent=1))
    return folder, s
