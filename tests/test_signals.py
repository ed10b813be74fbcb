"""Stops a user does not plan: a SIGTERM that reaches only one rank of a `--launch 2` run, and a SIGKILL between two
checkpoints followed by `--resume auto` (with tensorboard logging on, whose events must come out as if the run had
never stopped).

The signal is delivered at a fixed step by a ``sitecustomize`` module put on the subprocess's PYTHONPATH: in the
process whose RANK matches, it wraps the loop's ``train_step`` and sends the signal to its own pid when the given
step starts. A real signal to a real process, at a step that does not depend on the machine's speed.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from data_util import EMA_RUN, digits_recipe, metrics, ok, run_apexctl
from safetensors.torch import load_file


def _recipe(tmp: Path, name: str, **sections) -> Path:
    train = {"checkpoint_every": 2, "keep_last": 10, "seed": 5} | sections.pop("train", {})
    return digits_recipe(tmp, name, preset=EMA_RUN, train=train, **sections)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("signals")
    mp = pytest.MonkeyPatch()
    mp.setenv("APEXCTL_HOME", str(tmp / "home"))
    ok(["prepare", str(_recipe(tmp, "prep")), "-q"])
    yield tmp
    mp.undo()


def _run(
    workdir: Path, args: list[str], signal_at: str | None = None, timeout: float = 180
) -> subprocess.CompletedProcess:
    """``python -m apexctl ARGS``; ``signal_at``: RANK:STEP:SIGNAL, the signal sent when that training step starts."""
    if signal_at is not None:
        rank, step, name = signal_at.split(":")
        signal_at = f"{rank}:apexctl.training.loop:train_step:{step}:{name}"
    return run_apexctl(args, workdir / "home", signal_at=signal_at, timeout=timeout)


def _ckpt_weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))


def _model_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "transformer" / "diffusion_pytorch_model.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(workdir):
    """`distill --launch 2`, SIGTERM to rank 1 alone during step 2: both ranks finish step 2, write one complete
    checkpoint (both RNG states, equal parameter checksums), exit 0, and `--resume auto` reaches exactly what an
    uninterrupted 2-process run reaches."""
    train = {"steps": 4, "checkpoint_every": 100}
    r = _recipe(workdir, "term1", train=train)
    res = _run(workdir, ["distill", str(r), "--launch", "2", "-q"], signal_at="1:2:SIGTERM")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "stopped at step 2" in res.stdout, res.stdout + res.stderr  # rank 0 prints: it stopped at rank 1's step
    run = workdir / "term1"
    ck = run / "checkpoints"
    assert [p.name for p in ck.iterdir()] == ["step-000002"]
    info = json.loads((ck / "step-000002" / "COMPLETE").read_text())
    assert info["step"] == 2 and info["world_size"] == 2
    assert len(info["param_checksums"]) == 2 and info["param_checksums"][0] == info["param_checksums"][1]
    assert {p.name for p in (ck / "step-000002").glob("random_states_*")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    assert [x["step"] for x in metrics(run)] == [1, 2] and not (run / "model").exists()
    assert not (run / ".lock").exists()

    res = _run(workdir, ["distill", str(r), "--launch", "2", "--resume", "auto", "-q"])
    assert res.returncode == 0 and "at step 2" in res.stdout, res.stdout + res.stderr
    ref = _recipe(workdir, "term1-ref", train=train)
    res = _run(workdir, ["distill", str(ref), "--launch", "2", "-q"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert _same(_model_weights(run), _model_weights(workdir / "term1-ref"))
    assert [x["loss"] for x in metrics(run)] == [x["loss"] for x in metrics(workdir / "term1-ref")]
    assert [x["step"] for x in metrics(run)] == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def killed(workdir):
    """A run SIGKILLed as step 4 starts (checkpoint every 2 steps: rows 1–3 logged, the last checkpoint is step 2),
    then `--resume auto`; and the same recipe uninterrupted. Both log to tensorboard."""
    sections = {"train": {"log_with": "tensorboard"}}
    ref = _recipe(workdir, "kill-ref", **sections)
    ok(["distill", str(ref), "-q"])
    r = _recipe(workdir, "kill", **sections)
    res = _run(workdir, ["distill", str(r), "-q"], signal_at="0:4:SIGKILL")
    assert res.returncode == -signal.SIGKILL, res.stdout + res.stderr
    run = workdir / "kill"
    before = {
        "checkpoints": sorted(p.name for p in (run / "checkpoints").iterdir()),
        "rows": [x["step"] for x in metrics(run)],
        "lock": (run / ".lock").exists(),
    }
    res = _run(workdir, ["distill", str(r), "--resume", "auto", "-q"])
    assert res.returncode == 0, res.stdout + res.stderr
    return run, workdir / "kill-ref", before, res.stdout + res.stderr


def test_resume_auto_after_sigkill_between_checkpoints(killed):
    run, ref, before, out = killed
    # what the kill left: the step-2 checkpoint, rows up to step 3, the dead process's lock
    assert before == {"checkpoints": ["step-000002"], "rows": [1, 2, 3], "lock": True}
    assert f"resumed from {run / 'checkpoints' / 'step-000002'} at step 2" in out and "stale lock" in out
    assert _same(_model_weights(run), _model_weights(ref))
    for step in (2, 4, 6):
        assert _same(_ckpt_weights(run, step), _ckpt_weights(ref, step)), step
    assert (run / "shift.json").read_text() == (ref / "shift.json").read_text()
    rows, ref_rows = metrics(run), metrics(ref)
    assert [x["step"] for x in rows] == [1, 2, 3, 4, 5, 6]  # row 3 of the killed segment dropped, not repeated
    drop = ("step_time", "samples_per_s", "peak_mem_mb")
    assert [{k: v for k, v in x.items() if k not in drop} for x in rows] == [
        {k: v for k, v in x.items() if k not in drop} for x in ref_rows
    ]


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_hold_the_logged_scalars(killed):
    """train.log_with: tensorboard writes every numeric metrics.jsonl value as a scalar at its step; after the kill
    and resume, each step appears once, with the resumed segment's value."""
    run, ref, _, _ = killed
    for folder in (ref, run):
        events = list((folder / "tensorboard").glob("events.out.tfevents.*"))
        assert events, folder
        scalars = _scalars(folder)
        rows = metrics(folder)
        want = {k for x in rows for k, v in x.items() if k != "step" and isinstance(v, (int, float))}
        assert {"loss", "loss/fm", "loss/fake", "loss/rect", "grad_norm", "lr", "shift/a"} <= want
        assert set(scalars) == want, (folder, set(scalars) ^ want)
        for tag in want:
            got = scalars[tag]
            assert [s for s, _ in got] == [x["step"] for x in rows], (folder, tag)
            # tensorboard stores float32
            assert [v for _, v in got] == pytest.approx([float(x[tag]) for x in rows], rel=1e-6, abs=1e-12), tag
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one file per segment
