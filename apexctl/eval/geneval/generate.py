"""GenEval generation: the selected prompts × ``per_prompt`` images in the reference layout, resumable.

- Image k of every prompt uses seed ``seed + k`` (default 42…45: the reference resets the seed to 42 before each
  prompt, so image k of every prompt starts from the same noise there too). Seeds are recorded per image in
  ``NNNNN/seeds.json`` (``{"00000.png": 42, …}``); the run's settings in ``ROOT/generation.json``.
- Resumable: images already on disk are kept and not regenerated; a rerun with different settings (model, steps,
  guidance, size, seed, …) is refused rather than mixing two models' images in one folder (the settings are
  recorded once the model has loaded, so a failed first try does not pin them).
- Batched across prompts (``batch`` images per forward); each PNG and JSON file is written atomically, so an
  interrupted run leaves only whole files.
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
    quiet: bool = False,
) -> dict[str, int]:
    """Write the missing images (image k of a prompt: ``sample.seed + k``; ``sample.batch`` per forward); returns
    ``{"generated": n, "kept": m}``. The model is loaded only if needed."""
    from apexctl.images import save_png
    from apexctl.inference import generate_images
    from apexctl.progress import progress

    seed, batch = sample.seed, sample.batch
    prompts = load_prompts()
    root.mkdir(parents=True, exist_ok=True)
    settings = _check_settings(root, settings)
    for i in selection:
        _prepare_folder(root, i, prompts[i])
    todo = [
        (i, k)
        for i in selection
        for k in range(per_prompt)
        if not (prompt_dir(root, i) / "samples" / image_name(k)).is_file()
    ]
    kept = len(selection) * per_prompt - len(todo)
    if not todo:
        return {"generated": 0, "kept": kept}
    backbone = load_backbone()
    write_text(root / GENERATION_FILE, json.dumps(settings, indent=1) + "\n")  # recorded once the model loaded
    with progress(quiet) as bar:
        task = bar.add_task("geneval", total=len(todo))
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            images = generate_images(
                backbone,
                [prompts[i]["prompt"] for i, _ in chunk],
                [seed + k for _, k in chunk],
                quiet=True,
                **sample.sampler_kwargs(),
            )
            touched: dict[int, dict[str, int]] = {}
            for (i, k), img in zip(chunk, images, strict=True):
                save_png(img, prompt_dir(root, i) / "samples" / image_name(k))
                touched.setdefault(i, {})[image_name(k)] = seed + k
            for i, new in touched.items():  # seeds after the images: a recorded seed always has its image
                path = prompt_dir(root, i) / SEEDS_FILE
                old = json.loads(path.read_text()) if path.is_file() else {}
                write_text(path, json.dumps(dict(sorted({**old, **new}.items())), indent=1) + "\n")
            bar.advance(task, len(chunk))
    return {"generated": len(todo), "kept": kept}
