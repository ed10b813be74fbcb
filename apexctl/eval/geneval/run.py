"""``apexctl eval geneval`` scoring: image folder → detections → per-image correctness → summary, table, grids.

Outputs in ``out`` (written atomically): ``results.jsonl`` (one row per image with the reference's columns
``filename`` (relative to the image folder), ``tag``, ``prompt``, ``correct``, ``reason``, ``metadata`` (JSON
string), ``details`` (JSON string of kept boxes + scores), plus ``index`` and ``seed`` when recorded),
``summary.json`` and ``grid_<task>.png``. The completeness check runs before any model is loaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from apexctl.atomic import write_text
from apexctl.errors import BadInput
from apexctl.eval.geneval.layout import format_indices, scan
from apexctl.eval.geneval.prompts import IMAGES_PER_PROMPT, NUM_PROMPTS, load_prompts
from apexctl.eval.geneval.score import Options, score_image, summarize

BACKEND_LABELS = {
    "hf-mask2former": "GenEval (HF-Mask2Former backend)",
    "detections-file": "GenEval (detections file)",
}


def _needs_color(meta: dict[str, Any]) -> list[str]:
    return [req["class"] for req in meta.get("include", []) if "color" in req]


def check_scoring_inputs(
    *, detector: str | None, detections: Path | None, clip: str | None, selection: list[int]
) -> None:
    """Fail fast (before hours of generation) when a required weight folder or file is not given or absent."""
    from apexctl.eval.clip.model import DEFAULT_CLIP
    from apexctl.eval.geneval.detect import DEFAULT_DETECTOR

    if detections is not None:
        if not Path(detections).is_file():
            raise BadInput(f"--detections {detections}: no such file")
        return  # whether CLIP is needed depends on the file's colours: checked when scoring
    if detector is None:
        raise BadInput(
            f"scoring needs a detector: download {DEFAULT_DETECTOR} (e.g. `hf download {DEFAULT_DETECTOR} "
            "--local-dir DIR`) and pass --detector DIR, or pass --detections FILE.jsonl (or --no-score)"
        )
    prompts = load_prompts()
    if clip is None and any(_needs_color(prompts[i]) for i in selection):
        raise BadInput(
            f"the colour tasks need CLIP: download {DEFAULT_CLIP} (e.g. `hf download {DEFAULT_CLIP} --local-dir DIR`) "
            "and pass --clip DIR"
        )


def score_geneval(
    root: Path,
    *,
    selection: list[int],
    per_prompt: int = 4,
    detector: str | None = None,
    detections: Path | None = None,
    clip: str | None = None,
    options: Options = Options(),
    allow_partial: bool = False,
    out: Path | None = None,
    device: str | None = None,
    name: str | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Score ``root`` (reference layout); returns the summary (also written to ``out/summary.json``)."""
    from rich.console import Console

    from apexctl.eval.geneval.report import format_table, notes, save_task_grids
    from apexctl.progress import progress

    prompts = load_prompts()
    sc = scan(root, prompts, selection, per_prompt)
    if not sc.complete and not allow_partial:
        raise BadInput(
            f"{root}: incomplete GenEval set, {sc.describe_missing()}; generate them (rerun with generation) "
            "or pass --allow-partial"
        )
    check_scoring_inputs(detector=detector, detections=detections, clip=clip, selection=selection)
    todo = [(i, p) for i in selection for p in sc.images.get(i, [])]
    rel = {p: p.relative_to(root).as_posix() for _, p in todo}

    backend = "detections-file" if detections is not None else "hf-mask2former"
    dets_file = det_model = None
    need_clip = False
    if detections is not None:
        from apexctl.eval.geneval.detect import DetectionsFile

        dets_file = DetectionsFile(detections)
        absent = sorted({i for i, p in todo if not dets_file.has(rel[p])})
        if absent:
            raise BadInput(
                f"--detections {detections}: no line for the images of prompt(s) {format_indices(absent)} "
                f"(e.g. {next(rel[p] for i, p in todo if i == absent[0])})"
            )
        need_clip = any(not dets_file.colors_complete(rel[p], _needs_color(sc.metadata[i])) for i, p in todo)
    else:
        from apexctl.eval.geneval.detect import Mask2FormerDetector

        det_model = Mask2FormerDetector(
            detector,  # type: ignore[arg-type]
            device=device,
            resize_long=options.resize_long,
            resize_short=options.resize_short,
        )
        need_clip = any(_needs_color(sc.metadata[i]) for i, _ in todo)
    colors = None
    if need_clip:
        from apexctl.eval.clip.model import load_clip
        from apexctl.eval.geneval.color import ClipColors

        colors = ClipColors(load_clip(clip, device=device), bgcolor=options.bgcolor, crop=options.crop)

    seeds: dict[int, dict[str, int]] = {}
    for i in selection:
        f = root / f"{i:05d}" / "seeds.json"
        seeds[i] = json.loads(f.read_text()) if f.is_file() else {}
    results: list[dict[str, Any]] = []
    with progress(quiet) as bar:
        task = bar.add_task("geneval score", total=len(todo))
        for i, path in todo:
            meta = sc.metadata[i]
            with Image.open(path) as im:
                image = ImageOps.exif_transpose(im).convert("RGB")
            if det_model is not None:
                thr = options.counting_threshold if meta["tag"] == "counting" else options.threshold
                raw = det_model(image, min_score=thr)
            else:
                raw = dets_file.raw(rel[path])  # type: ignore[union-attr]

            def classify(found, cls, image=image):
                return colors.classify(image, found, cls)  # type: ignore[union-attr]

            r = score_image(meta, raw, classify if colors is not None else None, options)
            row = {
                "filename": rel[path],
                "index": i,
                "tag": meta["tag"],
                "prompt": meta["prompt"],
                "correct": r["correct"],
                "reason": r["reason"],
                "metadata": json.dumps(meta),
                "details": json.dumps(r["details"]),
            }
            if path.name in seeds[i]:
                row["seed"] = seeds[i][path.name]
            results.append(row)
            bar.advance(task)

    summary = summarize(results)
    gen_file = root / "generation.json"
    summary.update(
        {
            "benchmark": "GenEval",
            "label": BACKEND_LABELS[backend],
            "backend": backend,
            "detector": det_model.source if det_model is not None else None,
            "detections": str(detections) if detections is not None else None,
            "clip": colors.clip.source if colors is not None else None,
            "options": options.public(),
            "images_dir": str(root),
            "per_prompt": per_prompt,
            "selected_prompts": len(selection),
            # the published protocol: all 553 prompts × 4 images
            "complete": sc.complete and len(selection) == NUM_PROMPTS and per_prompt == IMAGES_PER_PROMPT,
            "missing": {
                "prompt_indices": sorted(sc.missing),
                "prompt_indices_text": format_indices(list(sc.missing)),
                "images": sum(sc.missing.values()),
            },
            "task_images": {t: {"found": f, "expected": e} for t, (f, e) in sc.tag_counts.items()},
            "rewritten_prompts": sc.rewritten,
            "generation": json.loads(gen_file.read_text()) if gen_file.is_file() else None,
        }
    )
    folder = out or root
    write_text(folder / "results.jsonl", "".join(json.dumps(r) + "\n" for r in results))
    write_text(folder / "summary.json", json.dumps(summary, indent=1) + "\n")
    grids = save_task_grids(results, root, folder)
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(format_table(summary, name or str(root)))
    for line in notes(summary):
        console.print(line)
    console.print(f"results: {folder / 'results.jsonl'}, {folder / 'summary.json'}; grids: {len(grids)} in {folder}")
    return summary
