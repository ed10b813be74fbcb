"""GenEval generation: the selected prompts × ``per_prompt`` images in the reference layout, resumable.

- Image k of every prompt uses seed ``seed + k`` (default 42…45: the reference resets the seed to 42 before each
  prompt, so image k of every prompt starts from the same noise there too). Seeds are recorded per image in
  ``NNNNN/seeds.json`` (``{"00000.png": 42, …}``); the run's settings in ``ROOT/generation.json``.
- Resumable: images already on disk are kept and not regenerated; a rerun with different settings (model, steps,
  guidance, size, seed, …) is refused rather than mixing two models' images in one folder (the settings are
  recorded once the model has loaded, so a failed first try does not pin them).
- Batched across prompts (``batch`` images per forward); each PNG and JSON file is written atomically, so an
  interrupted run leaves only whole files. On N processes the batches are split across them (inference/draw.py);
  rank 0 writes the folders' JSON files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apexctl.atomic import write_text
from apexctl.errors import BadInput
from apexctl.eval.geneval.layout import image_name, prompt_dir
from apexctl.eval.geneval.prompts import load_prompts
from apexctl.ranks import Ranks

if TYPE_CHECKING:
    from apexctl.inference.settings import SampleSettings

GENERATION_FILE = "generation.json"
SEEDS_FILE = "seeds.json"


def _check_settings(root: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The settings to record; refused if they differ from those of images already in ``root``."""
    path = root / GENERATION_FILE
    if not path.is_file() or not any(root.glob("[0-9]*/samples/*.png")):
        return settings  # nothing generated yet (e.g. a first try failed to load the model): no constraint
    old = json.loads(path.read_text())
    old.setdefault("quantize", "none")  # folders from before --quantize were drawn on the unquantised base
    diff = [k for k in settings if k in old and old[k] != settings[k]]
    if diff:
        k = diff[0]
        raise BadInput(
            f"{root} was generated with {k}={old[k]!r}, this run asks {k}={settings[k]!r}: "
            "use another --images folder, or the same settings to resume"
        )
    return {**old, **settings}


def _prepare_folder(root: Path, index: int, meta: dict[str, Any]) -> None:
    """``NNNNN/metadata.jsonl`` exactly as the reference writes it (``json.dump(metadata)``, one line, no newline)."""
    folder = prompt_dir(root, index)
    path = folder / "metadata.jsonl"
    if path.is_file():
        if json.loads(path.read_text()) != meta:
            raise BadInput(f"{path}: holds another prompt than GenEval's prompt {index}; use an empty --images folder")
        return
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(meta))


def generate_geneval(
    root: Path,
    selection: list[int],
    *,
    load_backbone: Callable[[], Any],
    settings: dict[str, Any],
    per_prompt: int,
    sample: SampleSettings,
    ranks: Ranks | None = None,
    quiet: bool = False,
) -> dict[str, int]:
    """Write the missing images (image k of a prompt: ``sample.seed + k``; ``sample.batch`` per forward), split
    across ``ranks`` (inference/draw.py: the same images on any number of processes); returns
    ``{"generated": n, "kept": m}``. The model is loaded only if needed."""
    from apexctl.inference.draw import ImageJob, draw_jobs

    ranks = ranks or Ranks()
    seed = sample.seed
    prompts = load_prompts()
    if ranks.main:
        root.mkdir(parents=True, exist_ok=True)
        settings = _check_settings(root, settings)
        for i in selection:
            _prepare_folder(root, i, prompts[i])
    ranks.barrier()  # a refused resume stops rank 0 here, and the launcher stops the others
    jobs = [
        ImageJob(prompt_dir(root, i) / "samples" / image_name(k), prompts[i]["prompt"], seed + k)
        for i in selection
        for k in range(per_prompt)
    ]

    def record() -> None:  # once the models have loaded, so a failed first try does not pin the settings
        write_text(root / GENERATION_FILE, json.dumps(settings, indent=1) + "\n")

    generated = draw_jobs(
        jobs,
        load=load_backbone,
        sampler_kwargs=sample.sampler_kwargs(),
        batch=sample.batch,
        ranks=ranks,
        label="geneval",
        quiet=quiet,
        before_drawing=record,
    )
    if ranks.main:  # seeds after the images: a recorded seed always has its image
        for i in selection:
            seeds = {
                image_name(k): seed + k
                for k in range(per_prompt)
                if (prompt_dir(root, i) / "samples" / image_name(k)).is_file()
            }
            path = prompt_dir(root, i) / SEEDS_FILE
            old = json.loads(path.read_text()) if path.is_file() else {}
            if {**old, **seeds} != old:
                write_text(path, json.dumps(dict(sorted({**old, **seeds}.items())), indent=1) + "\n")
    return {"generated": generated, "kept": len(jobs) - generated}
