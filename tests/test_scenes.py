"""The scenes setting: generator, prompts, data source, tiny model preset, judge and the shared eval loop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from apexctl.cli import app
from apexctl.data import scenes as S
from apexctl.data.digits import load_split
from apexctl.errors import BadInput
from apexctl.eval.toy.scenes import SceneJudge, real_reference
from apexctl.recipe import validate_recipe

TINY = "tiny:scenes?num_layers=1&num_attention_heads=2&attention_head_dim=8&text_hidden=16&text_layers=1"
runner = CliRunner()


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One APEXCTL_HOME for the module, so the tiny scenes model is built once."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("home")
    mp.setenv("APEXCTL_HOME", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def judge(scene_judge):  # split and scene_judge (60-iteration slot classifier): tests/conftest.py
    assert scene_judge.test_accuracy > 0.95
    return scene_judge


def _real(split, rule: S.SceneRule, n: int = 40, seed: int = 5) -> S.SceneSet:
    return S.scenes_for_rule(split.test_images, split.test_labels, rule, n, seed=seed)


def _one(label: int, colour: str, position: str) -> S.SceneRule:
    return S.SceneRule(frozenset({label}), frozenset({colour}), frozenset({position}))


def _score(judge, images, rule: S.SceneRule, kind: str = "multi") -> dict:
    return judge.score(images, [rule] * len(images), [kind] * len(images))


# --- data -----------------------------------------------------------------------------------------------------


def test_paint_colours_positions(split):
    ink = split.train_images[0]
    img = S.paint([ink], [S.Digit(int(split.train_labels[0]), "red", "bottom right")])
    assert img.shape == (3, 16, 16) and img.min() == -1.0 and img.max() == 1.0
    torch.testing.assert_close(img[0, 8:, 8:], ink[0])  # red: ink in R only, at the bottom right
    assert (img[1:] == -1).all() and (img[:, :8] == -1).all() and (img[:, :, :8] == -1).all()
    white = S.paint([ink], [S.Digit(0, "white", "top left")])
    for c in range(3):
        torch.testing.assert_close(white[c, :8, :8], ink[0])


def test_training_scenes_and_pairs(split):
    a, b = S.train_scenes(split, seed=0), S.train_scenes(split, seed=0)
    assert torch.equal(a.images, b.images) and a.digits == b.digits  # deterministic
    assert a.images.shape == (S.N_SINGLE + S.N_PAIR, 3, 16, 16)
    pairs = [ds for ds in a.digits if len(ds) == 2]
    assert len(pairs) == S.N_PAIR and all(sum(d.label for d in ds) == 10 for ds in pairs)
    assert {(ds[0].label, ds[1].label) for ds in pairs} == {(k, 10 - k) for k in range(1, 10)}
    assert all(ds[0].position == "top left" and ds[1].position == "top right" for ds in pairs)
    tp = S.training_pairs(a.digits)
    first = [p for i, p in tp if i == 0]
    d = a.digits[0][0]
    assert first[0] == S.single_prompt(d) and set(first[1:]) == set(S.multi_prompts_for(a.digits[0]))
    # every multi prompt has training scenes, and every scene satisfies the multi prompts it got
    assert {p for _, p in tp if p in S.MULTI_PROMPTS} == set(S.MULTI_PROMPTS)
    assert all(S.MULTI_PROMPTS[p].satisfied_by(a.digits[i]) for i, p in tp if p in S.MULTI_PROMPTS)
    assert S.single_prompt(S.Digit(7, "red", "top left")) == "a red seven in the top left"


def test_eval_prompts_and_rules():
    ev = S.eval_prompts()
    assert len(ev) == 17 and sum(p.kind == "single" for p in ev) == 10
    assert {p.allowed.classes for p in ev if p.kind == "single"} == {frozenset({c}) for c in range(10)}
    assert S.MULTI_PROMPTS["two digits that add to ten"].modes()["pair"][0] == (1, 9)
    assert set(S.MULTI_PROMPTS["a blue digit"].modes()) == {"class", "position"}
    rule = S.MULTI_PROMPTS["an even digit in the bottom right"]
    assert rule.satisfied_by([S.Digit(4, "green", "bottom right")])
    assert not rule.satisfied_by([S.Digit(3, "green", "bottom right")])
    assert not rule.satisfied_by([S.Digit(4, "green", "top right")])
    assert not rule.satisfied_by([S.Digit(4, "green", "bottom right"), S.Digit(2, "red", "top left")])


# --- recipe / source / model ------------------------------------------------------------------------------------


def test_recipe_scenes_source_and_resolution():
    r = validate_recipe({"model": {"path": "tiny:scenes"}, "data": {"source": "scenes", "resolution": 16}})
    assert r.data.source == "scenes" and r.data.path is None
    with pytest.raises(BadInput, match="data.resolution"):
        validate_recipe({"model": {"path": "tiny:scenes"}, "data": {"source": "scenes"}})


def test_shipped_recipes_load():
    from apexctl.recipe import load_recipe

    t, s = load_recipe(Path("recipes/scenes_teacher.yaml")), load_recipe(Path("recipes/scenes.yaml"))
    assert t.data.source == s.data.source == "scenes" and t.data.resolution == 16
    assert s.model.path == "runs/scenes-teacher/model" and s.output.dir == "runs/scenes"


def test_tiny_scenes_codec_and_velocity(home):
    from apexctl.models import load_backbone

    bb = load_backbone(TINY)
    assert bb.latent_shape(16, 16) == (12, 8, 8) and bb.vae_scale_factor == 2
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    lat = bb.encode_images(x)
    assert lat.shape == (2, 12, 8, 8)
    torch.testing.assert_close(bb.decode_latents(lat), x, rtol=0, atol=0)
    cond = bb.encode_prompts(["a red seven in the top left", "two digits that add to ten"])
    assert bb.velocity(lat, torch.full((2,), 0.5), cond).shape == lat.shape
    # the scenes words are single tokens of the tiny tokenizer
    assert len(bb.tokenizer(" red seven in the top left").input_ids) == 6


def test_prepare_distill_eval_end_to_end(tmp_path, home, judge, split):
    """prepare (scenes source) → 2 apex steps → the shared eval loop with the scenes setting (2 images per prompt)."""
    from apexctl.eval.toy.run import EvalSetting, run_eval
    from apexctl.recipe import load_recipe

    tree = {
        "model": {"path": TINY},
        "data": {"source": "scenes", "resolution": 16, "cache_dir": str(tmp_path / "cache"), "limit": 48},
        "method": {"objective": "apex"},
        "train": {"steps": 2, "micro_batch": 4, "log_every": 1, "checkpoint_every": 100},
        "hardware": {"device": "cpu", "threads": 1},
        "output": {"dir": str(tmp_path / "run")},
    }
    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump(tree))
    for cmd in (["prepare", str(rec), "-q"], ["distill", str(rec), "-q"]):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert m["num_images"] == 48 and m["latent_shape"] == [12, 8, 8]

    recipe = load_recipe(rec)
    prompts = S.eval_prompts()
    ref = {"n": 0, "alignment": {}}
    setting = EvalSetting("scenes", prompts, judge, ref, "real", lambda r: sorted(r.classes))
    summary = run_eval(recipe, setting, per_prompt=2, teacher_steps=2, quiet=True)
    assert set(summary["rows"]) == {"real", "teacher 2 steps", "teacher 1 step", "student 1 step"}
    assert summary["rows"]["student 1 step"]["n"] == 34
    assert (tmp_path / "run" / "eval" / "scenes" / "results.json").is_file()


def test_cli_eval_scenes_bad_resolution():
    res = runner.invoke(app, ["eval", "scenes", "--set", "data.resolution=8"])
    assert res.exit_code == 2 and "data.resolution" in res.output


# --- judge ------------------------------------------------------------------------------------------------------


def test_real_scenes_score_high(judge, split):
    ref = real_reference(judge, split, per_prompt=30)
    assert ref["alignment"]["single"] >= 0.95 and ref["alignment"]["multi"] >= 0.95
    assert ref["multi_coverage"] >= 0.9 and 0.28 < ref["diversity"] < 0.38
    # the FD floor (train-digit scenes vs held-out-digit scenes) is far below a collapsed set's FD
    collapsed = _real(split, _one(7, "red", "top left"), n=200)
    assert judge.fd(collapsed.images) > 5 * ref["fd"]


@pytest.mark.parametrize(
    "change",
    [
        dict(colour="blue"),  # wrong colour
        dict(position="bottom left"),  # wrong position
        dict(label=1),  # wrong class
    ],
)
def test_wrong_attribute_fails(judge, split, change):
    d = S.Digit(7, "red", "top left")
    rule = _one(d.label, d.colour, d.position)
    good = _real(split, rule)
    assert _score(judge, good.images, rule, "single")["alignment"]["single"] >= 0.95
    w = {"label": d.label, "colour": d.colour, "position": d.position, **change}
    wrong = _real(split, _one(w["label"], w["colour"], w["position"]))
    assert _score(judge, wrong.images, rule, "single")["alignment"]["single"] <= 0.05


def test_extra_digit_and_blur_fail_collapse_is_low(judge, split):
    rule = S.MULTI_PROMPTS["a blue digit"]
    good = _real(split, rule, n=200)
    s = _score(judge, good.images, rule)
    assert s["alignment"]["multi"] >= 0.95 and s["multi_coverage"] >= 0.9
    # the mean of the prompt's scenes (what regression to the mean draws) is faint ink everywhere: not one digit
    mean = good.images.mean(0, keepdim=True).expand(10, -1, -1, -1)
    assert _score(judge, mean, rule)["alignment"]["multi"] == 0.0
    # a second digit makes a one-digit prompt wrong
    two = good.images.maximum(good.images.roll(8, dims=-1))  # the digit again in the neighbouring quadrant
    assert _score(judge, two, rule)["alignment"]["multi"] <= 0.05
    # a collapsed set (one blue seven in one place) aligns but covers one class and one position
    one = _real(split, _one(7, "blue", "top left"), n=200)
    c = _score(judge, one.images, rule)
    assert c["alignment"]["multi"] >= 0.95 and c["multi_coverage"] <= 0.2  # (1/10 classes + 1/4 positions) / 2
    # pairs: real pairs align and cover; a wrong sum fails
    pairs = _real(split, S.PAIR_RULE, n=90)
    p = _score(judge, pairs.images, S.PAIR_RULE)
    assert p["alignment"]["multi"] >= 0.9 and p["multi_coverage"] >= 0.8
    bad = S.make_scenes(split.test_images, split.test_labels, 0, 0)
    bad_pair = S.paint(
        [split.test_images[split.test_labels == 3][0], split.test_images[split.test_labels == 4][0]],
        [S.Digit(3, "red", "top left"), S.Digit(4, "red", "top right")],
    )
    assert len(bad.digits) == 0
    assert _score(judge, torch.stack([bad_pair] * 2), S.PAIR_RULE)["alignment"]["multi"] == 0.0


def test_score_rejects_bad_shapes(judge):
    with pytest.raises(BadInput, match="16"):
        judge.score(torch.zeros(2, 1, 8, 8), [S.PAIR_RULE] * 2, ["multi"] * 2)
    with pytest.raises(BadInput, match="rules"):
        judge.score(torch.zeros(2, 3, 16, 16), [S.PAIR_RULE], ["multi"] * 2)
    assert np.isfinite(judge.fd(torch.rand(4, 3, 16, 16) * 2 - 1))


def test_faint_background_speckle_is_not_a_digit():
    """A 1-step student left mid-dark speckle (mean ink ≈ 0.1, nothing above mid-grey) in empty quadrants; only
    ink pixels count as a digit."""
    from apexctl.data import scenes as S

    split = load_split()
    prompt = S.eval_prompts()[0]
    judge = SceneJudge.fit(split, [prompt], seed=0)
    real = S.scenes_for_rule(split.test_images, split.test_labels, prompt.allowed, 8, seed=0).images
    speckle = -0.8 + 0.15 * torch.rand(real.shape, generator=torch.Generator().manual_seed(0))
    noisy = torch.where(real > -0.99, real, speckle)  # the digit untouched, the background speckled
    assert float(((noisy.amax(1) + 1) / 2).mean()) > 0.09  # the old mean-ink rule would see ink everywhere
    assert judge.correct(noisy, [prompt.allowed] * 8).mean() == judge.correct(real, [prompt.allowed] * 8).mean() > 0.5
