"""Bad input gets one line and exit code 2, never a traceback (issue 12, defects 5, 6 and 10), through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from data_util import TINY_DIGITS, write_folder
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from apexctl.cli import app
from apexctl.eval.geneval.prompts import load_prompts
from apexctl.lora import WEIGHT_NAME

runner = CliRunner()
NOT_UTF8 = "a red fox\ncafé\n".encode("latin-1")  # é as one byte 0xe9: valid Latin-1, not UTF-8


def _error(args: list, *needles: str) -> str:
    """Run the CLI; assert exit 2 with exactly one line, ``error: …`` containing every needle, and no traceback."""
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and not isinstance(res.exception, (IndexError, UnicodeDecodeError))
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _recipe(tmp_path: Path, tree: dict | None = None, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(tree or {"model": {"path": "tiny:test"}}))
    return p


# ---- defect 5 -------------------------------------------------------------------------------------------------------


def test_recipe_that_is_not_utf8(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"model: {path: tiny:test}\n# " + NOT_UTF8)
    _error(["distill", p, "--dry-run"], str(p), "not UTF-8", "line 3")


def test_prompts_files_that_are_not_utf8(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_bytes(NOT_UTF8)
    _error(["sample", "--prompts-file", p, "--model", "tiny:test", "--size", "32"], "--prompts-file", str(p), "UTF-8")
    _error(["eval", "report", tmp_path, "--prompts", p], "--prompts", str(p), "UTF-8")
    # data.source: prompts read the file too (it used to replace the bad bytes and synthesise garbled prompts)
    tree = {
        "model": {"path": "tiny:test"},
        "data": {"source": "prompts", "path": str(p), "cache_dir": str(tmp_path / "c"), "synthesize": {"steps": 2}},
    }
    _error(["prepare", _recipe(tmp_path, tree)], "data.path", str(p), "UTF-8")


def test_a_directory_as_the_recipe(tmp_path):
    line = _error(["distill", tmp_path, "--dry-run"], str(tmp_path), "is a directory")
    assert "not found" not in line


def test_a_bad_set_key_is_blamed_on_set(tmp_path):
    p = _recipe(tmp_path)
    line = _error(["distill", p, "--dry-run", "--set", "train.stepz=3"], "--set train.stepz=3", "unknown key")
    assert str(p) not in line
    line = _error(["distill", p, "--dry-run", "--set", "train.steps=many"], "--set train.steps=many")
    assert str(p) not in line
    # a key the file got wrong is still the file's
    bad = _recipe(tmp_path, {"model": {"path": "tiny:test"}, "train": {"stepz": 3}}, "bad.yaml")
    _error(["distill", bad, "--dry-run", "--set", "train.steps=3"], str(bad), "train.stepz")


def test_bad_lora_targets_exit_2_naming_the_modules_that_exist(tmp_path):
    lora = {"rank": 2, "targets": ["to_qq"]}
    tree = {
        "model": {"path": TINY_DIGITS, "lora": lora},
        "data": {"cache_dir": str(tmp_path / "cache"), "num_workers": 0, "limit": 8},
        "train": {"steps": 1, "micro_batch": 4},
        "hardware": {"device": "cpu"},
        "output": {"dir": str(tmp_path / "run")},
    }
    p = _recipe(tmp_path, tree)
    _error(["distill", p, "--dry-run"], "model.lora.targets ['to_qq']", "to_q", "to_k")
    assert runner.invoke(app, ["prepare", str(p), "--quiet"]).exit_code == 0
    res = runner.invoke(app, ["distill", str(p), "--quiet"])
    assert res.exit_code == 2, res.output
    assert "model.lora.targets ['to_qq']" in res.output and "to_q" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"not a safetensors file at all", "not a safetensors file"),
        ({"transformer.foo.weight": torch.zeros(2, 2)}, "'transformer.foo.weight'"),  # diffusers: IndexError
        # keys of another format: diffusers loaded nothing and merge-lora wrote the base model unchanged
        ({"lora_unet_foo.lora_down.weight": torch.zeros(2, 2)}, "'lora_unet_foo.lora_down.weight'"),
        ({}, "no tensors"),
    ],
    ids=["not-safetensors", "non-lora-key", "foreign-format", "empty"],
)
def test_merge_lora_refuses_files_that_are_not_a_denoiser_lora(tmp_path, content, needle):
    folder = tmp_path / "lora"
    folder.mkdir()
    if isinstance(content, bytes):
        (folder / WEIGHT_NAME).write_bytes(content)
    else:
        save_file(content, str(folder / WEIGHT_NAME))
    out = tmp_path / "merged"
    _error(["merge-lora", "--lora", folder, "--base", "tiny:test", "--out", out], WEIGHT_NAME, needle)
    assert not out.exists()


def test_null_file_name_is_reported_by_line_and_key(tmp_path):
    root = write_folder(tmp_path / "imgs", [("a.png", 16, 16, "a red fox"), ("b.png", 16, 16, "a cat")])
    with (root / "metadata.jsonl").open("a") as f:
        f.write(json.dumps({"file_name": None, "text": "a dog"}) + "\n")
    tree = {
        "model": {"path": TINY_DIGITS},
        "data": {"source": "folder", "path": str(root), "cache_dir": str(tmp_path / "cache"), "num_workers": 0},
    }
    res = runner.invoke(app, ["prepare", str(_recipe(tmp_path, tree)), "--quiet"])
    assert res.exit_code == 0, res.output  # bad items are skipped and listed, the good ones kept (docs/data.md)
    assert "2 images" in res.output and "1 skipped" in res.output
    skipped = json.loads((tmp_path / "cache" / "prepare_report.json").read_text())["skipped"]
    assert [(s["item"], s["reason"]) for s in skipped] == [
        ("metadata.jsonl line 3", "bad metadata line: file_name = null (needs the image's file name)")
    ]


# ---- defect 6: every count option -----------------------------------------------------------------------------------

COUNT_OPTIONS = [
    (["prepare", "R"], "--limit", "0"),
    (["distill", "R"], "--until", "0"),
    (["distill", "R"], "--launch", "0"),
    (["sample", "a fox", "--model", "tiny:test"], "--steps", "0"),
    (["sample", "a fox", "--model", "tiny:test"], "--num-images", "0"),
    (["sample", "a fox", "--model", "tiny:test"], "--size", "0"),
    (["eval", "digits", "--recipe", "R"], "--student-steps", "0"),
    (["eval", "digits", "--recipe", "R"], "--student-steps", "-1"),
    (["eval", "digits", "--recipe", "R"], "--teacher-steps", "0"),
    (["eval", "digits", "--recipe", "R"], "--per-prompt", "1"),
    (["eval", "scenes", "--recipe", "R"], "--student-steps", "0"),
    (["eval", "geneval", "--model", "tiny:test"], "--steps", "0"),
    (["eval", "geneval", "--model", "tiny:test"], "--per-prompt", "0"),
    (["eval", "geneval", "--model", "tiny:test"], "--batch", "0"),
    (["eval", "geneval", "--model", "tiny:test"], "--size", "4"),
    (["eval", "fid", "RUN"], "--num", "0"),
    (["eval", "fid", "RUN"], "--per-prompt", "0"),
    (["eval", "fid", "RUN"], "--steps", "-1"),
    (["eval", "fid", "RUN"], "--teacher-steps", "0"),
    (["eval", "fid", "RUN"], "--batch", "0"),
    (["eval", "clip-score", "RUN"], "--num", "0"),
    (["eval", "clip-score", "RUN"], "--per-prompt", "0"),
    (["eval", "clip-score", "RUN"], "--steps", "0"),
    (["eval", "clip-score", "RUN"], "--batch", "0"),
    (["eval", "report", "RUN"], "--steps", "0"),
    (["eval", "report", "RUN"], "--per-prompt", "0"),
]


@pytest.mark.parametrize(("command", "option", "value"), COUNT_OPTIONS, ids=lambda v: str(v))
def test_count_options_refuse_values_below_their_minimum(tmp_path, command, option, value):
    recipe = _recipe(tmp_path)
    args = [str(recipe) if a == "R" else str(tmp_path) if a == "RUN" else a for a in command] + [option, value]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert option in res.output and "Traceback" not in res.output
    assert not (tmp_path / "eval").exists()


# ---- defect 10: GenEval detections match by (prompt, image) ---------------------------------------------------------


def test_geneval_detections_match_any_zero_padding(tmp_path):
    images = tmp_path / "geneval"
    folder = images / "00000" / "samples"
    folder.mkdir(parents=True)
    (images / "00000" / "metadata.jsonl").write_text(json.dumps(load_prompts()[0]))
    for k in range(2):
        Image.fromarray(np.full((32, 32, 3), 40 * k, dtype=np.uint8)).save(folder / f"{k:05d}.png")
    assert load_prompts()[0]["include"] == [{"class": "bench", "count": 1}]
    box = [2, 4, 12, 20]
    rows = [  # other padding, and the full path the reference evaluator writes
        {"image": "0/samples/0000.png", "detections": {"bench": [{"box": box, "score": 0.9}]}},
        {"image": "/data/run/geneval/000/samples/1.png", "detections": {"bench": [{"box": box, "score": 0.1}]}},
    ]
    dets = tmp_path / "dets.jsonl"
    dets.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["eval", "geneval", "-q", "--images", images, "--no-generate", "--per-prompt", "2", "--prompts", "0"]
    res = runner.invoke(app, [str(a) for a in [*args, "--detections", dets, "--out", tmp_path / "scores"]])
    assert res.exit_code == 0, res.output
    scored = [json.loads(x) for x in (tmp_path / "scores" / "results.jsonl").read_text().splitlines()]
    assert {r["filename"]: r["correct"] for r in scored} == {
        "00000/samples/00000.png": True,
        "00000/samples/00001.png": False,  # score 0.1 < 0.3: its own line was used, not the other image's
    }
    # two spellings of one image are one image
    rows.append({"image": "00000/samples/00000.png", "detections": {}})
    dets.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _error([*args, "--detections", dets], "line 3", "appears twice")


# ---- found in review ------------------------------------------------------------------------------------------------


def test_cross_key_errors_and_odd_objectives_from_set_are_blamed_on_set(tmp_path):
    scenes = _recipe(tmp_path, {"model": {"path": "tiny:test"}, "data": {"source": "scenes", "resolution": 16}})
    line = _error(["distill", scenes, "--dry-run", "--set", "data.resolution=8"], "--set data.resolution=8", "16")
    assert str(scenes) not in line
    p = _recipe(tmp_path)
    for value in ("[apex]", "{a: 1}"):  # not a name: one line, not a TypeError
        _error(["distill", p, "--dry-run", "--set", f"method.objective={value}"], "method.objective", "expected")


def test_guidance_with_a_sampler_that_takes_none_is_refused(tmp_path):
    for method in ("one", "few"):
        _error(["sample", "x", "--model", "tiny:test", "--method", method, "--guidance", "4"], method, "euler")
    _error(["eval", "geneval", "--model", "tiny:test", "--method", "one", "--guidance", "4"], "one", "euler")


def test_a_detections_file_that_is_not_utf8(tmp_path):
    p = tmp_path / "det.jsonl"
    p.write_bytes(NOT_UTF8)
    from apexctl.errors import BadInput
    from apexctl.eval.geneval.detect import DetectionsFile

    with pytest.raises(BadInput, match=r"^--detections .*det\.jsonl: not UTF-8 text"):
        DetectionsFile(p)


def test_a_metadata_line_that_is_not_utf8_is_skipped_and_reported(tmp_path):
    root = write_folder(tmp_path / "imgs", [("a.png", 16, 16, "a red fox"), ("b.png", 16, 16, "a cat")])
    with (root / "metadata.jsonl").open("ab") as f:
        f.write(b'{"file_name": "a.png", "text": "caf\xe9"}\n')  # Latin-1: read as "caf\ufffd" before
    tree = {
        "model": {"path": TINY_DIGITS},
        "data": {"source": "folder", "path": str(root), "cache_dir": str(tmp_path / "cache"), "num_workers": 0},
    }
    res = runner.invoke(app, ["prepare", str(_recipe(tmp_path, tree)), "--quiet"])
    assert res.exit_code == 0 and "2 images" in res.output and "1 skipped" in res.output, res.output
    skipped = json.loads((tmp_path / "cache" / "prepare_report.json").read_text())["skipped"]
    assert [s["item"] for s in skipped] == ["metadata.jsonl line 3"] and "UTF-8" in skipped[0]["reason"]
