"""The GenEval benchmark definition shipped inside apexctl (``data/``, MIT, © 2023 Dhruba Ghosh).

- 553 prompts (``evaluation_metadata.jsonl``, one JSON object per line: ``tag``, ``include``, optional ``exclude``,
  ``prompt``); per tag 80 single_object, 99 two_object, 80 counting, 94 colors, 100 position, 100 color_attr.
- 80 COCO class names in mmdetection order (``object_names.txt``), 10 colours, 6 tasks in the paper's column order.
- ``parse_prompt_selection("0:3")`` → prompt indices (Python slice or comma list), used by ``--prompts``.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from apexctl.errors import BadInput

NUM_PROMPTS = 553
IMAGES_PER_PROMPT = 4
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
#: task tag → column header of the paper's Table 2, in that table's order
TASKS: dict[str, str] = {
    "single_object": "Single",
    "two_object": "Two",
    "counting": "Counting",
    "colors": "Colors",
    "position": "Position",
    "color_attr": "Attr.",
}
TAG_COUNTS = {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100, "color_attr": 100}


def _data(name: str) -> str:
    return resources.files("apexctl.eval.geneval").joinpath("data", name).read_text(encoding="utf-8")


@cache
def _prompts() -> tuple[str, ...]:
    return tuple(line for line in _data("evaluation_metadata.jsonl").splitlines() if line.strip())


def load_prompts() -> list[dict[str, Any]]:
    """The 553 metadata dicts, in file order (index i ↔ image folder ``f"{i:05d}"``); fresh copies each call."""
    rows = [json.loads(line) for line in _prompts()]
    assert len(rows) == NUM_PROMPTS, len(rows)
    return rows


@cache
def class_names() -> tuple[str, ...]:
    """The 80 COCO class names in mmdetection order (GenEval's ``object_names.txt``)."""
    names = tuple(line.strip() for line in _data("object_names.txt").splitlines() if line.strip())
    assert len(names) == 80, len(names)
    return names


def parse_prompt_selection(spec: str | None) -> list[int]:
    """``None`` → all 553; ``"a:b"`` / ``"a:b:s"`` (Python slice) or ``"3,17,40"`` → sorted unique indices."""
    if spec is None or not spec.strip():
        return list(range(NUM_PROMPTS))
    s = spec.strip()
    try:
        if ":" in s:
            parts = [int(p) if p.strip() else None for p in s.split(":")]
            if len(parts) > 3:
                raise ValueError
            picked = list(range(NUM_PROMPTS))[slice(*parts)]
        else:
            picked = [int(p) for p in s.split(",") if p.strip()]
    except ValueError:
        raise BadInput(f"--prompts {spec!r}: expected a slice like 0:50 or a list like 3,17,40") from None
    bad = [i for i in picked if not 0 <= i < NUM_PROMPTS]
    if bad or not picked:
        raise BadInput(f"--prompts {spec!r}: indices must lie in 0..{NUM_PROMPTS - 1} (got {bad or 'none'})")
    return sorted(set(picked))
