"""Checkpoint folders ``RUN/checkpoints/step-NNNNNN/``: written whole or not at all, pruned whole or not at all, read
back newest-loadable-first (docs/design.md §6).

A checkpoint is accelerate's ``save_state`` folder — ``model.safetensors``, ``optimizer.bin``, one
``random_states_R.pkl`` per rank and one ``custom_checkpoint_I.pkl`` per registered object (LR schedule, pair
sampler, step counter, condition shift, then the EMA, the separate critic and the FSDP optimizer when present) —
plus ``COMPLETE``, a JSON marker written last (step, world size, global batch, replica checksums, wall time so far).
A quantised base (``model.quantize``) is not stored (:func:`keep_base_out`): every start quantises it again, exactly.

Writing: ``step-N.tmp`` → ``COMPLETE`` → rename to ``step-N``. Removing (pruning, or replacing a step written
again): rename to a hidden ``.step-N.pruned-PID`` first, then delete, so a kill at any moment leaves either the
whole checkpoint or nothing under a checkpoint name. The next save sweeps what a killed save or prune left.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
import uuid
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from apexctl.atomic import write_text
from apexctl.errors import ApexError, BadInput
from apexctl.training.hardware import gather

if TYPE_CHECKING:
    from apexctl.training.state import Session

_NAME = re.compile(r"^step-(\d{6,})$")
_LEFTOVER = re.compile(r"^(step-\d{6,}\.tmp|\.step-\d{6,}\.pruned-.+)$")  # a killed save / a killed prune
COMPLETE = "COMPLETE"  # written last inside the folder: a folder without it is ignored (half-written)


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:06d}"


def complete_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / COMPLETE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run: Path) -> tuple[int, Path] | None:
    found = complete_checkpoints(run)
    return found[-1] if found else None


def read_info(folder: Path) -> dict:
    """The ``COMPLETE`` marker's JSON ({} when it holds none)."""
    try:
        info = json.loads((folder / COMPLETE).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file (header unreadable, or fewer bytes than it declares)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path.name} is truncated ({size} bytes)"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"{path.name} is truncated ({size} bytes, header of {n})"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return f"{path.name} has an unreadable header"
    try:
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):  # JSON, but not a safetensors header
        return f"{path.name} has an unreadable header"
    want = 8 + n + max(ends, default=0)
    return f"{path.name} is truncated ({size} of {want} bytes)" if size < want else None


def check_loadable(folder: Path) -> str | None:
    """None when every file of the checkpoint is whole, else why not (a cheap check: sizes and the safetensors
    header; the zip directory at the end of each torch pickle, which a truncated file loses)."""
    if not (folder / COMPLETE).is_file():
        return f"no {COMPLETE} marker"
    if not (folder / "model.safetensors").is_file():
        return "no model.safetensors"
    try:
        for path in sorted(folder.iterdir()):
            if path.suffix == ".safetensors":
                problem = _safetensors_problem(path)
                if problem:
                    return problem
            elif path.suffix in (".bin", ".pkl") and not zipfile.is_zipfile(path):
                return f"{path.name} is truncated or not a torch file"
    except OSError as exc:  # e.g. pruned while we looked
        return f"unreadable ({exc.strerror or exc})"
    return None


def discard(folder: Path) -> None:
    """Remove a checkpoint folder: first renamed out of every lookup (one atomic step), then deleted."""
    trash = folder.with_name(f".{folder.name}.pruned-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(folder, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def set_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint to ``step-N.damaged``: out of every lookup and of ``keep_last``, kept (never
    deleted by apexctl) for a look; returns the new path."""
    aside = folder.with_name(f"{folder.name}.damaged")
    if aside.exists():
        aside = aside.with_name(f"{aside.name}-{uuid.uuid4().hex[:8]}")
    os.rename(folder, aside)
    return aside


def set_aside_after(run: Path, step: int) -> list[Path]:
    """Rename every complete checkpoint past ``step`` to ``step-N.superseded`` (kept, out of every lookup): a run
    resumed from an older checkpoint, or started over, must not have an abandoned line's newer step outrank, or be
    pruned in favour of, its own checkpoints."""
    moved = []
    for n, folder in complete_checkpoints(run):
        if n > step:
            aside = folder.with_name(f"{folder.name}.superseded")
            if aside.exists():
                aside = aside.with_name(f"{aside.name}-{uuid.uuid4().hex[:8]}")
            os.rename(folder, aside)
            moved.append(aside)
    return moved


def sweep(run: Path) -> None:
    """Delete what killed saves and prunes left under ``RUN/checkpoints`` (called by the run's lock holder)."""
    root = run / "checkpoints"
    for p in root.iterdir() if root.is_dir() else []:
        if _LEFTOVER.match(p.name):
            shutil.rmtree(p, ignore_errors=True)


def prune(run: Path, keep_last: int) -> None:
    for _, p in complete_checkpoints(run)[:-keep_last]:
        discard(p)
    sweep(run)


def param_checksum(params: list[torch.Tensor]) -> float:
    """A position-weighted float64 sum of the parameters: equal on every rank iff the replicas agree (in practice)."""
    total = 0.0
    with torch.no_grad():
        for i, p in enumerate(params):
            t = p.detach().double()
            total += (i + 1) * float(t.sum()) + float(t.abs().sum())
    return total


def keep_base_out(acc, transformer: torch.nn.Module) -> None:
    """Keep a quantised frozen base (rebuilt alike on every rank at every start) out of DDP, whose wrap-time broadcast
    cannot take torchao's tensors, and out of checkpoints (model.safetensors: the trained tensors). Before prepare."""
    from safetensors.torch import load_file
    from torch.nn.parallel import DistributedDataParallel as DDP

    frozen = [n for n, p in transformer.named_parameters() if not p.requires_grad]
    DDP._set_params_and_buffers_to_ignore_for_model(transformer, frozen)

    def save_hook(models, weights, output_dir) -> None:
        i = next(i for i, m in enumerate(models) if acc.unwrap_model(m) is transformer)
        weights[i] = {n: p.detach().cpu() for n, p in transformer.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def load_hook(models, input_dir) -> None:
        i = next(i for i, m in enumerate(models) if acc.unwrap_model(m) is transformer)
        models.pop(i)  # accelerate would load it whole and strictly
        state = load_file(str(Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")))
        for n, p in transformer.named_parameters():  # a missing key or a wrong shape: the checkpoint does not load
            if p.requires_grad:
                p.copy_(state[n])

    acc.register_save_state_pre_hook(save_hook)
    acc.register_load_state_pre_hook(load_hook)


def save_checkpoint(sess: Session, step: int, info: dict | None = None) -> Path:
    """Write ``step-N.tmp`` (every rank its RNG state), mark it COMPLETE (with ``info``), rename it to ``step-N``,
    prune."""
    acc, run = sess.acc, sess.run
    final = step_dir(run, step)
    tmp = final.with_name(final.name + ".tmp")
    # replicas must agree before they are saved (DDP keeps them equal; a mismatch is a bug worth stopping for)
    sums = gather(acc, param_checksum(sess.trainable)) if sess.recipe.hardware.strategy != "fsdp" else []
    if len(set(sums)) > 1:
        raise ApexError(f"step {step}: parameters differ across ranks (checksums {sums}); not checkpointing")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp), safe_serialization=True)  # every rank writes its own RNG state
    if sess.recipe.hardware.strategy == "fsdp":  # gathered on every rank, written by rank 0 (the DDP file layout)
        from apexctl.training import fsdp

        fsdp.save_model(sess.transformer, tmp / "model.safetensors", acc.is_main_process)
    acc.wait_for_everyone()
    if acc.is_main_process:
        marker = {"step": step, "world_size": acc.num_processes, "global_batch": sess.global_batch}
        if sums:
            marker["param_checksums"] = sums
        write_text(tmp / COMPLETE, json.dumps(marker | (info or {})))
        if final.exists():  # the same step written again (a resume from an older checkpoint)
            discard(final)
        os.replace(tmp, final)
        prune(run, sess.recipe.train.keep_last)
    acc.wait_for_everyone()
    return final


def _load(sess: Session, folder: Path) -> str | None:
    """Load ``folder`` into the session on every rank; None, or why it failed on some rank (all ranks agree)."""
    acc, err = sess.acc, None
    fsdp_state = None
    try:
        acc.load_state(str(folder))
        if sess.recipe.hardware.strategy == "fsdp":  # rank 0 reads the full weights; broadcast below
            from safetensors.torch import load_file

            fsdp_state = load_file(str(folder / "model.safetensors")) if acc.is_main_process else {}
    except (MemoryError, torch.OutOfMemoryError):  # a good checkpoint that does not fit is not damage
        raise
    except Exception as exc:  # a damaged file: any reader error; reported, then the previous checkpoint is tried
        err = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    errors = [e for e in gather(acc, err) if e is not None]
    if errors:
        return errors[0]
    if fsdp_state is not None:
        from apexctl.training import fsdp

        fsdp.load_full_model_state(sess.transformer, fsdp_state)
    return None


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def resume_from(sess: Session, resume: str | None) -> dict:
    """``resume``: None | "auto" (the newest checkpoint of the run that loads, if any) | a checkpoint folder.
    Returns the loaded checkpoint's ``COMPLETE`` info ({} when starting from step 0).

    ``auto`` passes over a damaged checkpoint (truncated or missing files) with a warning naming it and takes the
    one before; once one loads, the damaged ones are set aside (:func:`set_aside`). It refuses (exit 2) when
    checkpoints exist and none loads, rather than silently start over."""
    if not resume:
        return {}
    acc = sess.acc
    if resume != "auto":
        p = Path(resume)
        if not (p / COMPLETE).is_file():
            raise BadInput(f"--resume {resume}: not a complete checkpoint folder")
        problem = gather(acc, check_loadable(p))[0] or _load(sess, p)
        if problem:
            raise BadInput(f"--resume {resume}: the checkpoint does not load ({problem})")
        acc.print(f"resumed from {p} at step {sess.counter.step}")
        return read_info(p)
    done = complete_checkpoints(sess.run)
    bad: list[tuple[Path, str]] = []
    for _, folder in reversed(done):
        problem = gather(acc, check_loadable(folder))[0] or _load(sess, folder)
        if problem is None:
            if acc.is_main_process:
                for damaged, _ in bad:
                    warn(f"moved the damaged checkpoint {damaged} aside to {set_aside(damaged)}")
            acc.wait_for_everyone()
            acc.print(f"resumed from {folder} at step {sess.counter.step}")
            return read_info(folder)
        bad.append((folder, problem))
        if acc.is_main_process:
            warn(f"checkpoint {folder} does not load ({problem}); trying the one before it")
    if done:
        raise BadInput(
            f"--resume auto: no checkpoint of {sess.run} loads ({'; '.join(f'{f.name}: {p}' for f, p in bad)}); "
            f"remove {sess.run / 'checkpoints'} to start over"
        )
    if acc.is_main_process:
        acc.print("--resume auto: no complete checkpoint yet, starting from step 0")
    return {}
