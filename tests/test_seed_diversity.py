"""One-step seed collapse, measured directly: ``seed_diversity`` and ``fd_single`` of the digits and scenes judges,
their real-data rows, and where they are shown (console table, HTML report, bench/quality.py)."""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from apexctl.data import scenes as S
from apexctl.data.digits import MULTI_PROMPTS, eval_prompts, single_prompt
from apexctl.errors import BadInput
from apexctl.eval.toy.digits import (
    _gaussian,
    format_table,
    frechet_distance,
    pairwise_rms,
    real_reference,
)

P3, P7, P0 = single_prompt(3), single_prompt(7), single_prompt(0)


@pytest.fixture(scope="module")
def judge(digits_judge):  # split, digits_judge and scene_judge: tests/conftest.py
    return digits_judge


def _of_class(split, k: int, n: int, seed: int = 0, train: bool = True) -> torch.Tensor:
    images, labels = (split.train_images, split.train_labels) if train else (split.test_images, split.test_labels)
    pool = np.flatnonzero(labels.numpy() == k)
    return images[np.random.default_rng(seed).choice(pool, size=n, replace=False)]


def _brute_rms(x: np.ndarray) -> float:
    """The definition, pair by pair: mean over i < j of sqrt(mean((x_i − x_j)²))."""
    return float(np.mean([math.sqrt(np.mean((a - b) ** 2)) for a, b in itertools.combinations(x, 2)]))


# --- the arithmetic -------------------------------------------------------------------------------------------


def test_pairwise_rms_by_hand():
    # 4 pixels: a = 0, b = 1, c = one pixel at 1 → RMS(a,b) = 1, RMS(a,c) = sqrt(1/4), RMS(b,c) = sqrt(3/4)
    x = np.array([[0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=np.float64)
    assert pairwise_rms(x) == pytest.approx((1 + 0.5 + math.sqrt(0.75)) / 3, abs=1e-12)
    assert pairwise_rms(np.repeat(x[:1], 5, axis=0)) == 0.0  # identical rows: exactly 0
    assert pairwise_rms(x[:1]) is None  # no pair
    rng = np.random.default_rng(0)
    y = rng.random((17, 64))
    assert pairwise_rms(y) == pytest.approx(_brute_rms(y), rel=1e-12)


def _digit_images() -> tuple[torch.Tensor, list[str]]:
    """3 images for each of three single prompts, in [−1, 1] at 8×8 (grey = channel mean after clamping).

    P3: all background (0 in [0, 1]), all ink (1), top half ink → RMS 1, sqrt(1/2), sqrt(1/2): mean 0.80474.
    P7: three identical images → 0. P0: grey 0, 0.5, 1 (in [0, 1]) → RMS 0.5, 1, 0.5: mean 2/3."""
    bg, ink = torch.full((1, 8, 8), -1.0), torch.full((1, 8, 8), 1.0)
    half = bg.clone()
    half[:, :4] = 1.0
    mid = torch.zeros(1, 8, 8)
    p3 = [bg, ink, half]
    p7 = [half.flip(-1)] * 3
    p0 = [bg, mid, ink]
    rgb = [torch.cat([x, x * 3, x]) for x in p3 + p7 + p0]  # 3x clamps back to x (x ∈ {−1, 0, 1}): grey = x
    return torch.stack(rgb), [P3] * 3 + [P7] * 3 + [P0] * 3


SD3 = (1 + 2 * math.sqrt(0.5)) / 3


def test_digits_seed_diversity_by_hand(judge):
    images, prompts = _digit_images()
    allowed = [frozenset({{P3: 3, P7: 7, P0: 0}[p]}) for p in prompts]
    r = judge.score(images, allowed, ["single"] * 9, prompts)
    per = r["seed_diversity_per_prompt"]
    assert list(per) == [P3, P7, P0]  # first-seen order
    assert per[P3] == pytest.approx(SD3, abs=1e-12)
    assert per[P7] == 0.0
    assert per[P0] == pytest.approx(2 / 3, abs=1e-12)
    assert r["seed_diversity"] == pytest.approx((SD3 + 0 + 2 / 3) / 3, abs=1e-12)
    assert isinstance(r["seed_diversity"], float) and all(type(v) is float for v in per.values())

    # interleaved order and extra multi images: each value still belongs to its prompt; multi images are not used
    order = [0, 3, 6, 1, 4, 7, 2, 5, 8]
    extra = torch.rand(4, 3, 8, 8) * 2 - 1
    shuffled = judge.score(
        torch.cat([images[order], extra]),
        [allowed[i] for i in order] + [MULTI_PROMPTS["any digit"]] * 4,
        ["single"] * 9 + ["multi"] * 4,
        [prompts[i] for i in order] + ["any digit"] * 4,
    )
    assert list(shuffled["seed_diversity_per_prompt"]) == [P3, P7, P0]
    for p in (P3, P7, P0):
        assert shuffled["seed_diversity_per_prompt"][p] == pytest.approx(per[p], abs=1e-12)
        assert shuffled["fd_single_per_prompt"][p] == pytest.approx(r["fd_single_per_prompt"][p], rel=1e-9)


def test_digits_metrics_are_none_without_prompts_or_single_prompts(judge, split):
    x = split.test_images[:20]
    allowed, kinds = [frozenset({int(y)}) for y in split.test_labels[:20]], ["single"] * 20
    r = judge.score(x, allowed, kinds)  # existing callers: no prompts
    assert r["seed_diversity"] is None and r["seed_diversity_per_prompt"] is None
    assert r["fd_single"] is None and r["fd_single_per_prompt"] is None
    assert r["fd"] > 0 and r["alignment"]["single"] is not None  # the rest is unchanged
    multi = judge.score(x, [MULTI_PROMPTS["any digit"]] * 20, ["multi"] * 20, ["any digit"] * 20)
    assert multi["seed_diversity"] is None and multi["fd_single"] is None
    # P3 has one image (no pair, no covariance): None, and the means are over the prompts that have a value
    one = judge.score(x[:3], [frozenset({3}), frozenset({7}), frozenset({7})], kinds[:3], [P3, P7, P7])
    assert one["seed_diversity_per_prompt"][P3] is None and one["fd_single_per_prompt"][P3] is None
    assert one["seed_diversity"] == one["seed_diversity_per_prompt"][P7] > 0
    assert one["fd_single"] == one["fd_single_per_prompt"][P7] > 0
    with pytest.raises(BadInput, match="different allowed"):
        judge.score(x[:2], [frozenset({3}), frozenset({7})], ["single"] * 2, [P3, P3])


def test_fd_single_hand_formula_and_prompt_attribution(judge, split):
    """fd_single[p] is the FD (PCA-20) between p's images and the TEST images of p's class; a collapsed prompt
    scores far above real images of the class, and the distance follows the prompt, not the images."""
    real3 = _of_class(split, 3, 100, seed=1)
    collapsed7 = _of_class(split, 7, 1, seed=2).expand(100, -1, -1, -1)
    images = torch.cat([real3, collapsed7])
    prompts, allowed = [P3] * 100 + [P7] * 100, [frozenset({3})] * 100 + [frozenset({7})] * 100
    r = judge.score(images, allowed, ["single"] * 200, prompts)
    fd = r["fd_single_per_prompt"]

    def by_hand(x: torch.Tensor, k: int) -> float:
        z = judge.pca.transform(x.reshape(len(x), 64).double().numpy())
        t = judge.pca.transform(split.test_images[split.test_labels == k].reshape(-1, 64).double().numpy())
        return frechet_distance(*_gaussian(z), *_gaussian(t))

    assert fd[P3] == pytest.approx(by_hand(real3, 3), rel=1e-9)
    assert fd[P7] == pytest.approx(by_hand(collapsed7, 7), rel=1e-9)
    assert r["fd_single"] == pytest.approx((fd[P3] + fd[P7]) / 2, rel=1e-12)
    # measured: 100 real train threes 1.58, one seven ×100 13.3
    assert fd[P7] > 5 * fd[P3]
    assert r["seed_diversity_per_prompt"][P7] == 0.0 < 0.2 < r["seed_diversity_per_prompt"][P3]
    # real sevens under the seven prompt are close; real threes under the seven prompt are not
    real7 = _of_class(split, 7, 100, seed=3)
    good = judge.score(real7, [frozenset({7})] * 100, ["single"] * 100, [P7] * 100)["fd_single"]
    wrong = judge.score(real3, [frozenset({7})] * 100, ["single"] * 100, [P7] * 100)["fd_single"]
    assert good * 5 < fd[P7] and good * 5 < wrong  # measured: 2.02, 22.5


def test_digits_real_reference_rows(judge, split):
    real = real_reference(judge, split)
    prompts = [single_prompt(k) for k in range(10)]
    assert list(real["seed_diversity_per_prompt"]) == prompts and list(real["fd_single_per_prompt"]) == prompts
    # seed diversity of the real row = that of each class's test images, by the definition
    test_k = ((split.test_images[split.test_labels == 4].reshape(-1, 64).double() + 1) / 2).numpy()
    assert real["seed_diversity_per_prompt"][single_prompt(4)] == pytest.approx(_brute_rms(test_k), rel=1e-9)
    assert real["seed_diversity"] == pytest.approx(np.mean(list(real["seed_diversity_per_prompt"].values())))
    # measured: seed diversity 0.287 (0.21 for zeros … 0.32 for ones), fd_single 1.28 (0.62 … 1.80)
    assert 0.2 < real["seed_diversity"] < 0.4
    assert 0.3 < real["fd_single"] < 3.0  # train draws vs test: a floor, not 0
    assert all(v > 0 for v in real["fd_single_per_prompt"].values())


def test_format_table_shows_the_new_columns(judge, split):
    from rich.console import Console

    images, prompts = _digit_images()
    r = judge.score(images, [frozenset({3})] * 9, ["single"] * 9, prompts)
    r = {**r, "fd": 17.5, "n": 1500}
    console = Console(width=120, record=True)  # run_eval prints at 120 columns when not on a terminal
    console.print(format_table({"real data (held-out)": r, "old row": {"alignment": {"single": 0.5}, "n": 10}}))
    text = console.export_text()
    assert "seed div" in text and "single ↓" in text and "…" not in text  # nothing squeezed
    assert f"{r['seed_diversity']:.3f}" in text and f"{r['fd_single']:.2f}" in text


# --- scenes ---------------------------------------------------------------------------------------------------


def _canvas(fill: dict[int, float] | None = None, quadrant: str = "top left") -> torch.Tensor:
    """A background canvas (−1) with the given channels of one quadrant set to a value."""
    x = torch.full((3, 16, 16), -1.0)
    r, c = S.POSITIONS[quadrant]
    for ch, v in (fill or {}).items():
        x[ch, r : r + 8, c : c + 8] = v
    return x


def test_scenes_seed_diversity_by_hand(scene_judge):
    """Over all 3·16·16 values in [0, 1]: A = background, B = one quadrant's red channel lit (64 of 768 values at 1),
    C = that quadrant white (192 values) → RMS sqrt(64/768), sqrt(192/768), sqrt(128/768)."""
    rule = S.SceneRule(frozenset({7}), frozenset({"red"}), frozenset({"top left"}))
    other = S.SceneRule(frozenset({2}), frozenset({"blue"}), frozenset({"bottom right"}))
    a, b, c = _canvas(), _canvas({0: 5.0}), _canvas({0: 1.0, 1: 1.0, 2: 1.0})  # 5 clamps to 1
    same = _canvas({2: 0.3}, "bottom right")
    images = torch.stack([a, same, b, same, c, same])  # interleaved prompts
    pa, pb = "a red seven in the top left", "a blue two in the bottom right"
    r = scene_judge.score(images, [rule, other] * 3, ["single"] * 6, [pa, pb] * 3)
    want = (math.sqrt(64 / 768) + math.sqrt(192 / 768) + math.sqrt(128 / 768)) / 3
    assert r["seed_diversity_per_prompt"][pa] == pytest.approx(want, abs=1e-12)
    assert r["seed_diversity_per_prompt"][pb] == 0.0
    assert r["seed_diversity"] == pytest.approx(want / 2, abs=1e-12)
    assert list(r["fd_single_per_prompt"]) == [pa, pb] and all(v > 0 for v in r["fd_single_per_prompt"].values())
    none = scene_judge.score(images, [rule, other] * 3, ["single"] * 6)  # no prompts
    assert none["seed_diversity"] is None and none["fd_single"] is None
    # a single-kind rule that is not fully specified has seed diversity but no real set for fd_single
    loose = S.SceneRule(frozenset({7}), frozenset({"red"}))
    lr = scene_judge.score(images[::2], [loose] * 3, ["single"] * 3, ["a red seven"] * 3)
    assert lr["seed_diversity"] == pytest.approx(want, abs=1e-12) and lr["fd_single_per_prompt"] == {
        "a red seven": None
    }


def test_scenes_single_reference_and_fd_single(scene_judge, split):
    rule = S.SceneRule(frozenset({7}), frozenset({"red"}), frozenset({"bottom left"}))
    ref = scene_judge.single_reference(rule)
    sevens = split.test_images[split.test_labels == 7]
    assert ref.shape == (len(sevens), 3, 16, 16)  # every held-out seven, once
    assert torch.allclose(ref[:, 0, 8:, :8], sevens[:, 0])  # ink in red, at the bottom left
    assert (ref[:, 1:] == -1).all() and (ref[:, 0, :8] == -1).all() and (ref[:, 0, :, 8:] == -1).all()
    assert scene_judge.single_reference(S.MULTI_PROMPTS["a green three"]) is None  # position open
    # a collapsed prompt (one real scene for every seed) is far from its real set; train-digit scenes are close
    prompt = "a red seven in the bottom left"
    real = S.scenes_for_rule(split.train_images, split.train_labels, rule, 60, seed=4).images
    collapsed = real[:1].expand(60, -1, -1, -1)
    r = scene_judge.score(torch.cat([real, collapsed]), [rule] * 120, ["single"] * 120, [prompt] * 60 + ["c"] * 60)
    fd = r["fd_single_per_prompt"]
    assert fd[prompt] == pytest.approx(scene_judge.fd_single(real, rule), rel=1e-9)
    assert fd["c"] > 5 * fd[prompt]  # measured: 73.2 vs 4.10
    assert r["seed_diversity_per_prompt"]["c"] == 0.0 < r["seed_diversity_per_prompt"][prompt]


def test_scenes_real_reference_rows(scene_judge, split):
    from apexctl.eval.toy.scenes import _pixels, real_reference

    prompts = S.eval_prompts()
    real = real_reference(scene_judge, split, prompts, per_prompt=30)
    singles = [p for p in prompts if p.kind == "single"]
    assert list(real["seed_diversity_per_prompt"]) == [p.prompt for p in singles]
    assert list(real["fd_single_per_prompt"]) == [p.prompt for p in singles]
    p0 = singles[0]
    x = (_pixels(scene_judge.single_reference(p0.allowed)) + 1) / 2
    assert real["seed_diversity_per_prompt"][p0.prompt] == pytest.approx(_brute_rms(x.reshape(len(x), -1)), rel=1e-9)
    # measured: seed diversity 0.095 (white digits 0.14, coloured 0.06–0.09), fd_single 6.5
    assert 0.05 < real["seed_diversity"] < 0.15
    assert all(v is not None and v > 0 for v in real["fd_single_per_prompt"].values())


# --- where they are shown -------------------------------------------------------------------------------------


def test_report_digits_table_shows_the_new_metrics():
    from apexctl.eval.report.report import _digits_table, summary_kind

    summary = {
        "judge_test_accuracy": 0.97,
        "rows": {
            "teacher 50 steps": {
                "alignment": {"single": 0.9},
                "seed_diversity": 0.256,
                "fd_single": 44.5,
                "seed_diversity_per_prompt": {P3: 0.25, P7: 0.2625},
                "fd_single_per_prompt": {P3: 40.0, P7: 49.0},
                "n": 1500,
            },
            "student 1 step": {"alignment": {"single": 0.8}, "seed_diversity": 0.103, "n": 1500},
        },
    }
    assert summary_kind(summary) == "digits"
    html = _digits_table(summary)
    assert "seed div" in html and "FD single" in html and "0.256" in html and "44.5" in html
    assert html.count("<table>") == 3  # the rows, then seed diversity and FD per single prompt
    assert P7 in html and "0.2625" in html and ">49<" in html


@pytest.fixture(scope="module")
def q():
    path = Path(__file__).resolve().parents[1] / "bench" / "quality.py"
    spec = importlib.util.spec_from_file_location("bench_quality", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_quality_bench_scores_and_renders_the_new_columns(q, judge):
    prompts = eval_prompts()
    ev = q._evaluator(judge, prompts, per_prompt=3, resolution=8)
    images = torch.rand(len(ev.texts), 1, 8, 8) * 2 - 1
    got = ev.score(images)
    kinds = [p.kind for p in prompts for _ in range(3)]
    want = judge.score(images, [p.allowed for p in prompts for _ in range(3)], kinds, ev.texts)
    assert got["seed_diversity"] == want["seed_diversity"] and got["fd_single"] == want["fd_single"]
    assert got["seed_diversity"] > 0 and got["fd_single"] > 0
    keys = [k for k, _, _ in q.COLUMNS]
    assert "seed_diversity" in keys and "fd_single" in keys
    recs = [
        {"key": f"apex|{s}", "row": "apex", "group": "main", "seed": s, "train_s": 1.0, "evals": {"1": e}}
        for s, e in enumerate([{"seed_diversity": 0.1, "fd_single": 30.0}, {"seed_diversity": 0.3, "fd_single": 10.0}])
    ]
    entries = q.aggregate([q.Row("apex", "main")], recs)
    assert entries[0]["cells"]["seed_diversity"].median == pytest.approx(0.2)
    table = q.markdown_table(entries)
    assert "seed div" in table and "FD single" in table
    assert "0.200 (0.100–0.300)" in table and "20.00 (10.00–30.00)" in table
    assert "seed div 0.200, FD single 20.00" in q.questions(entries)
