"""Checkpoints across versions and after crashes: an old checkpoint resumes; a kill while pruning, a truncated
newest checkpoint and a killed export leave nothing that breaks the next command; the run's wall time is kept."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from apexctl.cli import app

runner = CliRunner()
FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_v1"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


def _invoke(args: list, code: int = 0) -> str:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == code, res.output
    return res.output


def _fill(tree, cache: Path, run: Path):
    if isinstance(tree, dict):
        return {k: _fill(v, cache, run) for k, v in tree.items()}
    return {"{cache}": str(cache), "{run}": str(run)}.get(tree, tree) if isinstance(tree, str) else tree


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """APEXCTL_HOME (the tiny model is built there) and the digits cache of the fixture's recipe, prepared once."""
    tmp = tmp_path_factory.mktemp("checkpoints")
    mp = pytest.MonkeyPatch()
    mp.setenv("APEXCTL_HOME", str(tmp / "home"))
    threads = torch.get_num_threads()  # the recipe's hardware.threads: 1 is process-wide
    _invoke(["prepare", _recipe(tmp, "prep"), "-q"])
    yield tmp
    torch.set_num_threads(threads)
    mp.undo()


def _recipe(tmp: Path, name: str, **train) -> Path:
    """The fixture's recipe with ``RUN = tmp/name`` and the shared cache; ``train`` overrides its train section."""
    tree = _fill(EXPECTED["recipe"], tmp / "cache", tmp / name)
    tree["train"].update(train)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _old_run(tmp: Path, name: str, steps: tuple[int, ...] = (2,)) -> Path:
    """A run folder holding the fixture's step-2 checkpoint under each of ``steps`` (and its recipe.yaml)."""
    run = tmp / name
    for s in steps:
        dest = run / "checkpoints" / f"step-{s:06d}"
        shutil.copytree(FIXTURE / "checkpoints" / "step-000002", dest)
        info = json.loads((dest / "COMPLETE").read_text())
        (dest / "COMPLETE").write_text(json.dumps(info | {"step": s}))
    shutil.copy(_recipe(tmp, name), run / "recipe.yaml")
    return run


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _assert_recorded_run(run: Path) -> None:
    """Steps 3–4 and the final live and exported (EMA) weights of ``run`` equal the recorded uninterrupted run's,
    within a tolerance far below what one lost piece of state (optimizer moments, EMA, sampler position, RNG)
    changes, and far above float noise across CPUs."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 4]
    for got, want in zip(rows, EXPECTED["metrics"][2:], strict=True):
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-7), (got["step"], k)
    for name, produced in (
        ("final_live.safetensors", run / "checkpoints" / "step-000004" / "model.safetensors"),
        ("final_export.safetensors", run / "model" / "transformer" / "diffusion_pytorch_model.safetensors"),
    ):
        a, b = load_file(str(FIXTURE / name)), load_file(str(produced))
        assert a.keys() == b.keys(), name
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")
    shift = json.loads((run / "shift.json").read_text())
    for k in ("a", "b"):
        assert shift[k] == pytest.approx(EXPECTED["shift"][k], rel=1e-5, abs=1e-7)


def test_checkpoint_written_before_the_split_resumes(home):
    """The step-2 checkpoint of a 4-step run written by the pre-split trainer resumes with today's code to the same
    steps 3–4 (losses, gradient norms, shift) and the same final weights as the recorded uninterrupted run."""
    from apexctl.data.prepare import cache_identity
    from apexctl.models import resolve_model_path
    from apexctl.recipe import load_recipe

    recipe = load_recipe(_recipe(home, "prep"))
    manifest = json.loads((home / "cache" / "manifest.json").read_text())
    want = cache_identity(recipe, resolve_model_path(recipe.model.path), manifest["family"])
    # same data settings as when the fixture was written. The model fingerprint is left out: it hashes the tiny
    # model's files, which this test builds with the installed libraries, and their config.json carries the
    # `transformers_version` / `_diffusers_version` that wrote it (a new release changes it, the weights do not).
    # The same model is what steps 3-4 reproducing the recorded losses checks.
    assert {k: v for k, v in want.items() if k != "model_fingerprint"} == {
        k: v for k, v in EXPECTED["cache_identity"].items() if k != "model_fingerprint"
    }
    assert {k: manifest[k] for k in want} == want

    run = _old_run(home, "old")
    out = _invoke(["distill", run / "recipe.yaml", "--resume", "auto", "-q"])
    assert f"resumed from {run / 'checkpoints' / 'step-000002'} at step 2" in out
    _assert_recorded_run(run)
    # the resume moved the weights away from the step-2 checkpoint (the comparison above is not vacuous)
    start = load_file(str(FIXTURE / "checkpoints" / "step-000002" / "model.safetensors"))
    final = load_file(str(FIXTURE / "final_live.safetensors"))
    assert max(float((final[k] - start[k]).abs().max()) for k in start) > 1e-4
    # the old checkpoint holds no wall time: run.json says its total is a lower bound
    info = json.loads((run / "run.json").read_text())
    assert info["segments"] == 2 and info["wall_time_known"] is False and info["finished"] is True


def test_resume_auto_passes_over_a_truncated_newest_checkpoint(home):
    """A truncated newest checkpoint: `--resume auto` warns naming it and continues from the one before, to the
    same result as the uninterrupted run (the re-written step replaces the damaged folder)."""
    run = _old_run(home, "trunc-resume", steps=(2, 3))
    _truncate(run / "checkpoints" / "step-000003" / "optimizer.bin")
    out = _invoke(["distill", run / "recipe.yaml", "--resume", "auto", "-q"])
    assert f"checkpoint {run / 'checkpoints' / 'step-000003'} does not load" in out, out
    assert f"resumed from {run / 'checkpoints' / 'step-000002'} at step 2" in out
    _assert_recorded_run(run)
    # the damaged one is set aside (out of lookups and keep_last), not deleted
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-000002",
        "step-000003.damaged",
        "step-000004",
    ]

    # only damaged checkpoints: a one-line refusal (exit 2), not a fresh start over them, not a traceback
    bad = _old_run(home, "trunc-all", steps=(2,))
    _truncate(bad / "checkpoints" / "step-000002" / "model.safetensors")
    out = _invoke(["distill", bad / "recipe.yaml", "--resume", "auto", "-q"], code=2)
    assert "no checkpoint of" in out and "model.safetensors is truncated" in out and "Traceback" not in out
    out = _invoke(["distill", bad / "recipe.yaml", "--resume", bad / "checkpoints" / "step-000002", "-q"], code=2)
    assert "does not load" in out


def test_export_passes_over_a_truncated_newest_checkpoint(home):
    run = _old_run(home, "trunc-export", steps=(2, 4))
    _truncate(run / "checkpoints" / "step-000004" / "model.safetensors")
    out = _invoke(["export", run])
    assert f"checkpoint {run / 'checkpoints' / 'step-000004'} does not load (model.safetensors is truncated" in out
    exported = run / "exports" / "step-000002-model-ema"
    assert (exported / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    # the step asked for by name does not load: one line, exit 2
    out = _invoke(["export", run, "--checkpoint", "4"], code=2)
    assert "does not load" in out and "Traceback" not in out


def test_a_kill_while_pruning_leaves_no_checkpoint_without_weights(home, monkeypatch):
    """Pruning deletes file by file; a kill in the middle must not leave a ``step-N`` that claims COMPLETE but has
    lost its weights (export of it crashed). Simulated: the deletion removes the weights, then the process dies."""
    from apexctl.training import checkpoint as ckpt

    run = _old_run(home, "prune-kill", steps=(2, 4, 6))
    real_rmtree = shutil.rmtree

    def killed_midway(path, *a, **k):
        Path(path, "model.safetensors").unlink()
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune(run, keep_last=2)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)

    assert [s for s, _ in ckpt.complete_checkpoints(run)] == [4, 6]  # step 2 is gone as a whole
    assert all(ckpt.check_loadable(folder) is None for _, folder in ckpt.complete_checkpoints(run))
    out = _invoke(["export", run, "--checkpoint", "2"], code=2)
    assert "no complete checkpoint at step 2" in out
    _invoke(["export", run, "--weights", "live"])
    ckpt.prune(run, keep_last=2)  # the next save's prune sweeps what the killed one left
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000004", "step-000006"]


def test_export_skips_a_checkpoint_pruned_while_it_reads(home, monkeypatch):
    """`apexctl export` while training prunes: the checkpoint it picked vanishes under it; it warns and exports
    the newest one still there."""
    import apexctl.export as export
    from apexctl.training import checkpoint as ckpt

    run = _old_run(home, "prune-race", steps=(2, 4))
    real = export._load_into
    calls: list[Path] = []

    def racing(transformer, folder, weights, **kw):
        calls.append(folder)
        if len(calls) == 1:
            ckpt.discard(folder)  # what a concurrent prune does, between our listing and our read
        return real(transformer, folder, weights, **kw)

    monkeypatch.setattr(export, "_load_into", racing)
    out = _invoke(["export", run])
    assert f"checkpoint {run / 'checkpoints' / 'step-000004'} does not load" in out
    assert (run / "exports" / "step-000002-model-ema").is_dir() and calls[-1].name == "step-000002"


#: writes half a folder inside ``atomic_dir(argv[1])``, then is killed (``kill``) or keeps working (``hang``)
WRITER = """
import os, signal, sys, time
from apexctl.atomic import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "half.bin").write_bytes(b"partial")
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)
"""


def test_a_rerun_removes_what_a_killed_export_left(home, tmp_path):
    """A writer killed inside ``atomic_dir`` (export, merge-lora, prepare) leaves a hidden temporary sibling; the
    next write of the same folder removes it (its writer is gone) but never a live writer's."""
    out = tmp_path / "exported"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    writer = [sys.executable, "-c", WRITER, str(out)]

    def siblings() -> list[Path]:
        return [p for p in tmp_path.iterdir() if p.name.startswith(".exported.")]

    live = subprocess.Popen([*writer, "hang"], env=env)  # a writer still at work on the same folder
    try:
        deadline = time.time() + 60
        while not siblings():
            assert time.time() < deadline and live.poll() is None
            time.sleep(0.1)
        killed = subprocess.run([*writer, "kill"], env=env)
        assert killed.returncode == -signal.SIGKILL
        stale = [p for p in siblings() if f".{live.pid}." not in p.name]
        assert len(stale) == 1 and (stale[0] / "half.bin").is_file()
        run = _old_run(home, "rerun-export")
        _invoke(["export", run, "--out", out])
        remaining = siblings()
        assert not stale[0].exists() and len(remaining) == 1 and f".{live.pid}." in remaining[0].name
        assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    finally:
        live.kill()
        live.wait()


def test_only_this_hosts_dead_writers_leftovers_are_removed(tmp_path):
    from apexctl.atomic import _host, atomic_dir

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid whose process is gone
    dead = proc.pid
    names = {
        f".model.{_host()}.{dead}.abcd1234.tmp": False,  # this host, writer gone: removed
        f".model.{_host()}.{dead}.abcd1234.old": False,  # the replaced folder of a killed replace: removed
        f".model.otherhost.{dead}.abcd1234.tmp": True,  # another host: cannot tell, kept
        ".model.abcd1234.tmp": True,  # the unnamed form of older apexctl versions: kept
        f".other.{_host()}.{dead}.abcd1234.tmp": True,  # another folder's
    }
    for name in names:
        (tmp_path / name).mkdir()
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "w.bin").write_bytes(b"x")
    assert {n: (tmp_path / n).exists() for n in names} == names
    assert (tmp_path / "model" / "w.bin").read_bytes() == b"x"


def test_run_json_holds_the_wall_time_over_resumed_segments(home):
    """RUN/run.json: the wall time of the whole run (loading, steps, checkpoints, export), summed over a stop and a
    resume; each checkpoint carries the total so far, so a resumed segment continues from it."""
    r = _recipe(home, "wall")
    run = home / "wall"
    t0 = time.perf_counter()
    _invoke(["distill", r, "--until", "2", "-q"])
    first = time.perf_counter() - t0
    info = json.loads((run / "run.json").read_text())
    assert info["finished"] is False and info["step"] == 2 and info["segments"] == 1
    marker = json.loads((run / "checkpoints" / "step-000002" / "COMPLETE").read_text())
    assert 0 < marker["wall_time_s"] <= info["wall_time_s"] <= first

    t0 = time.perf_counter()
    _invoke(["distill", r, "--resume", "auto", "-q"])
    second = time.perf_counter() - t0
    info = json.loads((run / "run.json").read_text())
    assert info["finished"] is True and info["segments"] == 2 and info["wall_time_known"] is True
    steps = sum(json.loads(x)["step_time"] for x in (run / "metrics.jsonl").read_text().splitlines())
    assert max(steps, marker["wall_time_s"]) < info["wall_time_s"] <= first + second


def test_report_shows_wall_time_and_median_step_time(tmp_path):
    """A six-minute run whose logged steps sum to 14.8 s: the report says six minutes, and the median step."""
    from apexctl.eval.report.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump(_fill(EXPECTED["recipe"], tmp_path / "c", run)))
    rows = [{"step": 10 * i, "loss": 1.0, "step_time": t} for i, t in enumerate([3.0, 3.5, 4.0, 4.3], 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "run.json").write_text(json.dumps({"step": 40, "steps": 40, "finished": True, "wall_time_s": 360.4,
                                              "wall_time_known": True, "segments": 2}))  # fmt: skip
    page = write_report(run, samples=False, quiet=True).read_text()
    assert "360.4 s (6 min 00 s; finished, 2 segments)" in page
    assert "median step time" in page and ">3.75<" in page and "14.8" not in page
    (run / "run.json").unlink()
    assert "unknown (no run.json" in write_report(run, samples=False, quiet=True).read_text()


def test_resuming_an_older_checkpoint_sets_the_abandoned_newer_ones_aside(home):
    """`--resume step-2` in a run that also has a step-6 checkpoint: step 6 (the abandoned line) is set aside, so it
    neither outranks the resumed run's own step 4 for `--resume auto` / export nor survives `keep_last: 1` pruning
    in its place."""
    run = _old_run(home, "older", steps=(2, 6))
    (run / "recipe.yaml").write_text(_recipe(home, "older", keep_last=1).read_text())
    out = _invoke(["distill", run / "recipe.yaml", "--resume", run / "checkpoints" / "step-000002", "-q"])
    assert "step-000006.superseded: a checkpoint past step 2" in out, out
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step-000004", "step-000006.superseded"], names
    _assert_recorded_run(run)


def test_a_torn_metrics_line_does_not_stop_a_resume(home):
    """A kill mid-write leaves half a row at the end of metrics.jsonl: `--resume auto` drops it (no traceback) and
    the resumed rows follow on their own lines."""
    run = _old_run(home, "torn")
    (run / "metrics.jsonl").write_text(json.dumps(EXPECTED["metrics"][0]) + "\n" + '{"step": 3, "loss": 0.')
    _invoke(["distill", run / "recipe.yaml", "--resume", "auto", "-q"])
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 3, 4]


def test_a_safetensors_header_of_the_wrong_shape_is_damage_not_a_traceback(tmp_path):
    from apexctl.training.checkpoint import check_loadable

    folder = tmp_path / "step-000002"
    folder.mkdir()
    header = json.dumps({"w": {"dtype": "F32", "shape": [1]}}).encode()  # JSON, but no data_offsets
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    (folder / "COMPLETE").write_text("{}")
    assert check_loadable(folder) == "model.safetensors has an unreadable header"
