"""Recipes: strict schema, --set overrides, and bad input → one line, exit 2 (through the real CLI)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from apexctl.cli import app
from apexctl.errors import BadInput
from apexctl.recipe import load_recipe

runner = CliRunner()
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_shipped_recipes_validate():
    for p in sorted(RECIPES.glob("*.yaml")):
        r = load_recipe(p)
        assert r.model.path


def test_set_overrides_are_typed(tmp_path):
    p = _write(tmp_path, "model: {path: tiny:digits}\nmethod: {objective: apex}\n")
    r = load_recipe(p, ["train.steps=12", "method.shift.a=-0.5", "method.delta_clip=null", "train.betas=[0.8, 0.9]"])
    assert r.train.steps == 12 and r.method.shift.a == -0.5 and r.method.delta_clip is None
    assert r.train.betas == (0.8, 0.9)


@pytest.mark.parametrize(
    ("text", "overrides", "needle"),
    [
        ("model: {path: x}\ntrain: {stepz: 3}\n", [], "unknown key 'train.stepz'; allowed here: steps"),
        ("model: {path: x}\n", ["train.steps=many"], "train.steps = 'many'"),
        (
            "model: {path: x}\nmethod: {objective: dmd}\n",
            [],
            "expected 'apex', 'apex_full', 'apex_paper' or 'flow_matching'",
        ),
        ("model: {path: x}\ntrain: {lr: -1}\n", [], "train.lr = -1"),
        ("model: {path: x}\ndata: {cond_dropout: 1.5}\n", [], "data.cond_dropout = 1.5"),
        (
            "model: {path: x}\ntrain: {steps: 10, warmup_steps: 20}\n",
            [],
            "warmup_steps (20) must not exceed steps (10)",
        ),
        ("data: {source: digits}\n", [], "missing required key 'model'"),
        ("model: {path: x}\n", ["train.steps"], "expected KEY=VALUE"),
        ("model: [unclosed\n", [], "is not valid YAML"),
        ("- a list\n", [], "must be a mapping"),
    ],
)
def test_bad_recipes_exit_2_with_one_line(tmp_path, text, overrides, needle):
    p = _write(tmp_path, text)
    with pytest.raises(BadInput) as exc:
        load_recipe(p, overrides)
    assert needle in str(exc.value)
    args = ["distill", str(p), "--dry-run"]
    for o in overrides:
        args += ["--set", o]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]
    assert "Traceback" not in res.output


def test_missing_recipe_file_exits_2(tmp_path):
    res = runner.invoke(app, ["distill", str(tmp_path / "nope.yaml"), "--dry-run"])
    assert res.exit_code == 2 and "recipe not found" in res.output


def test_dry_run_prints_plan(tmp_path):
    res = runner.invoke(app, ["distill", str(RECIPES / "digits.yaml"), "--dry-run", "--set", "train.micro_batch=32"])
    assert res.exit_code == 0, res.output
    assert "objective  apex" in res.output and "32 micro × 1 accum × 1 processes = 32 global" in res.output


def test_global_batch_mismatch_exits_2():
    res = runner.invoke(app, ["distill", str(RECIPES / "digits.yaml"), "--dry-run", "--set", "train.global_batch=100"])
    assert res.exit_code == 2 and "train.global_batch = 100 but micro_batch" in res.output


def test_every_command_has_help():
    for args in (
        ["--help"],
        ["prepare", "--help"],
        ["distill", "--help"],
        ["sample", "--help"],
        ["eval", "digits", "--help"],
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, (args, res.output)
        assert "Usage" in res.output
