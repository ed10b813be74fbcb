"""Checkpoints across versions and after crashes: an old checkpoint resumes; pruning, a truncated newest checkpoint
and killed exports leave nothing that crashes the next command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from apexctl.cli import app

runner = CliRunner()
FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_v1"


def _ok(args: list) -> str:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture
def keep_threads():
    """The fixture's recipe sets ``hardware.threads: 1`` (process-wide): give the other tests their threads back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _fill(tree, cache: Path, run: Path):
    if isinstance(tree, dict):
        return {k: _fill(v, cache, run) for k, v in tree.items()}
    if tree == "{cache}":
        return str(cache)
    if tree == "{run}":
        return str(run)
    return tree


def test_checkpoint_written_before_the_split_resumes(tmp_path, monkeypatch, keep_threads):
    """The step-2 checkpoint of a 4-step run written by the pre-split trainer resumes with today's code to the same
    steps 3–4 (losses, gradient norms, shift) and the same final live and exported (EMA) weights as the recorded
    uninterrupted run. Compared with a tolerance far below what one lost piece of state (optimizer moments, EMA,
    sampler position, RNG) changes, and far above float noise across CPUs."""
    from apexctl.data.prepare import cache_identity
    from apexctl.models import resolve_model_path
    from apexctl.recipe import load_recipe

    monkeypatch.setenv("APEXCTL_HOME", str(tmp_path / "home"))
    expected = json.loads((FIXTURE / "expected.json").read_text())
    cache, run = tmp_path / "cache", tmp_path / "run"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_fill(expected["recipe"], cache, run)))

    _ok(["prepare", path, "-q"])  # deterministic: the cache the checkpoint was trained on
    recipe = load_recipe(path)
    model_dir = resolve_model_path(recipe.model.path)
    manifest = json.loads((cache / "manifest.json").read_text())
    want = cache_identity(recipe, model_dir, manifest["family"])
    assert want == expected["cache_identity"]  # same model, same data settings as when the fixture was written
    assert {k: manifest[k] for k in want} == want

    shutil.copytree(FIXTURE / "checkpoints", run / "checkpoints")
    out = _ok(["distill", path, "--resume", "auto", "-q"])
    assert f"resumed from {run / 'checkpoints' / 'step-000002'} at step 2" in out

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 4]
    for got, want_row in zip(rows, expected["metrics"][2:], strict=True):
        for k, v in want_row.items():
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
        assert shift[k] == pytest.approx(expected["shift"][k], rel=1e-5, abs=1e-7)
    # the resume moved the weights away from the step-2 checkpoint (the comparison above is not vacuous)
    start = load_file(str(FIXTURE / "checkpoints" / "step-000002" / "model.safetensors"))
    final = load_file(str(FIXTURE / "final_live.safetensors"))
    assert max(float((final[k] - start[k]).abs().max()) for k in start) > 1e-4
