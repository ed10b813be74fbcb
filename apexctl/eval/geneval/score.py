"""GenEval scoring, rule for rule as djghosh13/geneval ``evaluation/evaluate_images.py`` and ``summary_scores.py``
(MIT, © 2023 Dhruba Ghosh; notes/geneval.md §3.4). Pure python + numpy: detections in, correctness out.

Per image (``filter_detections`` then ``evaluate``):

1. Threshold: ``COUNTING_THRESHOLD`` (0.9) for every class when the tag is ``counting``, else ``THRESHOLD`` (0.3);
   keep ``score > thr`` (strict), in descending score (``np.argsort(score)[::-1]``, the reference's tie order), at
   most ``MAX_OBJECTS`` (16) per class, then greedy NMS at ``max_overlap`` (1.0 ⇒ disabled; IoU with +1-pixel
   areas). A class with nothing left is absent.
2. ``include`` clauses (AND), in order: ``found`` = the top ``count`` objects of the class; fewer than ``count`` →
   wrong. With ``color``: colours of the found objects (a detection's own ``color`` if it has one, else the CLIP
   classifier) must contain the colour ``count`` times. With ``position`` ``[rel, g]`` (only if still matched):
   group ``g`` must have matched, and every found object must stand in ``rel`` to every object of group ``g``
   (``relative_position``). Each clause appends its found objects (or None if it failed) as the next group.
3. ``exclude`` clauses (OR): ``count`` or more detections of the class (after step 1) → wrong.

``relative_position(A, B)``: centre offset A − B shrunk per axis by ``position_threshold`` (0.1) × the sum of the
two box sizes (towards 0, not past it); all |shrunk| < 1e-3 → no relation (overlapping boxes); otherwise
direction = shrunk / |offset|₂ and each axis component beyond ±0.5 gives left of / right of / above / below
(image y grows downward).

Summary: task accuracy = mean of per-image correctness over the task's images; **overall = unweighted mean of the
task accuracies**; also the micro ``correct_images`` and ``correct_prompts`` (a prompt, grouped by its metadata
string, counts if any of its images is correct).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from apexctl.errors import BadInput
from apexctl.eval.geneval.prompts import COLORS, TASKS

# the reference's relation names, in the order we print them (the reference prints a set: arbitrary order)
RELATIONS = ("left of", "right of", "above", "below")


@dataclass
class Detection:
    """One detected instance: ``box`` = [x1, y1, x2, y2] in image pixels, ``score`` in [0, 1], optional boolean
    ``mask`` (H × W of the image) and optional ``color`` (one of the 10, from an external detector)."""

    box: np.ndarray
    score: float
    mask: np.ndarray | None = None
    color: str | None = None

    def __post_init__(self) -> None:
        self.box = np.asarray(self.box, dtype=np.float64).reshape(-1)[:4]
        self.score = float(self.score)


@dataclass(frozen=True)
class Options:
    """The reference's ``--options`` (same keys and defaults) plus the hf-mask2former input scale."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0  # NMS IoU; 1.0 disables NMS
    position_threshold: float = 0.1
    bgcolor: str = "#999"  # colour crops: background behind the mask ("original" keeps the image)
    crop: str = "1"  # colour crops: "1" crops to the box
    # hf-mask2former only: mmdet's LSJ test pipeline resizes (keep ratio) to fit 1333 × 800, pads to 32
    resize_long: int = 1333
    resize_short: int = 800

    @classmethod
    def parse(cls, items: Sequence[str] | None) -> Options:
        """``["threshold=0.3", ...]`` → Options; an unknown key or bad value is a one-line BadInput."""
        known = [f.name for f in fields(cls)]
        values: dict[str, Any] = {}
        for item in items or []:
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or key not in known:
                raise BadInput(f"--option {item!r}: expected key=value with key in {', '.join(known)}")
            default = getattr(cls, key)
            try:
                values[key] = type(default)(raw.strip())
            except ValueError:
                raise BadInput(f"--option {item!r}: {key} must be a {type(default).__name__}") from None
        return cls(**values)

    def public(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


Detected = dict[str, list[Detection]]
#: (found objects, class name) → one colour name per object
ColorFn = Callable[[list[Detection], str], list[str]]


def compute_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU with the reference's +1-pixel area convention (``area = (x2 − x1 + 1)·(y2 − y1 + 1)``, clipped at 0)."""

    def area(b: Sequence[float]) -> float:
        return max(b[2] - b[0] + 1, 0) * max(b[3] - b[1] + 1, 0)

    inter = area([max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3])])
    union = area(box_a) + area(box_b) - inter
    return inter / union if union else 0


def filter_detections(raw: Mapping[str, Sequence[Detection]], tag: str, opts: Options = Options()) -> Detected:
    """Step 1 of the module docstring: per class threshold (strict), sort, cap at ``max_objects``, NMS."""
    thr = opts.counting_threshold if tag == "counting" else opts.threshold
    detected: Detected = {}
    for cls, dets in raw.items():
        if not dets:
            continue
        scores = np.array([d.score for d in dets], dtype=np.float64)
        order = np.argsort(scores)[::-1]
        order = order[scores[order] > thr]
        keep = order[: opts.max_objects].tolist()
        out: list[Detection] = []
        while keep:
            best = keep.pop(0)
            out.append(dets[best])
            keep = [
                i for i in keep if opts.max_overlap == 1 or compute_iou(dets[best].box, dets[i].box) < opts.max_overlap
            ]
        if out:
            detected[cls] = out
    return detected


def relative_position(a: Detection, b: Detection, position_threshold: float = 0.1) -> set[str]:
    """Relations of A relative to B (module docstring); empty for overlapping boxes."""
    boxes = np.array([a.box, b.box], dtype=np.float64)[:, :4].reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - position_threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def _colors(found: list[Detection], classname: str, classify: ColorFn | None) -> list[str]:
    """A detection's own colour wins (detections file); the rest go to the classifier in one call."""
    need = [d for d in found if d.color is None]
    if need and classify is None:
        raise BadInput(f"colour of a {classname!r} detection is needed but no CLIP is loaded; pass --clip PATH")
    got = iter(classify(need, classname) if need else [])  # type: ignore[misc]
    return [d.color if d.color is not None else next(got) for d in found]


def evaluate(
    metadata: Mapping[str, Any], detected: Detected, classify: ColorFn | None, opts: Options = Options()
) -> tuple[bool, str]:
    """Steps 2–3 of the module docstring; returns (correct, reason) with the reference's reason lines."""
    correct = True
    reason: list[str] = []
    groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        cls, count = req["class"], req["count"]
        matched = True
        found = detected.get(cls, [])[:count]
        if len(found) < count:
            correct = matched = False
            reason.append(f"expected {cls}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = _colors(found, cls, classify)
                if colors.count(req["color"]) < count:
                    correct = matched = False
                    reason.append(
                        f"expected {req['color']} {cls}>={count}, found "
                        + f"{colors.count(req['color'])} {req['color']}; and "
                        + ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
                    )
            if "position" in req and matched:
                rel, target = req["position"]
                if groups[target] is None:
                    correct = matched = False
                    reason.append(f"no target for {cls} to be {rel}")
                else:
                    for obj in found:
                        for tgt in groups[target]:
                            true_rels = relative_position(obj, tgt, opts.position_threshold)
                            if rel not in true_rels:
                                correct = matched = False
                                shown = " and ".join(r for r in RELATIONS if r in true_rels)
                                reason.append(f"expected {cls} {rel} target, found {shown} target")
                                break
                        if not matched:
                            break
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        cls = req["class"]
        if len(detected.get(cls, [])) >= req["count"]:
            correct = False
            reason.append(f"expected {cls}<{req['count']}, found {len(detected[cls])}")
    return correct, "\n".join(reason)


def score_image(
    metadata: Mapping[str, Any],
    raw: Mapping[str, Sequence[Detection]],
    classify: ColorFn | None,
    opts: Options = Options(),
) -> dict[str, Any]:
    """Filter + evaluate one image: ``{"correct", "reason", "details"}``; ``details`` = kept boxes + score per class
    (the reference's ``details`` column)."""
    detected = filter_detections(raw, metadata["tag"], opts)
    correct, reason = evaluate(metadata, detected, classify, opts)
    details = {c: [[*map(float, d.box), d.score] for d in dets] for c, dets in detected.items()}
    return {"correct": bool(correct), "reason": reason, "details": details}


def summarize(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``summary_scores.py``: per-task accuracy, overall = mean over the tasks present, micro image/prompt rates.

    ``results`` rows need ``tag``, ``correct`` and ``metadata`` (the JSON string the prompt is grouped by).
    """
    tasks: dict[str, dict[str, Any]] = {}
    for tag in [*TASKS, *sorted({r["tag"] for r in results} - set(TASKS))]:
        rows = [bool(r["correct"]) for r in results if r["tag"] == tag]
        if rows:
            tasks[tag] = {"accuracy": sum(rows) / len(rows), "correct": sum(rows), "total": len(rows)}
    by_prompt: dict[str, bool] = {}
    for r in results:
        key = r["metadata"] if isinstance(r["metadata"], str) else json.dumps(r["metadata"])
        by_prompt[key] = by_prompt.get(key, False) or bool(r["correct"])
    n = len(results)
    return {
        "overall": float(np.mean([t["accuracy"] for t in tasks.values()])) if tasks else None,
        "tasks": tasks,
        "images": n,
        "prompts": len(by_prompt),
        "correct_images": sum(bool(r["correct"]) for r in results) / n if n else None,
        "correct_prompts": sum(by_prompt.values()) / len(by_prompt) if by_prompt else None,
    }
