"""GenEval scoring on synthetic detections: every task and edge case, expectations worked out from the reference rules
(djghosh13/geneval evaluation/evaluate_images.py; notes/geneval.md §3.4) and written next to each case."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from apexctl.errors import BadInput
from apexctl.eval.geneval.color import masked_crop
from apexctl.eval.geneval.prompts import COLORS, TAG_COUNTS, TASKS, class_names, load_prompts, parse_prompt_selection
from apexctl.eval.geneval.score import (
    Detection,
    Options,
    compute_iou,
    filter_detections,
    relative_position,
    score_image,
    summarize,
)

SINGLE = {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}
TWO = {
    "tag": "two_object",
    "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}],
    "prompt": "a photo of a dog and a cat",
}
COUNT2 = {
    "tag": "counting",
    "include": [{"class": "clock", "count": 2}],
    "exclude": [{"class": "clock", "count": 3}],
    "prompt": "a photo of two clocks",
}
COUNT4 = {
    "tag": "counting",
    "include": [{"class": "person", "count": 4}],
    "exclude": [{"class": "person", "count": 5}],
    "prompt": "a photo of four persons",
}
COLOR = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "blue"}], "prompt": "a photo of a blue car"}
POSITION = {
    "tag": "position",
    "include": [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
    "prompt": "a photo of a dog right of a teddy bear",
}
ATTR = {
    "tag": "color_attr",
    "include": [
        {"class": "wine glass", "count": 1, "color": "purple"},
        {"class": "apple", "count": 1, "color": "black"},
    ],
    "prompt": "a photo of a purple wine glass and a black apple",
}


def det(score, box=(0, 0, 10, 10), color=None, mask=None):
    return Detection(box=list(box), score=score, color=color, mask=mask)


def run(meta, raw, classify=None, **opts):
    r = score_image(meta, raw, classify, Options(**opts))
    return r["correct"], r["reason"]


# ------------------------------------------------------------------ single / two objects, thresholds


def test_single_object_threshold_is_strict():
    # keep score > 0.3 (strict): 0.31 is kept, exactly 0.3 is not
    assert run(SINGLE, {"bench": [det(0.31)]}) == (True, "")
    assert run(SINGLE, {"bench": [det(0.3)]}) == (False, "expected bench>=1, found 0")


def test_missing_class():
    # nothing of the class at all (other classes do not help)
    assert run(SINGLE, {"chair": [det(0.99)]}) == (False, "expected bench>=1, found 0")
    assert run(SINGLE, {}) == (False, "expected bench>=1, found 0")


def test_two_objects_second_below_threshold():
    # dog 0.9 passes 0.3, cat 0.25 does not: the cat clause fails
    assert run(TWO, {"dog": [det(0.9)], "cat": [det(0.25)]}) == (False, "expected cat>=1, found 0")
    assert run(TWO, {"dog": [det(0.9)], "cat": [det(0.35)]}) == (True, "")
    # both missing: one reason line per clause, in include order
    assert run(TWO, {}) == (False, "expected dog>=1, found 0\nexpected cat>=1, found 0")


# ------------------------------------------------------------------ counting


def test_counting_exact_n_is_correct():
    assert run(COUNT2, {"clock": [det(0.95), det(0.92)]}) == (True, "")


def test_counting_n_plus_one_found_is_wrong():
    # include top-2 ≥ 2 passes, but 3 detections ≥ exclude count 3 → wrong
    assert run(COUNT2, {"clock": [det(0.95), det(0.93), det(0.91)]}) == (False, "expected clock<3, found 3")


def test_counting_uses_the_09_threshold_for_include_and_exclude():
    # a third clock at 0.85 (> 0.3 but not > 0.9) is dropped, so N+1 is not reached: correct
    assert run(COUNT2, {"clock": [det(0.95), det(0.93), det(0.85)]}) == (True, "")
    # the second clock at 0.85 is dropped too: only 1 of 2 found
    assert run(COUNT2, {"clock": [det(0.95), det(0.85)]}) == (False, "expected clock>=2, found 1")
    # the same detections under a non-counting tag use 0.3: all three kept
    assert len(filter_detections({"clock": [det(0.95), det(0.93), det(0.85)]}, "two_object")["clock"]) == 3


def test_counting_max_16_objects_per_class():
    # 20 persons at 0.95: at most 16 kept, the exclude reason reports 16
    raw = {"person": [det(0.95 + i * 1e-4) for i in range(20)]}
    assert run(COUNT4, raw) == (False, "expected person<5, found 16")
    assert len(filter_detections(raw, "counting")["person"]) == 16


def test_nms_disabled_by_default_enabled_with_max_overlap():
    # two identical boxes are two clocks at max_overlap 1.0 (NMS off) ...
    raw = {"clock": [det(0.95, (0, 0, 10, 10)), det(0.94, (0, 0, 10, 10))]}
    assert run(COUNT2, raw) == (True, "")
    # ... and one clock with NMS at IoU 0.5 (IoU = 1 ≥ 0.5 suppresses the second)
    assert run(COUNT2, raw, max_overlap=0.5) == (False, "expected clock>=2, found 1")


def test_compute_iou_plus_one_convention():
    assert compute_iou([0, 0, 9, 9], [0, 0, 9, 9]) == 1.0
    # areas 10×10 = 100 each, intersection x 5..9 → 5×10 = 50, union 150
    assert compute_iou([0, 0, 9, 9], [5, 0, 14, 9]) == pytest.approx(1 / 3)
    assert compute_iou([0, 0, 9, 9], [20, 20, 29, 29]) == 0


def test_sort_is_by_score_descending():
    kept = filter_detections({"dog": [det(0.4), det(0.9), det(0.6)]}, "single_object")["dog"]
    assert [d.score for d in kept] == [0.9, 0.6, 0.4]


# ------------------------------------------------------------------ position


def test_relative_position_rules():
    teddy = det(0.9, (0, 0, 100, 100))
    # centres (250, 50) vs (50, 50): offset (200, 0), shrunk by 0.1·(100+100) = 20 → (180, 0); dx = 180/200 = 0.9
    assert relative_position(det(0.9, (200, 0, 300, 100)), teddy) == {"right of"}
    assert relative_position(teddy, det(0.9, (200, 0, 300, 100))) == {"left of"}
    # diagonal: offset (150, 150) → shrunk (130, 130), / |offset| 212.1 → 0.613 on both axes
    assert relative_position(det(0.9, (150, 150, 250, 250)), teddy) == {"right of", "below"}
    # offset (105, 60) → shrunk (85, 40) / 120.9 → dx 0.70, dy 0.33: right of only
    assert relative_position(det(0.9, (105, 60, 205, 160)), teddy) == {"right of"}
    # overlapping: offset (10, 0) < margin 20 → shrunk to 0 on both axes → no relation at all
    assert relative_position(det(0.9, (10, 0, 110, 100)), teddy) == set()
    # above: y grows downward
    assert relative_position(det(0.9, (0, -300, 100, -200)), teddy) == {"above"}


def test_position_correct_and_wrong():
    teddy = det(0.9, (0, 0, 100, 100))
    assert run(POSITION, {"teddy bear": [teddy], "dog": [det(0.9, (200, 0, 300, 100))]}) == (True, "")
    assert run(POSITION, {"teddy bear": [teddy], "dog": [det(0.9, (-300, 0, -200, 100))]}) == (
        False,
        "expected dog right of target, found left of target",
    )


def test_position_of_overlapping_boxes_is_wrong():
    # the reference's reason for an empty relation set joins nothing: "found  target" (two spaces)
    raw = {"teddy bear": [det(0.9, (0, 0, 100, 100))], "dog": [det(0.9, (10, 0, 110, 100))]}
    assert run(POSITION, raw) == (False, "expected dog right of target, found  target")


def test_position_only_top1_objects_count():
    # a second, lower-scored dog on the wrong side is ignored (only the top `count` = 1 objects are compared)
    raw = {
        "teddy bear": [det(0.9, (0, 0, 100, 100))],
        "dog": [det(0.9, (200, 0, 300, 100)), det(0.5, (-300, 0, -200, 100))],
    }
    assert run(POSITION, raw) == (True, "")


def test_position_without_target():
    # the reference object is missing: its clause fails and the dependent clause reports "no target"
    assert run(POSITION, {"dog": [det(0.9, (200, 0, 300, 100))]}) == (
        False,
        "expected teddy bear>=1, found 0\nno target for dog to be right of",
    )


# ------------------------------------------------------------------ colours


def test_color_from_detection_and_only_top1_classified():
    assert run(COLOR, {"car": [det(0.9, color="blue")]}) == (True, "")
    # the top car is red, a lower blue one is not looked at
    assert run(COLOR, {"car": [det(0.9, color="red"), det(0.5, color="blue")]}) == (
        False,
        "expected blue car>=1, found 0 blue; and 1 red",
    )


def test_color_mismatch_on_one_of_two_objects():
    # purple wine glass right, apple white instead of black → wrong, reason names the apple only
    raw = {"wine glass": [det(0.9, color="purple")], "apple": [det(0.8, color="white")]}
    assert run(ATTR, raw) == (False, "expected black apple>=1, found 0 black; and 1 white")
    raw["apple"][0].color = "black"
    assert run(ATTR, raw) == (True, "")


def test_color_classifier_called_only_for_objects_without_color():
    calls = []

    def classify(found, cls):
        calls.append((cls, len(found)))
        return ["purple"] * len(found)

    raw = {"wine glass": [det(0.9), det(0.7)], "apple": [det(0.8, color="black")]}
    assert run(ATTR, raw, classify) == (True, "")
    assert calls == [("wine glass", 1)]  # the top-1 glass only; the apple brought its own colour
    with pytest.raises(BadInput, match="--clip"):
        run(ATTR, raw, None)


def test_masked_crop_keeps_object_pixels_over_999_grey():
    img = Image.new("RGB", (8, 6), (200, 10, 10))
    mask = np.zeros((6, 8), dtype=bool)
    mask[1:3, 2:4] = True
    crop = masked_crop(img, det(0.9, (1, 1, 5, 4), mask=mask))
    arr = np.asarray(crop)
    assert crop.size == (4, 3)  # box x 1..5, y 1..4
    assert tuple(arr[0, 1]) == (200, 10, 10)  # image (2, 1): in the mask
    assert tuple(arr[0, 0]) == (0x99, 0x99, 0x99)  # image (1, 1): outside the mask → #999
    # no mask: the whole box of the original image
    assert tuple(np.asarray(masked_crop(img, det(0.9, (1, 1, 5, 4))))[0, 0]) == (200, 10, 10)


# ------------------------------------------------------------------ summary, options, prompts


def test_summary_overall_is_mean_of_tasks_not_images():
    rows = [{"tag": "single_object", "correct": c, "metadata": json.dumps(SINGLE)} for c in (True, True, True, True)]
    rows += [{"tag": "counting", "correct": c, "metadata": json.dumps({"i": k})} for k, c in enumerate([True, False])]
    s = summarize(rows)
    assert s["tasks"]["single_object"]["accuracy"] == 1.0 and s["tasks"]["counting"]["accuracy"] == 0.5
    assert s["overall"] == pytest.approx(0.75)  # (1.0 + 0.5) / 2, while the micro rate is 5/6
    assert s["correct_images"] == pytest.approx(5 / 6)
    assert s["prompts"] == 3 and s["correct_prompts"] == pytest.approx(2 / 3)  # a prompt counts if any image is right


def test_options_parse():
    o = Options.parse(["threshold=0.5", "max_objects=8", "bgcolor=original"])
    assert (o.threshold, o.max_objects, o.bgcolor, o.counting_threshold) == (0.5, 8, "original", 0.9)
    for bad in ["nope=1", "threshold", "max_objects=x"]:
        with pytest.raises(BadInput, match="--option"):
            Options.parse([bad])


def test_shipped_prompts_match_the_reference_counts():
    prompts = load_prompts()
    assert len(prompts) == 553 and len(class_names()) == 80 and len(COLORS) == 10
    assert {t: sum(p["tag"] == t for p in prompts) for t in TASKS} == TAG_COUNTS
    assert {t: 4 * n for t, n in TAG_COUNTS.items()} == {
        "single_object": 320,
        "two_object": 396,
        "counting": 320,
        "colors": 376,
        "position": 400,
        "color_attr": 400,
    }
    assert all(req["class"] in class_names() for p in prompts for req in p["include"])


def test_parse_prompt_selection():
    assert parse_prompt_selection("0:3") == [0, 1, 2]
    assert parse_prompt_selection("5,3,3") == [3, 5]
    assert parse_prompt_selection("550:") == [550, 551, 552]
    assert len(parse_prompt_selection(None)) == 553
    for bad in ["x", "600", "1:2:3:4"]:
        with pytest.raises(BadInput, match="--prompts"):
            parse_prompt_selection(bad)
