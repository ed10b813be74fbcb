"""``train()``: setup → steps (log, grid, checkpoint) → export, under the run folder's lock (docs/design.md §6).

A kill at any moment followed by ``--resume auto`` ends bit-identical to an uninterrupted run: every piece of
state lives in the checkpoint, and the rows logged after it are dropped on resume. SIGINT/SIGTERM finish the
current step, checkpoint and exit cleanly.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from apexctl.atomic import write_text
from apexctl.errors import BadInput
from apexctl.recipe import Recipe
from apexctl.training import checkpoint as ckpt
from apexctl.training.diagnostics import critic_lag
from apexctl.training.grids import sample_grid
from apexctl.training.hardware import check_world, gather, make_accelerator, stop_everywhere
from apexctl.training.lock import RunLock
from apexctl.training.metrics import MetricsLog, WallClock, require_tracker_package, write_run_info
from apexctl.training.optim import require_optimizer_package
from apexctl.training.session import export, require_packages, run_dir, setup
from apexctl.training.state import Session
from apexctl.training.step import train_step


def train(recipe: Recipe, *, resume: str | None = None, until: int | None = None, quiet: bool = False) -> Path:
    """Train per ``recipe``; returns the run folder. ``resume``: None | "auto" | a checkpoint folder.
    ``until``: stop after this step (checkpointed), to be resumed later."""
    clock = WallClock(time.perf_counter())
    require_optimizer_package(recipe)
    require_tracker_package(recipe)
    require_packages(recipe)  # before the lock: a missing library leaves no run folder
    acc = make_accelerator(recipe)
    check_world(recipe, acc.num_processes)  # before the lock and any loading: a wrong launch is bad input
    lock = _lock(acc, run_dir(recipe))
    try:
        sess = setup(recipe, acc)
        clock.resumed(ckpt.resume_from(sess, resume))
        return _loop(sess, clock, until=until, quiet=quiet)
    finally:
        if lock is not None:
            lock.release()


def _loop(sess: Session, clock: WallClock, *, until: int | None, quiet: bool) -> Path:
    from apexctl.progress import progress

    recipe, acc = sess.recipe, sess.acc
    tr, run, counter = recipe.train, sess.run, sess.counter
    log = MetricsLog(sess)
    if sess.main:
        run.mkdir(parents=True, exist_ok=True)
        write_text(run / "recipe.yaml", recipe.dump())
        log.truncate_after(counter.step)
        for aside in ckpt.set_aside_after(run, counter.step):
            ckpt.warn(f"{aside.name}: a checkpoint past step {counter.step}, from the run this one replaces; set aside")
    acc.wait_for_everyone()
    sess.last_good = ckpt.latest_checkpoint(run)
    stop_at = min(tr.steps, until) if until is not None else tr.steps
    try:
        with _Stop() as stop, progress(quiet or not sess.main) as bar:
            task = bar.add_task(f"{recipe.method.objective}", total=tr.steps, completed=counter.step)
            while counter.step < stop_at:
                out = train_step(sess)
                step = out.step
                diag = (
                    tr.diag_every is not None
                    and step % tr.diag_every == 0
                    and recipe.method.objective != "flow_matching"
                )
                if step % tr.log_every == 0 or step == stop_at or diag:
                    rec = log.record(out)
                    if diag:  # a row of its own when the step is not a logged one
                        rec["diag/critic_lag"] = critic_lag(sess)
                    log.write(rec)
                if tr.sample_every is not None and (step % tr.sample_every == 0 or step == tr.steps):
                    log.image(sample_grid(sess, step), step)
                desc = (
                    f"{recipe.method.objective} loss {out.loss:.4f} · {sess.global_batch / out.seconds:.0f} samples/s"
                )
                bar.update(task, completed=step, description=desc)
                stop_now = stop_everywhere(acc, stop.requested)
                if step % tr.checkpoint_every == 0 or step == stop_at or stop_now:
                    sess.last_good = (step, ckpt.save_checkpoint(sess, step, clock.marker()))
                if stop_now:
                    acc.print(
                        f"stopped at step {step} on {stop.signal or 'request'}; checkpoint {sess.last_good[1]}; "
                        f"continue with --resume auto"
                    )
                    write_run_info(sess, clock)
                    return run
    finally:
        log.close()

    if counter.step >= tr.steps:
        export(sess)
    write_run_info(sess, clock)
    acc.wait_for_everyone()
    return run


class _Stop:
    """SIGINT/SIGTERM: finish the current step, checkpoint, exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self.signal: str | None = None
        self._old: dict = {}

    def __enter__(self) -> _Stop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners)
                pass
        return self

    def _handle(self, signum, _frame) -> None:
        self.requested = True
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _lock(acc, run: Path) -> RunLock | None:
    """Rank 0 takes the run folder's lock; every rank learns whether it got it (one message, same exit code)."""
    lock, err = None, None
    if acc.is_main_process:
        try:
            lock = RunLock(run).acquire()
        except BadInput as exc:
            err = str(exc)
    err = gather(acc, err)[0]
    if err is not None:
        raise BadInput(err)
    if lock is not None and lock.warning:
        ckpt.warn(lock.warning)
    return lock
