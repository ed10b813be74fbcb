"""The digits data, the image writers and the digits judge (docs/design.md §8). Fast: the judge is fitted once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from apexctl.data.digits import (
    MULTI_PROMPTS,
    NAMES,
    SINGLE_TEMPLATES,
    all_prompts,
    eval_prompts,
    load_split,
    training_pairs,
)
from apexctl.errors import BadInput
from apexctl.eval.toy.digits import format_table, real_reference
from apexctl.images import PAD, make_grid, save_grid, save_png, to_uint8


@pytest.fixture(scope="module")
def judge(digits_judge):  # split and digits_judge: tests/conftest.py
    return digits_judge


@pytest.fixture(scope="module")
def real(judge, split):
    return real_reference(judge, split)


def _class_means(split) -> torch.Tensor:
    """[10, 1, 8, 8]: the per-class mean train image, the blur a collapsed one-step model produces."""
    return torch.stack([split.train_images[split.train_labels == c].mean(0) for c in range(10)])


def _single(labels) -> tuple[list[frozenset[int]], list[str]]:
    return [frozenset({int(y)}) for y in labels], ["single"] * len(labels)


# --- data -----------------------------------------------------------------------------------------------------


def test_split_sizes_range_stratified_deterministic(split):
    assert split.train_images.shape == (1400, 1, 8, 8) and split.test_images.shape == (397, 1, 8, 8)
    assert split.train_images.dtype == torch.float32 and split.train_labels.dtype == torch.int64
    # ink is +1, background −1: every digit has both, and most pixels are background
    assert split.train_images.min() == -1.0 and split.train_images.max() == 1.0
    assert (split.train_images < 0).float().mean() > 0.5
    # stratified: each class's share of the test set is within one image of its share overall
    all_labels = torch.cat([split.train_labels, split.test_labels])
    expected = torch.bincount(all_labels, minlength=10).double() * 397 / len(all_labels)
    assert (torch.bincount(split.test_labels, minlength=10).double() - expected).abs().max() <= 1.0
    again = load_split()
    assert torch.equal(again.test_images, split.test_images) and torch.equal(again.train_labels, split.train_labels)
    other = load_split(seed=1)
    assert not torch.equal(other.test_labels, split.test_labels)
    with pytest.raises(BadInput):
        load_split(holdout=5)


def test_training_pairs_contents_and_determinism(split):
    labels = split.train_labels
    pairs = training_pairs(labels, seed=0)
    assert pairs == training_pairs(labels, seed=0)
    assert pairs != training_pairs(labels, seed=1)  # template draws differ
    by_image: dict[int, list[str]] = {}
    for i, p in pairs:
        by_image.setdefault(i, []).append(p)
    assert sorted(by_image) == list(range(len(labels)))
    i7 = int(torch.nonzero(labels == 7)[0])
    singles = [p for p in by_image[i7] if p not in MULTI_PROMPTS]
    assert len(singles) == 1 and singles[0] in [t.format("seven") for t in SINGLE_TEMPLATES]
    assert sorted(p for p in by_image[i7] if p in MULTI_PROMPTS) == sorted(
        ["an odd digit", "a digit greater than five", "any digit"]
    )
    i5 = int(torch.nonzero(labels == 5)[0])
    assert sorted(p for p in by_image[i5] if p in MULTI_PROMPTS) == ["an odd digit", "any digit"]
    # every pair is correct: a single names the label; a multi's set holds it
    for i, p in pairs:
        y = int(labels[i])
        assert (y in MULTI_PROMPTS[p]) if p in MULTI_PROMPTS else p.endswith(" " + NAMES[y])
    # the documented mix: 1400 single, 4058 multi; all three templates used
    n_single = sum(p not in MULTI_PROMPTS for _, p in pairs)
    assert (n_single, len(pairs) - n_single) == (1400, 4058)
    assert all(any(p.startswith(t.format("")) for _, p in pairs) for t in SINGLE_TEMPLATES)


def test_eval_and_all_prompts():
    ev = eval_prompts()
    assert [e.prompt for e in ev[:10]] == [f"a handwritten digit {n}" for n in NAMES]
    assert all(e.kind == "single" and e.allowed == frozenset({d}) for d, e in enumerate(ev[:10]))
    assert {e.prompt: e.allowed for e in ev[10:]} == MULTI_PROMPTS and all(e.kind == "multi" for e in ev[10:])
    prompts = all_prompts()
    assert len(prompts) == len(set(prompts)) == 35
    assert {e.prompt for e in ev} <= set(prompts)
    assert {p for _, p in training_pairs(list(range(10)) * 20)} <= set(prompts)


# --- judge ----------------------------------------------------------------------------------------------------


def test_judge_accuracy_and_real_alignment(judge, split, real):
    assert judge.judge_test_accuracy >= 0.95 and judge.test_accuracy == judge.judge_test_accuracy
    r = judge.score(split.test_images, *_single(split.test_labels))
    assert r["alignment"]["single"] >= 0.95 and r["alignment"]["multi"] is None
    assert r["alignment"]["single"] == pytest.approx(judge.judge_test_accuracy)
    assert real["alignment"]["single"] == pytest.approx(judge.judge_test_accuracy)
    assert real["alignment"]["multi"] >= 0.95 and real["multi_coverage"] == 1.0
    # real images under "any digit" spread over all ten classes
    assert min(real["class_histogram"]["any digit"]) >= 20


def test_real_reference_floor(real):
    # measured: FD 1.14, FD-PCA 0.217 (toy study 0.216), diversity 0.326 (toy study 0.327)
    assert 0.3 < real["fd"] < 3.0
    assert 0.1 < real["fd_pca"] < 0.5
    assert 0.30 < real["diversity"] < 0.36


def test_class_means_are_flagged_as_collapse(judge, split, real):
    means = _class_means(split)
    images = means.repeat_interleave(100, dim=0)
    r = judge.score(images, *_single(torch.arange(10).repeat_interleave(100)))
    assert r["alignment"]["single"] >= 0.9  # the blur is recognisable: alignment alone cannot see collapse
    assert r["diversity"] < 0.01 < 0.30 < real["diversity"]  # measured 0.000
    assert r["fd"] > 5 * real["fd"]  # measured 15.8 vs 1.14
    assert r["fd_pca"] > 5 * real["fd_pca"]  # measured 5.1 vs 0.22


def test_train_subset_fd_small_vs_class_means(judge, split):
    rng = np.random.default_rng(0)
    sub = split.train_images[rng.choice(1400, 397, replace=False)]
    blur = _class_means(split)[split.test_labels]  # the same label mix as the test set, each image its class mean
    assert judge.fd(sub) * 5 < judge.fd(blur)
    noise = torch.rand(397, 1, 8, 8) * 2 - 1
    assert judge.fd(blur) < judge.fd(noise)  # ordering: real < blurred means < noise


def test_even_blur_collapses_to_one_class(judge, split, real):
    even_mean = split.train_images[split.train_labels % 2 == 0].mean(0, keepdim=True)
    images = even_mean.repeat(100, 1, 1, 1)
    r = judge.score(images, [MULTI_PROMPTS["an even digit"]] * 100, ["multi"] * 100)
    hist = r["class_histogram"]["an even digit"]
    assert sum(hist) == 100 and sum(c > 0 for c in hist) == 1  # one class takes everything
    assert r["alignment"]["multi"] >= 0.9  # the blur reads as an even digit, so alignment is fooled...
    assert r["multi_coverage"] == pytest.approx(1 / 5)  # ...but coverage is not: 1 of 5 allowed classes
    assert real["multi_coverage"] == 1.0
    assert r["diversity"] == 0.0


def test_score_gray_rgb_equivalence_and_validation(judge, split):
    x = split.test_images[:50]
    allowed, kinds = _single(split.test_labels[:50])
    gray = judge.score(x, allowed, kinds)
    d = 0.5 * (1 - x.abs())  # channels x+d, x−d, x: all in range, grey mean x, no channel equal to grey alone
    rgb = judge.score(torch.cat([x + d, x - d, x], dim=1), allowed, kinds)
    assert gray["alignment"] == rgb["alignment"] and gray["fd"] == pytest.approx(rgb["fd"])
    # out-of-range values are clamped, as a saved PNG would show them
    assert judge.score(x * 3, allowed, kinds)["fd"] == pytest.approx(
        judge.score((x * 3).clamp(-1, 1), allowed, kinds)["fd"]
    )
    with pytest.raises(BadInput):
        judge.score(x, allowed[:-1], kinds)
    with pytest.raises(BadInput):
        judge.score(x, allowed, ["weird"] * 50)
    # larger images (data.resolution > 8) are area-averaged back to 8×8: a 4× nearest upscale scores the same
    big = judge.score(x.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3), allowed, kinds)
    assert big["alignment"] == gray["alignment"] and big["fd"] == pytest.approx(gray["fd"])
    with pytest.raises(BadInput):
        judge.score(torch.zeros(4, 1, 4, 4), allowed[:4], kinds[:4])
    with pytest.raises(BadInput):
        judge.score(torch.zeros(4, 1, 16, 8), allowed[:4], kinds[:4])


def test_format_table_renders_rows(real):
    from rich.console import Console

    console = Console(width=120, record=True)
    console.print(format_table({"real data": real, "apex 1 step": {"alignment": {"single": 0.5}, "n": 10}}))
    text = console.export_text()
    assert "real data" in text and "apex 1 step" in text and f"{real['fd']:.2f}" in text and "0.500" in text


# --- images ---------------------------------------------------------------------------------------------------


def test_to_uint8_mapping():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4)
    u8 = to_uint8(x)
    assert u8.shape == (1, 1, 4, 3) and u8.dtype == np.uint8
    assert u8[0, 0, :, 0].tolist() == [0, 128, 255, 255]


def test_grid_and_png_sizes(tmp_path, split):
    images = split.test_images[:10]
    path = save_grid(images, tmp_path / "sub" / "grid.png", nrow=5, upscale=4)
    with Image.open(path) as im:
        assert im.size == (5 * 32 + 6 * PAD, 2 * 32 + 3 * PAD)
    assert not [p for p in path.parent.iterdir() if p.name != "grid.png"]  # no temp file left behind
    marks = [True, False, None] + [None] * 7
    labelled = make_grid(images, nrow=5, upscale=4, labels=["a handwritten digit seven", "an even digit"], marks=marks)
    assert labelled.size[1] == 2 * 32 + 3 * PAD and labelled.size[0] > 5 * 32 + 6 * PAD
    arr = np.asarray(labelled)
    x0 = labelled.size[0] - (5 * 32 + 5 * PAD)  # first cell's left edge
    assert tuple(arr[PAD, x0 + 31]) == (0, 200, 0) and tuple(arr[PAD, x0 + 32 + PAD + 31]) == (220, 0, 0)
    png = save_png(images[0], tmp_path / "one.png", upscale=4)
    with Image.open(png) as im:
        assert im.size == (32, 32)
        assert np.array_equal(np.asarray(im.convert("RGB"))[::4, ::4], to_uint8(images[:1])[0])
    with pytest.raises(ValueError):
        make_grid(images, nrow=5, labels=["only one"])
