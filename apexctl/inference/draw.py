"""A list of images to draw into PNG files — on one process or split across the ranks of a launched job, resumably.

Job j is (file, prompt, seed). The jobs whose file is missing — listed by every rank before any rank draws — are
cut into units of ``batch`` consecutive jobs, and rank r draws units r, r + N, … (apexctl/ranks.py), each as one
batch. The cut depends on the job list, the files present and ``batch``, never on the number of processes: every
image comes out of the same batch as in a one-process run of the same command on the same folder (the same
numbers, not merely the same seed), and a rerun after a kill draws only the missing files. Each PNG is written
atomically: a file under its name is complete.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apexctl.ranks import Ranks


@dataclass(frozen=True)
class ImageJob:
    """One image: where it goes, its prompt and its seed."""

    path: Path
    prompt: str
    seed: int


def units(jobs: Sequence[ImageJob], batch: int) -> list[list[ImageJob]]:
    """``jobs`` in consecutive units of ``batch`` (the last one shorter)."""
    return [list(jobs[i : i + batch]) for i in range(0, len(jobs), batch)]


def pending_units(jobs: Sequence[ImageJob], batch: int, ranks: Ranks) -> list[list[ImageJob]]:
    """This rank's share of the units of the jobs whose file is missing."""
    return ranks.share(units([j for j in jobs if not j.path.is_file()], batch))


def draw_jobs(
    jobs: Sequence[ImageJob],
    *,
    load: Callable[[], Any],
    sampler_kwargs: dict[str, Any],
    batch: int,
    ranks: Ranks,
    label: str = "sample",
    quiet: bool = False,
    before_drawing: Callable[[], None] | None = None,
) -> int:
    """Draw every job whose file is missing; returns how many images all ranks drew.

    ``load()`` gives the Backbone; it is called (and the model moved to the rank's device) only on a rank with
    work. ``before_drawing`` runs on rank 0 once every rank with work has loaded its model (e.g. to record the
    settings), and only when there is something to draw. Every rank returns after all have finished.
    """
    from apexctl.images import save_png
    from apexctl.inference import generate_images  # the package attribute: tests may replace it
    from apexctl.progress import progress

    mine = pending_units(jobs, batch, ranks)
    total = sum(ranks.gather(sum(len(u) for u in mine)))  # also: no rank draws before every rank has listed
    if total == 0:
        return 0
    model = load().to(ranks.device) if mine else None
    ranks.barrier()  # every model has loaded: a load failure stops the job before anything is recorded
    if ranks.main and before_drawing is not None:
        before_drawing()
    kwargs = {**sampler_kwargs, "batch": batch}
    with progress(quiet or not ranks.main) as bar:
        task = bar.add_task(label, total=sum(len(u) for u in mine))
        for unit in mine:
            images = generate_images(model, [j.prompt for j in unit], [j.seed for j in unit], quiet=True, **kwargs)
            for job, img in zip(unit, images, strict=True):
                save_png(img, job.path)
            bar.advance(task, len(unit))
    del model
    release_memory()
    ranks.barrier()
    return total


def release_memory() -> None:
    """Give a dropped model's memory back (student and teacher may each be a 20B model: never hold both)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
