"""The GenEval image folder (reference layout) and its completeness check (notes/geneval.md §3.2).

Layout: ``ROOT/<index:05d>/metadata.jsonl`` (the prompt's metadata line as one JSON object) and
``ROOT/<index:05d>/samples/<k:05d>.png``. Like the reference evaluator, folders whose name is not all digits are
skipped and any file matching ``\\d+\\.png`` in ``samples/`` is an image.

Completeness (the reference has none): every selected prompt needs its folder, a metadata line equal to the
shipped prompt's ``tag`` / ``include`` / ``exclude``, and exactly ``per_prompt`` images; per task that gives
80/99/80/94/100/100 × ``per_prompt`` images (320/396/320/376/400/400 at 4). A different ``prompt`` text with the same
clauses is a rewritten prompt: scored (as the reference would) but listed in the report.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apexctl.errors import BadInput
from apexctl.eval.geneval.prompts import TASKS

IMAGE_RE = re.compile(r"\d+\.png")  # the reference uses re.match: a prefix match


def prompt_dir(root: Path, index: int) -> Path:
    return root / f"{index:05d}"


def image_name(k: int) -> str:
    """The reference generator's name for image k of a prompt (``00000.png``)."""
    return f"{k:05d}.png"


def list_images(folder: Path) -> list[Path]:
    """A prompt folder's images, ordered by number."""
    samples = folder / "samples"
    if not samples.is_dir():
        return []
    found = [p for p in samples.iterdir() if p.is_file() and IMAGE_RE.match(p.name)]
    return sorted(found, key=lambda p: (int(re.match(r"\d+", p.name).group()), p.name))  # type: ignore[union-attr]


def read_metadata(folder: Path) -> dict[str, Any] | None:
    path = folder / "metadata.jsonl"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise BadInput(f"{path}: not one JSON object (the reference writes the prompt's metadata line)") from None


def format_indices(indices: list[int]) -> str:
    """``[0, 1, 2, 7, 9, 10]`` → ``"0-2, 7, 9-10"``."""
    runs: list[list[int]] = []
    for i in sorted(set(indices)):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


@dataclass
class Scan:
    """What a folder holds for the selected prompts."""

    images: dict[int, list[Path]] = field(default_factory=dict)  # index → image paths (complete or not)
    metadata: dict[int, dict[str, Any]] = field(default_factory=dict)
    missing: dict[int, int] = field(default_factory=dict)  # index → images missing (per_prompt if no folder)
    extra: dict[int, int] = field(default_factory=dict)  # index → images beyond per_prompt
    rewritten: list[int] = field(default_factory=list)  # same clauses, different prompt text
    tag_counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # tag → (images found, expected)

    @property
    def complete(self) -> bool:
        return not self.missing

    def describe_missing(self) -> str:
        n = sum(self.missing.values())
        return f"{n} image(s) missing for {len(self.missing)} prompt(s): prompt indices {format_indices(list(self.missing))}"


def scan(root: Path, prompts: list[dict[str, Any]], selection: list[int], per_prompt: int) -> Scan:
    """Check ``root`` against the shipped prompts (module docstring); clause mismatches and extra images are errors."""
    if not root.is_dir():
        raise BadInput(f"--images {root}: no such folder")
    out = Scan()
    mismatched = []
    for i in selection:
        folder = prompt_dir(root, i)
        meta = read_metadata(folder)
        imgs = list_images(folder) if meta is not None else []
        if meta is not None:
            want = prompts[i]
            if any(meta.get(k) != want.get(k) for k in ("tag", "include", "exclude")):
                mismatched.append(i)
                continue
            if meta.get("prompt") != want["prompt"]:
                out.rewritten.append(i)
            out.metadata[i] = meta
        out.images[i] = imgs[:per_prompt]
        if len(imgs) < per_prompt:
            out.missing[i] = per_prompt - len(imgs)
        elif len(imgs) > per_prompt:
            out.extra[i] = len(imgs) - per_prompt
    if mismatched:
        raise BadInput(
            f"{root}: metadata.jsonl of prompt(s) {format_indices(mismatched)} does not match GenEval's prompt "
            "(tag/include/exclude differ): not a GenEval image folder, or the wrong index"
        )
    if out.extra:
        raise BadInput(
            f"{root}: prompt(s) {format_indices(list(out.extra))} have more than {per_prompt} images; "
            "pass the --per-prompt they were generated with"
        )
    for tag in TASKS:
        sel = [i for i in selection if prompts[i]["tag"] == tag]
        if sel:
            out.tag_counts[tag] = (sum(len(out.images.get(i, [])) for i in sel), len(sel) * per_prompt)
    return out
