"""A tiny trained run → FID to teacher and CLIP score drawn on the fly → ``eval report`` (HTML with curves, grids, tables)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from fid_util import build_fid_weights, small_inception_input
from PIL import Image
from tiny_eval_models import build_tiny_clip
from typer.testing import CliRunner

from apexctl.cli import app
from apexctl.models import resolve_model_path

runner = CliRunner()
TINY = "tiny:digits?num_layers=2&num_attention_heads=2&attention_head_dim=16"
PROMPTS = ["a handwritten digit seven", "an even digit", "any digit"]


@pytest.fixture(scope="module", autouse=True)
def _small_input():
    yield from small_inception_input()


def _ok(args: list[str]) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 4-step apex run of the tiny digits model (full tuning), as tests/test_train_cli.py builds them."""
    tmp = tmp_path_factory.mktemp("report")
    mp = pytest.MonkeyPatch()
    mp.setenv("APEXCTL_HOME", str(tmp / "home"))
    recipe = {
        "model": {"path": TINY},
        "data": {"source": "digits", "cache_dir": str(tmp / "cache")},
        "method": {"objective": "apex"},
        "train": {"steps": 4, "micro_batch": 8, "lr": 1e-3, "log_every": 1, "checkpoint_every": 100, "seed": 3},
        "hardware": {"device": "cpu"},
        "output": {"dir": str(tmp / "run")},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    _ok(["prepare", str(path), "-q"])
    _ok(["distill", str(path), "-q"])
    (tmp / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "category": "x"}) + "\n" for p in PROMPTS))
    yield tmp / "run"
    mp.undo()


def _pngs(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=int) for p in sorted(folder.glob("*.png"))])


def _drawn(model: Path | str, texts: list[str], seeds: list[int], steps: int, guidance: float = 1.0) -> np.ndarray:
    """``model``'s images for ``texts`` / ``seeds`` computed directly with the engine's samplers: one step
    (x = z − F(z, 1, c)) or ``steps`` Euler steps on the teacher's schedule with CFG ``guidance``."""
    import torch

    from apexctl.engine.sampler import euler, one_step
    from apexctl.images import to_uint8
    from apexctl.inference import seeded_noise
    from apexctl.models import load_backbone

    bb = load_backbone(str(model))
    with torch.no_grad():
        z, cond = seeded_noise(bb.latent_shape(8, 8), seeds), bb.encode_prompts(texts)
        if steps == 1:
            x = one_step(bb, z, cond)
        else:
            uncond = bb.encode_prompts([""] * len(texts)) if guidance > 1.0 else None
            x = euler(bb, z, cond, steps, uncond=uncond, guidance_scale=guidance)
        return to_uint8(bb.decode_latents(x)).astype(int)


def test_fid_and_clip_score_to_teacher_then_report(run, tmp_path):
    prompts = str(run.parent / "prompts.jsonl")
    weights = build_fid_weights(tmp_path)
    common = ["--prompts", prompts, "--per-prompt", "2", "--teacher-steps", "3", "-q"]
    _ok(["eval", "fid", str(run), "--inception", str(weights), *common])
    fid = json.loads((run / "eval" / "fid.json").read_text())
    gen, ref = Path(fid["generated"]["path"]), Path(fid["reference"]["path"])
    assert fid["generated"]["n"] == fid["reference"]["n"] == 6
    assert fid["generated"]["settings"]["steps"] == 1 and fid["reference"]["settings"]["method"] == "euler"
    assert fid["reference"]["settings"]["steps"] == 3
    # same prompts and seeds on both sides: image k of a prompt uses seed k
    rows = [[json.loads(x) for x in (d / "samples.jsonl").read_text().splitlines()] for d in (gen, ref)]
    assert [(r["prompt"], r["seed"]) for r in rows[0]] == [(r["prompt"], r["seed"]) for r in rows[1]]
    assert [r["seed"] for r in rows[0]] == [0, 1] * 3

    # the two sets are the student's one-step and the teacher's 3-step Euler images, recomputed here from each
    # model's weights; the student's are not the teacher's one-step images (training moved them)
    texts, seeds = [r["prompt"] for r in rows[0]], [r["seed"] for r in rows[0]]
    teacher = resolve_model_path(TINY)
    guidance = fid["reference"]["settings"]["guidance"]
    assert np.abs(_pngs(gen) - _drawn(run / "model", texts, seeds, 1)).max() <= 1
    assert np.abs(_pngs(ref) - _drawn(teacher, texts, seeds, 3, guidance)).max() <= 1
    assert np.abs(_pngs(gen) - _drawn(teacher, texts, seeds, 1)).max() > 1

    # and the value is the FID of those two sets: the folders compared again (either way round) give it back; a
    # set against itself gives 0, so the student–teacher value is a distance, not round-off
    def fid_of(a: Path, b: Path) -> float:
        dest = tmp_path / f"fid-{a.name}-{b.name}.json"
        _ok(["eval", "fid", "--generated", str(a), "--reference", str(b), "--inception", str(weights), "--out",
             str(dest), "-q"])  # fmt: skip
        return json.loads(dest.read_text())["fid"]

    assert fid_of(gen, ref) == pytest.approx(fid["fid"], rel=1e-6)
    assert fid_of(ref, gen) == pytest.approx(fid["fid"], rel=1e-3)
    assert fid["fid"] > 0 and fid_of(ref, ref) == pytest.approx(0.0, abs=1e-4 * fid["fid"])

    clip = build_tiny_clip(tmp_path / "clip")
    before = {p: p.stat().st_mtime_ns for p in ref.glob("*.png")}
    _ok(["eval", "clip-score", str(run), "--clip", str(clip), "--teacher", *common])
    cs = json.loads((run / "eval" / "clip_score.json").read_text())
    assert set(cs["rows"]) == {"student 1 step", "teacher 3 steps"}
    assert cs["rows"]["teacher 3 steps"]["path"] == str(ref)  # the FID's teacher images, reused, not redrawn
    assert {p: p.stat().st_mtime_ns for p in ref.glob("*.png")} == before

    # a GenEval summary as `eval geneval` writes it (tasks → accuracy/correct/total, overall)
    (run / "eval" / "geneval").mkdir()
    tasks = {"single_object": {"accuracy": 0.5, "correct": 2, "total": 4}}
    (run / "eval" / "geneval" / "summary.json").write_text(json.dumps({"tasks": tasks, "overall": 0.5}))
    (run / "eval" / "geneval" / "generation.json").write_text(json.dumps({"steps": 1}))  # settings, not a summary
    (run / "eval" / "geneval" / "00000").mkdir()
    (run / "eval" / "geneval" / "00000" / "seeds.json").write_text("[0, 1, 2, 3]")

    out = _ok(["eval", "report", str(run), "--steps", "1", "--steps", "2", "-q"])
    html_path = run / "report" / "report.html"
    assert str(html_path) in out
    html = html_path.read_text()
    # loss curves: one SVG chart per logged metric, the loss one with all 4 logged steps
    loss_svg = re.search(r"<svg[^>]*>\s*<title>loss</title>.*?</svg>", html, re.S)
    assert loss_svg and len(re.search(r'points="([^"]+)"', loss_svg.group(0)).group(1).split()) == 4
    for key in ("loss/fm", "loss/fake", "grad_norm", "lr"):
        assert f"<title>{key}</title>" in html
    # sample grids at 1 and 2 steps, embedded; written beside the page
    assert html.count("data:image/png;base64,") == 2
    assert (run / "report" / "samples-1step.png").is_file() and (run / "report" / "samples-2step.png").is_file()
    # every eval summary as a table, values included
    assert "FID ↓" in html and f"{fid['fid']:.4g}" in html
    assert "CLIP score ↑" in html and "teacher 3 steps" in html
    assert "GenEval" in html and "single_object" in html
    # image-set meta.json and GenEval's settings files are not summaries
    assert "eval/samples" not in html and "generation.json" not in html and "seeds.json" not in html


def test_report_without_samples_loads_no_model(run, tmp_path, monkeypatch):
    import apexctl.inference

    def boom(*a, **k):
        raise AssertionError("--no-samples must not load a model")

    monkeypatch.setattr(apexctl.inference, "load_trained", boom)
    out = tmp_path / "r.html"
    _ok(["eval", "report", str(run), "--no-samples", "--out", str(out), "-q"])
    html = out.read_text()
    assert "<title>loss</title>" in html and "data:image/png" not in html


def test_report_of_a_folder_that_is_not_a_run(tmp_path):
    res = runner.invoke(app, ["eval", "report", str(tmp_path)])
    assert res.exit_code == 2 and "not a run folder" in res.output
