"""One typed ``method`` section per objective (issue 12, defect 8 and the redesign): each section holds its own keys,
another objective's key is refused, old ``RUN/recipe.yaml`` files still load, the engine's dataclasses are the one
source of defaults, and the knobs that were silently ignored are refused or honoured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from apexctl.cli import app
from apexctl.engine.config import ApexConfig, ApexFullConfig, ApexPaperConfig, FlowMatchingConfig
from apexctl.errors import BadInput
from apexctl.recipe import (
    ApexMethod,
    ApexPaperMethod,
    FlowMatchingMethod,
    load_recipe,
    validate_recipe,
)
from apexctl.recipe_method import ApexFullMethod
from apexctl.training.objectives import build_objective

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
MODEL = {"path": "tiny:test"}
ENGINE = {"apex": (ApexMethod, ApexConfig), "apex_paper": (ApexPaperMethod, ApexPaperConfig)}
ENGINE["flow_matching"] = (FlowMatchingMethod, FlowMatchingConfig)
ENGINE["apex_full"] = (ApexFullMethod, ApexFullConfig)


def _write(tmp_path: Path, tree: dict, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(tree))
    return p


def _dry_run(path: Path, *sets: str):
    return runner.invoke(app, ["distill", str(path), "--dry-run", *[a for s in sets for a in ("--set", s)]])


def _one_line_error(res, *needles: str) -> str:
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.output, res.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---- each objective its own keys ------------------------------------------------------------------------------------


def test_each_section_holds_only_its_objectives_keys():
    assert set(FlowMatchingMethod.model_fields) == {"objective", "time"}
    apex, paper = set(ApexMethod.model_fields), set(ApexPaperMethod.model_fields)
    assert {"critic_time", "fm_t_max", "reference", "critic", "generator_steps"} <= apex - paper
    assert {"mix_weight", "lambda_mix", "fake_grad", "weighting"} <= paper - apex
    assert apex & paper == {"objective", "time", "shift", "fake_weight"}


@pytest.mark.parametrize(
    ("objective", "key", "value", "owner"),
    [
        ("flow_matching", "critic_time", {"kind": "beta"}, "'apex'"),
        ("flow_matching", "shift", {"a": 0.5}, "'apex' or 'apex_full' or 'apex_paper'"),
        ("flow_matching", "reference", "ema", "'apex' or 'apex_full'"),
        ("apex", "estimate_order", 1, "'apex_full'"),
        ("apex_full", "fm_t_max", 0.5, "'apex'"),
        ("apex", "mix_weight", 2.0, "'apex_paper'"),
        ("apex", "weighting", "uniform", "'apex_paper'"),
        ("apex_paper", "critic", "separate", "'apex'"),
        ("apex_paper", "fm_t_max", 0.5, "'apex'"),
        ("apex_paper", "reference_guidance", 2.0, "'apex' or 'apex_full'"),
    ],
)
def test_another_objectives_key_is_refused(tmp_path, objective, key, value, owner):
    p = _write(tmp_path, {"model": MODEL, "method": {"objective": objective, key: value}})
    line = _one_line_error(_dry_run(p), str(p), f"method.{key} = {value!r}", owner, f"not '{objective}'")
    assert "allowed here: objective, time" in line
    # the same key given with --set is blamed on --set
    p = _write(tmp_path, {"model": MODEL, "method": {"objective": objective}}, "clean.yaml")
    _one_line_error(_dry_run(p, f"method.{key}={json.dumps(value)}"), f"--set method.{key}=", f"method.{key} = ")


def test_unknown_keys_name_the_keys_of_their_objective(tmp_path):
    p = _write(tmp_path, {"model": MODEL, "method": {"objective": "apex_paper", "mix_wieght": 2.0}})
    _one_line_error(
        _dry_run(p), "unknown key 'method.mix_wieght'", "allowed here: objective, time, shift", "mix_weight"
    )
    p = _write(tmp_path, {"model": MODEL, "method": {"shift": {"aa": 1}}})
    _one_line_error(_dry_run(p), "unknown key 'method.shift.aa'; allowed here: a, b, mode")
    p = _write(tmp_path, {"model": MODEL, "method": {"objective": "dmd"}})
    _one_line_error(
        _dry_run(p), "method.objective = 'dmd': expected 'apex', 'apex_full', 'apex_paper' or 'flow_matching'"
    )


# ---- old RUN/recipe.yaml files ----------------------------------------------------------------------------------------


def test_old_dumped_recipes_still_load():
    """Verbatim ``Recipe.dump()`` output of the pre-redesign tree (8fa59cf): every key of every objective."""
    apex = load_recipe(FIXTURES / "old_recipe_apex.yaml")  # recipes/digits.yaml, resolved
    assert isinstance(apex.method, ApexMethod) and apex.method.reference_guidance == 2.0
    assert apex.method == load_recipe(ROOT / "recipes" / "digits_apex.yaml").method  # the previous default
    paper = load_recipe(FIXTURES / "old_recipe_apex_paper.yaml")
    assert isinstance(paper.method, ApexPaperMethod)
    assert (paper.method.mix_weight, paper.method.time.kind) == (2.0, "logit_normal")
    # digits.yaml run with --set method.objective=flow_matching: its reference_guidance 2.0 was ignored by that run
    fm = load_recipe(FIXTURES / "old_recipe_flow_matching.yaml")
    assert isinstance(fm.method, FlowMatchingMethod) and fm.output.dir == "runs/digits-fm"
    for r in (apex, paper, fm):  # and what they dump now loads back to the same recipe
        assert validate_recipe(yaml.safe_load(r.dump())) == r
        assert "mix_weight" not in r.dump() or isinstance(r.method, ApexPaperMethod)


def test_other_objectives_keys_at_their_old_default_are_dropped(tmp_path):
    tree = {"model": MODEL, "method": {"objective": "apex", "mix_weight": 1.0, "weighting": "paper", "fm_t_max": 0.8}}
    r = load_recipe(_write(tmp_path, tree))
    assert r.method.fm_t_max == 0.8 and "mix_weight" not in r.method.model_dump()
    tree = {"model": MODEL, "method": {"objective": "flow_matching", "shift": {"a": -1.0}, "reference": "self"}}
    assert isinstance(load_recipe(_write(tmp_path, tree)).method, FlowMatchingMethod)
    # a hand-written section (not a whole old dump) with a non-default foreign value is refused
    fm = yaml.safe_load((FIXTURES / "old_recipe_flow_matching.yaml").read_text())
    del fm["method"]["weight_max"]
    with pytest.raises(BadInput, match="method.reference_guidance = 2.0 is a key of method.objective 'apex'"):
        validate_recipe(fm)


def test_set_objective_replaces_the_files_objective():
    digits = ROOT / "recipes" / "digits.yaml"  # an apex recipe with reference_guidance 2.0
    r = load_recipe(digits, ["method.objective=flow_matching"])
    assert isinstance(r.method, FlowMatchingMethod)
    r = load_recipe(digits, ["method.objective=apex_paper", "method.mix_weight=0.5"])
    assert isinstance(r.method, ApexPaperMethod) and r.method.mix_weight == 0.5 and r.method.shift.a == -1.0
    with pytest.raises(BadInput, match=r"^--set method.reference_guidance=3: .* not 'flow_matching'"):
        load_recipe(digits, ["method.objective=flow_matching", "method.reference_guidance=3"])


# ---- one source of defaults -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", list(ENGINE))
def test_recipe_and_python_api_defaults_agree(objective):
    section, config = ENGINE[objective]
    assert section().config() == config()
    objective_fn = build_objective(validate_recipe({"model": MODEL, "method": {"objective": objective}}))
    assert objective_fn.keywords["cfg"] == config()


@pytest.mark.parametrize("objective", list(ENGINE))
def test_every_knob_of_a_section_reaches_the_engine_config(objective):
    section, _ = ENGINE[objective]
    trainer_keys = {"objective", "shift", "reference", "critic", "target_reference", "target_time"}
    trainer_keys |= {"critic_updates", "critic_lr", "critic_max_grad_norm"}  # the trainer's, not the loss function's
    trainer_keys |= {"warm_start_steps", "warm_start_cache", "rectify_warmup", "gan_lr"}
    base = section().config()
    changed = {"time": {"kind": "beta"}, "critic_time": {"kind": "logit_normal"}, "delta_clip": None}
    changed |= {"fake_grad": False, "fake_noise": "shared", "weighting": "uniform", "generator_steps": 3}
    changed |= {"normalize_delta": True, "groups": (1.0, 0.0, 0.0, 0.0), "full_batch": True, "estimate_order": 1}
    changed |= {"enhance_range": (0.1, 0.9), "loss": "l2", "time_weighting": False, "fake_time": "signed"}
    small = ("fm_t_max", "lambda_mix", "t_max", "consistency_ratio", "mul_gap", "rcgm_dt")
    for key in set(section.model_fields) - trainer_keys:
        value = changed.get(key, 0.3 if key in small else 2.0)
        assert section(**{key: value}).config() != base, key


def test_reading_a_recipe_imports_no_torch():
    code = "import sys; from apexctl.recipe import load_recipe; load_recipe('recipes/digits.yaml'); "
    code += "assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# ---- defect 8: knobs that were silently ignored ---------------------------------------------------------------------


def test_offload_needs_fsdp(tmp_path):
    p = _write(tmp_path, {"model": MODEL, "hardware": {"offload": True}})
    _one_line_error(_dry_run(p), "hardware.offload = true", "hardware.strategy = 'auto'", "fsdp")
    _one_line_error(_dry_run(_write(tmp_path, {"model": MODEL}, "ok.yaml"), "hardware.offload=true"), "--set")
    ok = {"model": {**MODEL, "lora": {"rank": 2}}, "method": {"target_time": "none"}}
    ok["hardware"] = {"offload": True, "strategy": "fsdp", "processes": 2}
    assert validate_recipe(ok).hardware.offload


@pytest.mark.parametrize(("key", "value"), [("a", 1.0), ("b", 0.5), ("site", "embeddings"), ("learnable", True)])
def test_a_shift_with_a_separate_critic_is_refused(tmp_path, key, value):
    method = {"objective": "apex", "critic": "separate", "shift": {key: value}}
    p = _write(tmp_path, {"model": MODEL, "method": method})
    _one_line_error(_dry_run(p), f"method.shift.{key} = {value!r}", "method.critic = 'separate'")
    # the default shift (what every old dump lists) is fine
    assert validate_recipe(
        {"model": MODEL, "method": {"objective": "apex", "critic": "separate", "shift": {"a": -1.0, "b": 0.0}}}
    )


@pytest.mark.parametrize(
    ("sets", "shown"),
    [
        ([], "EMA none"),
        (["method.reference=ema"], "EMA decay 0.99 (for method.reference ema)"),
        (["train.ema_decay=0.9", "method.reference=ema"], "EMA decay 0.9,"),
        (["train.optimizer=adamw8bit"], "optimizer  AdamW 8-bit (bitsandbytes) lr"),
    ],
)
def test_dry_run_reports_the_ema_and_optimizer_training_uses(tmp_path, sets, shown):
    res = _dry_run(_write(tmp_path, {"model": MODEL}), *sets)
    assert res.exit_code == 0, res.output
    assert shown in res.output
    r = load_recipe(tmp_path / "r.yaml", sets)
    assert r.ema_decay == (None if not any("ema" in s for s in sets) else 0.9 if len(sets) == 2 else 0.99)
