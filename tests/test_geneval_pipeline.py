"""``apexctl eval geneval`` end to end on tiny models built in code: generation in the reference layout (resumable),
scoring through the real ``from_pretrained`` of a tiny Mask2Former and a tiny CLIP, the detections-file backend,
the completeness check and the missing-weights errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_eval_models import build_tiny_clip, build_tiny_mask2former
from typer.testing import CliRunner

from apexctl.cli import app
from apexctl.errors import BadInput
from apexctl.eval.geneval.detect import Mask2FormerDetector, _label_map, rle_decode, rle_encode
from apexctl.eval.geneval.prompts import class_names, load_prompts

runner = CliRunner()
# one prompt of each kind the pipeline branches on: single (0), counting (200), position (400), colour + attr (500)
PICK = "0,200,400,500"
FAST = ["--option", "resize_short=64", "--option", "resize_long=64"]  # tiny detector input: fast on CPU
BOOST = ("bench", "bus", "teddy bear", "couch", "dining table", "dog", "suitcase", "skis")


def _cli(*args: str):
    res = runner.invoke(app, ["eval", "geneval", "-q", *args])
    return res


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "clip": build_tiny_clip(root / "clip"),
        "detector": build_tiny_mask2former(root / "m2f", boost=BOOST),
    }


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """4 prompts × 2 images from tiny:test at 32², generation only."""
    images = tmp_path_factory.mktemp("gen") / "images"
    res = _cli(
        "--model", "tiny:test", "--size", "32", "--per-prompt", "2", "--prompts", PICK, "--images", str(images),
        "--no-score", "--batch", "3",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "8 generated, 0 kept" in res.output
    return images


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_generation_writes_reference_layout(generated):
    prompts = load_prompts()
    for i in (0, 200, 400, 500):
        folder = generated / f"{i:05d}"
        # metadata.jsonl: the prompt's line exactly as the reference's json.dump writes it
        assert (folder / "metadata.jsonl").read_text() == json.dumps(prompts[i])
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["00000.png", "00001.png"]
        assert json.loads((folder / "seeds.json").read_text()) == {"00000.png": 42, "00001.png": 43}
        assert Image.open(folder / "samples" / "00000.png").size == (32, 32)
    settings = json.loads((generated / "generation.json").read_text())
    assert settings["steps"] == 1 and settings["seed"] == 42 and settings["source"]["model"] == "tiny:test"
    assert not (generated / "00001").exists()  # only the selected prompts


def test_generation_resumes_and_keeps_existing_images(generated, tmp_path):
    images = _copy(generated, tmp_path / "images")
    keep = images / "00200" / "samples" / "00000.png"
    gone = images / "00400" / "samples" / "00001.png"
    before = {p: p.read_bytes() for p in images.rglob("*.png")}
    mtime = keep.stat().st_mtime_ns
    gone.unlink()
    args = ["--model", "tiny:test", "--size", "32", "--per-prompt", "2", "--prompts", PICK, "--images", str(images)]
    res = _cli(*args, "--no-score")
    assert res.exit_code == 0, res.output
    assert "1 generated, 7 kept" in res.output
    assert keep.stat().st_mtime_ns == mtime  # untouched
    # the regenerated image is the same image: its seed (43) alone fixes its noise, whatever the batch
    assert gone.read_bytes() == before[gone]
    # other settings on the same folder are refused instead of mixing two models' images
    res = _cli(*args, "--no-score", "--steps", "4")
    assert res.exit_code == 2 and "steps=1" in res.output


def test_hf_mask2former_and_clip_end_to_end(generated, models, tmp_path, monkeypatch):
    from apexctl.eval.geneval.color import ClipColors

    calls = []
    original = ClipColors.classify

    def spy(self, image, objects, classname):
        out = original(self, image, objects, classname)
        calls.append((classname, out))
        return out

    monkeypatch.setattr(ClipColors, "classify", spy)
    out = tmp_path / "scores"
    res = _cli(
        "--images", str(generated), "--no-generate", "--per-prompt", "2", "--prompts", PICK,
        "--detector", str(models["detector"]), "--clip", str(models["clip"]), "--out", str(out),
        "--option", "threshold=0", "--option", "counting_threshold=0", *FAST, "--device", "cpu",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["label"] == "GenEval (HF-Mask2Former backend)" and summary["backend"] == "hf-mask2former"
    assert summary["images"] == 8 and summary["prompts"] == 4 and summary["selected_prompts"] == 4
    assert set(summary["tasks"]) == {"single_object", "counting", "position", "color_attr"}
    assert all(t["total"] == 2 for t in summary["tasks"].values())
    accs = [t["accuracy"] for t in summary["tasks"].values()]
    assert summary["overall"] == pytest.approx(sum(accs) / 4)
    assert summary["complete"] is False and summary["missing"]["prompt_indices"] == []
    assert summary["clip"] == str(models["clip"]) and summary["detector"] == str(models["detector"])
    assert summary["options"]["threshold"] == 0.0 and summary["generation"]["seed"] == 42
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    assert {r["filename"] for r in rows} == {f"{i:05d}/samples/0000{k}.png" for i in (0, 200, 400, 500) for k in (0, 1)}
    for r in rows:
        assert isinstance(r["correct"], bool) and isinstance(r["reason"], str) and r["seed"] in (42, 43)
        details = json.loads(r["details"])
        assert details, "the detector produced no detections"
        assert set(details) <= set(class_names())
        for boxes in details.values():
            assert all(len(b) == 5 and 0 <= b[0] <= b[2] <= 32 and 0 <= b[1] <= b[3] <= 32 for b in boxes)
    # the colour prompt (a yellow dining table and a pink dog, both boosted classes) went through CLIP
    assert calls and {c for c, _ in calls} <= {"dining table", "dog"}
    assert all(col in ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
               for _, cols in calls for col in cols)  # fmt: skip
    for tag in ("single_object", "counting", "position", "color_attr"):
        assert Image.open(out / f"grid_{tag}.png").size[0] > 2 * 128
    assert "Single" in res.output and "Overall" in res.output and "Attr." in res.output
    assert "PARTIAL" in res.output


def _write_detections(path: Path, images: Path) -> dict[str, bool]:
    """Synthetic detections for the PICK folder, with the correctness the reference rules give each image."""
    rows, expected = [], {}
    mask = np.zeros((32, 32), dtype=bool)
    mask[4:20, 2:12] = True
    Image.fromarray(mask.astype(np.uint8) * 255).save(path.parent / "mask.png")

    def add(rel, dets, ok):
        rows.append({"image": rel, "detections": dets})
        expected[rel] = ok

    box = [2, 4, 12, 20]
    add("00000/samples/00000.png", {"bench": [{"box": box, "score": 0.9}]}, True)
    add("00000/samples/00001.png", {"bench": [{"box": box, "score": 0.2}]}, False)  # below 0.3
    # counting (200: three buses, exclude 4): 3 found at > 0.9 → right; a fourth at 0.95 → wrong
    three = [{"box": box, "score": 0.95}] * 3
    add("00200/samples/00000.png", {"bus": three}, True)
    add("00200/samples/00001.png", {"bus": [*three, {"box": box, "score": 0.95}]}, False)
    # position (400): check which relation it asks for and place the objects accordingly
    meta = load_prompts()[400]
    ref, obj = meta["include"][0]["class"], meta["include"][1]["class"]
    rel = meta["include"][1]["position"][0]
    far = {"left of": [-40, 4, -30, 20], "right of": [40, 4, 50, 20], "above": [2, -40, 12, -30]}
    far["below"] = [2, 40, 12, 56]
    add("00400/samples/00000.png", {ref: [{"box": box, "score": 0.9}], obj: [{"box": far[rel], "score": 0.9}]}, True)
    add("00400/samples/00001.png", {ref: [{"box": box, "score": 0.9}], obj: [{"box": box, "score": 0.9}]}, False)
    # colour attribute (500): colours given in the file, masks as RLE and as a PNG path
    meta = load_prompts()[500]
    (a, ca), (b, cb) = [(r["class"], r["color"]) for r in meta["include"]]
    rle = rle_encode(mask)
    good = {a: [{"box": box, "score": 0.9, "color": ca, "mask": rle}], b: [{"box": box, "score": 0.8, "color": cb}]}
    add("00500/samples/00000.png", good, True)
    wrong = "red" if cb != "red" else "blue"
    bad = {
        a: [{"box": box, "score": 0.9, "color": ca, "mask": "mask.png"}],
        b: [{"box": box, "score": 0.8, "color": wrong}],
    }
    add("00500/samples/00001.png", bad, False)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return expected


def test_detections_file_backend(generated, tmp_path):
    dets = tmp_path / "dets.jsonl"
    expected = _write_detections(dets, generated)
    out = tmp_path / "scores"
    args = ["--images", str(generated), "--no-generate", "--per-prompt", "2", "--prompts", PICK]
    res = _cli(*args, "--detections", str(dets), "--out", str(out))  # no --clip: every colour is in the file
    assert res.exit_code == 0, res.output
    rows = {r["filename"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert {k: r["correct"] for k, r in rows.items()} == expected
    assert rows["00200/samples/00001.png"]["reason"] == "expected bus<4, found 4"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["label"] == "GenEval (detections file)" and summary["clip"] is None
    assert {t: s["accuracy"] for t, s in summary["tasks"].items()} == {
        "single_object": 0.5,
        "counting": 0.5,
        "position": 0.5,
        "color_attr": 0.5,
    }
    assert summary["overall"] == 0.5
    # a colour the file does not give needs CLIP: one line naming --clip and what to download
    lines = dets.read_text().splitlines()
    row = json.loads(lines[-2])
    for objs in row["detections"].values():
        for o in objs:
            o.pop("color")
    lines[-2] = json.dumps(row)
    dets.write_text("\n".join(lines) + "\n")
    res = _cli(*args, "--detections", str(dets), "--out", str(out))
    assert res.exit_code == 2 and "--clip" in res.output and "openai/clip-vit-large-patch14" in res.output
    # an image without a line is an error naming its prompt
    dets.write_text("\n".join(lines[1:]) + "\n")
    res = _cli(*args, "--detections", str(dets), "--out", str(out))
    assert res.exit_code == 2 and "no line for the images of prompt(s) 0" in res.output


def test_partial_folder_is_refused_naming_missing_prompts(generated, tmp_path):
    images = _copy(generated, tmp_path / "images")
    (images / "00400" / "samples" / "00001.png").unlink()
    shutil.rmtree(images / "00500")
    dets = tmp_path / "dets.jsonl"
    _write_detections(dets, images)
    args = ["--images", str(images), "--no-generate", "--per-prompt", "2", "--detections", str(dets)]
    res = _cli(*args, "--prompts", PICK)
    assert res.exit_code == 2
    assert "prompt indices 400, 500" in res.output and "--allow-partial" in res.output
    assert "3 image(s) missing" in res.output
    # the full benchmark (no --prompts): every absent prompt is named, as ranges
    res = _cli(*args)
    assert res.exit_code == 2 and "prompt indices 1-199, 201-552" in res.output
    # --allow-partial scores what is there and says what was missing
    out = tmp_path / "scores"
    res = _cli(*args, "--prompts", PICK, "--allow-partial", "--out", str(out))
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["missing"] == {"prompt_indices": [400, 500], "prompt_indices_text": "400, 500", "images": 3}
    assert summary["images"] == 5 and "color_attr" not in summary["tasks"]
    assert summary["task_images"]["position"] == {"found": 1, "expected": 2}
    assert "PARTIAL: 3 images missing, prompt indices 400, 500" in res.output


def test_missing_weights_and_bad_usage_are_one_line_errors(generated, tmp_path):
    base = ["--images", str(generated), "--no-generate", "--per-prompt", "2", "--prompts", PICK]
    cases = [
        (base, ["facebook/mask2former-swin-small-coco-instance"]),
        (
            [*base, "--detector", str(tmp_path / "nope"), "--clip", str(tmp_path)],
            ["--detector", "facebook/mask2former"],
        ),
        ([*base, "--detector", str(tmp_path)], ["openai/clip-vit-large-patch14"]),  # colour prompts, no --clip
        # checked before any generation: nothing is written
        (
            ["--model", "tiny:test", "--size", "32", "--images", str(tmp_path / "new"), "--prompts", "0:2"],
            ["mask2former"],
        ),
        (["--no-generate", "--no-score"], ["nothing to do"]),
        ([*base, "--detections", str(tmp_path / "d.jsonl")], ["no such file"]),
    ]
    for args, needles in cases:
        res = _cli(*args)
        lines = res.output.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1, (args, res.output)
        assert all(n in lines[0] for n in needles), (args, res.output)
        assert "Traceback" not in res.output
    assert not (tmp_path / "new").exists()


def test_rle_matches_pycocotools_fixtures():
    # strings produced by pycocotools 2.0.11 mask.encode for these masks (recorded once; not a dependency)
    m = np.zeros((12, 10), dtype=bool)
    m[2:9, 3:7] = True
    m[0, :] = True
    m[10:, 8] = True
    m[5, 0] = True
    assert rle_encode(m) == {"size": [12, 10], "counts": "0140205000F62JN62JN62JN62J80N22"}
    assert (rle_decode({"size": [12, 10], "counts": "0140205000F62JN62JN62JN62J80N22"}) == m).all()
    m2 = np.zeros((40, 50), dtype=bool)
    m2[3:35, 10:45] = True
    enc = rle_encode(m2)
    assert enc["counts"] == "c<P18" + "0" * 67 + "U6"
    assert (rle_decode(enc) == m2).all()
    # uncompressed counts (a list) too
    assert (rle_decode({"size": [2, 2], "counts": [1, 3]}) == np.array([[False, True], [True, True]])).all()


def test_detector_label_mapping():
    hf = [n for n in class_names()]
    hf[hf.index("computer mouse")], hf[hf.index("tv remote")], hf[hf.index("computer keyboard")] = (
        "mouse",
        "remote",
        "keyboard",
    )
    assert _label_map(dict(enumerate(hf))) == list(class_names())
    assert _label_map({i: f"LABEL_{i}" for i in range(80)}) == list(class_names())
    with pytest.raises(BadInput, match="do not cover"):
        _label_map({0: "cat", 1: "dog"})


def test_detector_postprocessing_boxes_from_masks(models, monkeypatch):
    """mmdet semantics: score = class prob × mean sigmoid inside the mask; box = the mask's extent (+1)."""
    import torch

    det = Mask2FormerDetector(models["detector"], device="cpu", resize_long=64, resize_short=64)
    dog = list(class_names()).index("dog")

    class Out:
        class_queries_logits = torch.full((1, 10, 81), -20.0)
        masks_queries_logits = torch.full((1, 10, 16, 16), -20.0)

    Out.class_queries_logits[0, 0, dog] = 20.0  # query 0: surely a dog
    Out.masks_queries_logits[0, 0, 4:8, 2:10] = 20.0  # 16×16 mask grid of a 64×64 input (stride 4)
    monkeypatch.setattr(det, "model", lambda pixel_values: Out)
    det.model.parameters = lambda: iter([torch.zeros(1)])  # type: ignore[attr-defined]
    raw = det(Image.new("RGB", (32, 32)), min_score=0.3)
    assert list(raw) == ["dog"] and len(raw["dog"]) == 1
    d = raw["dog"][0]
    # mask grid rows 4..7, cols 2..9 at stride 4 on 64² → 16..31 × 8..39 → halved for the 32² image: ≈ 8..15 × 4..19
    assert np.allclose(d.box, [4, 8, 20, 16], atol=1)
    assert d.mask.shape == (32, 32) and d.mask[12, 10] and not d.mask[0, 0]
    # class prob ≈ 1 × mean sigmoid inside the mask (< 1: the upsampled edge logits are small)
    assert 0.99 < d.score < 1.0


def test_grid_glyph_marks():
    from apexctl.images import make_grid

    grid = np.asarray(make_grid(np.zeros((2, 3, 60, 60)), nrow=2, marks=[True, False], mark_style="glyph"))
    left, right = grid[:, :62], grid[:, 62:]
    green, red = np.array([0, 200, 0]), np.array([220, 0, 0])
    assert (left == green).all(-1).any() and not (left == red).all(-1).any()  # ✓ on the correct image
    assert (right == red).all(-1).any() and not (right == green).all(-1).any()  # ✗ on the wrong one


def test_generation_with_a_lora_folder(generated, tmp_path):
    """--lora FOLDER --model BASE: the adapter is applied (images differ from the base model's, same seeds)."""
    from data_util import save_random_lora

    save_random_lora("tiny:test", tmp_path / "lora", seed=1)
    args = ["--size", "32", "--per-prompt", "1", "--prompts", "0", "--no-score", "--images", str(tmp_path / "img")]
    res = _cli("--lora", str(tmp_path / "lora"), *args)
    assert res.exit_code == 2 and "needs --model BASE" in res.output
    res = _cli("--lora", str(tmp_path / "lora"), "--model", "tiny:test", *args)
    assert res.exit_code == 0, res.output
    settings = json.loads((tmp_path / "img" / "generation.json").read_text())
    assert settings["source"] == {"recipe": None, "model": "tiny:test", "lora": str(tmp_path / "lora")}
    with_lora = np.asarray(Image.open(tmp_path / "img" / "00000" / "samples" / "00000.png"), dtype=int)
    base = np.asarray(Image.open(generated / "00000" / "samples" / "00000.png"), dtype=int)  # same seed 42
    assert np.abs(with_lora - base).max() > 0
