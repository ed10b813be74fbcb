"""What a run records about itself, on rank 0: ``RUN/metrics.jsonl`` (one JSON object per logged step), the same
rows and the sample grids in the ``train.log_with`` tracker (:mod:`~apexctl.training.trackers`), and
``RUN/run.json`` (the run's wall time, summed over its resumed segments)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from apexctl.atomic import write_text
from apexctl.recipe import Recipe
from apexctl.training.hardware import gather, peak_memory_mb
from apexctl.training.trackers import Tracker, flat_config, require_package

if TYPE_CHECKING:
    from apexctl.training.state import Session
    from apexctl.training.step import StepOut

RUN_INFO = "run.json"


def require_tracker_package(recipe: Recipe) -> None:
    """Refuse a ``train.log_with`` tracker whose package is missing before anything is loaded (exit 2)."""
    require_package(recipe.train.log_with)


class WallClock:
    """Wall time of a run over all its segments (each ``distill`` invocation: the first and every resume).

    A segment counts from the start of :func:`~apexctl.training.loop.train` (loading, steps, checkpoints, grids,
    export). A resumed segment starts from the total stored in the ``COMPLETE`` marker of the checkpoint it
    resumed from, so work a killed segment did after its last checkpoint (and redid after the resume) is counted
    once. ``known`` is False when that checkpoint predates the record (the total is then a lower bound)."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.before = 0.0
        self.segment = 1
        self.known = True

    def resumed(self, info: dict) -> None:
        """Continue from the ``COMPLETE`` info of the checkpoint just loaded ({}: a fresh start)."""
        if not info:
            return
        self.known = "wall_time_s" in info
        self.before = float(info.get("wall_time_s", 0.0))
        self.segment = int(info.get("segments", 1)) + 1

    def total(self) -> float:
        return self.before + (time.perf_counter() - self.start)

    def marker(self) -> dict:
        """What a checkpoint's ``COMPLETE`` stores for the next segment."""
        out = {"wall_time_s": round(self.total(), 3), "segments": self.segment}
        return out if self.known else out | {"wall_time_known": False}


def write_run_info(sess: Session, clock: WallClock) -> None:
    """``RUN/run.json``: steps done, finished or not, wall time and segments; rewritten at the end of each segment."""
    if not sess.main:
        return
    info = {
        "step": sess.counter.step,
        "steps": sess.recipe.train.steps,
        "finished": sess.counter.step >= sess.recipe.train.steps,
        "wall_time_s": round(clock.total(), 3),
        "wall_time_known": clock.known,  # False: resumed from a checkpoint without the record (a lower bound)
        "segments": clock.segment,
    }
    write_text(sess.run / RUN_INFO, json.dumps(info, indent=1) + "\n")


def read_rows(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl``; a torn line (a kill or a full disk mid-write) is skipped."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


class MetricsLog:
    """``RUN/metrics.jsonl`` (one JSON object per logged step) and the ``train.log_with`` tracker, on rank 0.

    The tracker run continues on a resume (a start at step 0 opens a new one); the resolved recipe is its
    hyperparameters."""

    def __init__(self, sess: Session) -> None:
        self.sess = sess
        self.path = sess.run / "metrics.jsonl"
        self.tracker: Tracker | None = None
        kind, step = sess.recipe.train.log_with, sess.counter.step
        if sess.main and kind != "none":
            config = flat_config(sess.recipe.model_dump(mode="json"))
            self.tracker = Tracker(kind, sess.run, config=config, resume=step > 0, purge_step=step + 1)

    def truncate_after(self, step: int) -> None:
        """Drop rows past ``step`` (a run killed after logging but before its next checkpoint): resumed runs
        append exactly the rows an uninterrupted run would have."""
        if not self.sess.main or not self.path.is_file():
            return
        rows = self.path.read_text().splitlines()
        keep = [json.dumps(r) for r in read_rows(self.path) if r.get("step", 0) <= step]
        if keep != rows:
            write_text(self.path, "".join(r + "\n" for r in keep))

    def record(self, out: StepOut) -> dict:
        sess = self.sess
        sh = sess.shift
        rec = {
            "step": out.step,
            "loss": out.loss,
            **{f"loss/{k}": v for k, v in out.terms.items()},
            "grad_norm": out.grad_norm,
            "lr": sess.sched.get_last_lr()[0],
            "step_time": out.seconds,
            "samples_per_s": sess.global_batch / out.seconds,
        }
        if sh.learnable:
            rec["shift/a"] = float(sh.a.detach().float().mean())
            rec["shift/b"] = float(sh.b.detach().float().mean())
        if sess.recipe.train.skip_nonfinite:
            rec["skipped"] = sess.counter.skipped
            rec["skipped_in_a_row"] = sess.counter.streak
        peaks = gather(sess.acc, peak_memory_mb(sess.acc.device))  # every rank takes part
        rec["peak_mem_mb"] = max(peaks)
        if len(peaks) > 1:
            rec.update({f"peak_mem_mb/rank{r}": v for r, v in enumerate(peaks)})
        return rec

    def write(self, rec: dict) -> None:
        if not self.sess.main:
            return
        # NaN/inf (a skipped step's grad norm) as null: metrics.jsonl stays strict JSON
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.tracker is not None:
            self.tracker.log({k: v for k, v in clean.items() if k != "step"}, rec["step"])

    def image(self, path: Path | None, step: int) -> None:
        """A sample grid (``RUN/samples/step-N.png``; None on the other ranks) to the tracker as an image."""
        if self.tracker is not None and path is not None:
            self.tracker.log_image("samples", path, step)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
