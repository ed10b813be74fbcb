"""``eval fid`` and ``eval clip-score`` on image folders, through the real weight loaders (random weights from temp files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fid_util import build_fid_weights, small_inception_input
from PIL import Image
from tiny_eval_models import build_tiny_clip
from typer.testing import CliRunner

from apexctl.cli import app
from apexctl.eval.fid import inception

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def _small_input():
    yield from small_inception_input()


def _random_images(n: int, seed: int, lo: int = 0, hi: int = 256, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(lo, hi, size=(n, size, size, 3), dtype=np.uint8)


def _write_folder(folder: Path, images: np.ndarray, prompts: list[str] | None = None) -> Path:
    folder.mkdir(parents=True)
    rows = []
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
        if prompts is not None:
            rows.append(json.dumps({"file": f"{i:03d}.png", "prompt": prompts[i]}))
    if prompts is not None:
        (folder / "samples.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return build_fid_weights(tmp_path_factory.mktemp("inception"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("fid")
    base = _random_images(12, seed=1)
    return {
        "a": _write_folder(tmp / "a", base),
        "a_copy": _write_folder(tmp / "a_copy", base.copy()),
        # the same images, darker and lower in contrast: a shifted distribution
        "shifted": _write_folder(tmp / "shifted", (base * 0.5).astype(np.uint8)),
    }


def _fid(args: list[str], out: Path) -> float:
    res = runner.invoke(app, ["eval", "fid", *args, "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    summary = json.loads(out.read_text())
    return summary["fid"]


def test_fid_identical_is_zero_shifted_is_larger(weights, folders, tmp_path):
    same = _fid(
        ["--generated", str(folders["a"]), "--reference", str(folders["a_copy"]), "--inception", str(weights)],
        tmp_path / "same.json",
    )
    shifted = _fid(
        ["--generated", str(folders["shifted"]), "--reference", str(folders["a"]), "--inception", str(weights)],
        tmp_path / "shifted.json",
    )
    assert shifted > 1.0
    assert same == pytest.approx(0.0, abs=1e-4 * shifted)
    s = json.loads((tmp_path / "shifted.json").read_text())
    assert s["generated"]["n"] == 12 and s["reference"]["n"] == 12
    assert s["inception"]["sha256"] == inception.sha256_file(weights)


def test_fid_missing_or_wrong_weights_is_one_line_exit_2(folders, tmp_path):
    pair = ["--generated", str(folders["a"]), "--reference", str(folders["a_copy"])]
    for extra in ([], ["--inception", str(tmp_path / "nope.pth")]):
        res = runner.invoke(app, ["eval", "fid", *pair, *extra])
        assert res.exit_code == 2, res.output
        assert len(res.output.strip().splitlines()) == 1
        assert inception.WEIGHTS_NAME in res.output and "download" in res.output
    wrong = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, wrong)
    res = runner.invoke(app, ["eval", "fid", *pair, "--inception", str(wrong)])
    assert res.exit_code == 2 and "not the FID Inception-v3 state dict" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_fid_needs_two_sides(weights, folders):
    res = runner.invoke(app, ["eval", "fid", "--generated", str(folders["a"]), "--inception", str(weights)])
    assert res.exit_code == 2 and "--reference" in res.output


def test_clip_score_matches_torchmetrics_formula(tmp_path):
    from apexctl.eval.clip.model import embed_images, embed_texts, load_clip

    clip_dir = build_tiny_clip(tmp_path / "clip", seed=0)
    prompts = ["a red fox", "a photo of a cat", "a blue bird on a branch", "a green tree by the river"]
    folder = _write_folder(tmp_path / "imgs", _random_images(4, seed=5, size=32), prompts)
    out = tmp_path / "clip.json"
    res = runner.invoke(
        app, ["eval", "clip-score", "--images", str(folder), "--clip", str(clip_dir), "--out", str(out), "-q"]
    )
    assert res.exit_code == 0, res.output
    row = json.loads(out.read_text())["rows"][str(folder)]
    # the same embeddings by our own loader: torchmetrics' score is max(100 · mean cos, 0)
    clip = load_clip(clip_dir, device="cpu")
    img = embed_images(clip, [Image.open(folder / f"{i:03d}.png") for i in range(4)])
    txt = embed_texts(clip, prompts)
    cos = (img * txt).sum(-1)
    expected = max(100.0 * float(cos.mean()), 0.0)
    assert expected > 0  # a positive mean, so the floor at 0 does not make the comparison vacuous
    assert row["n"] == 4 and row["clip_score"] == pytest.approx(expected, rel=1e-4, abs=1e-4)

    res = runner.invoke(app, ["eval", "clip-score", "--images", str(folder), "--clip", str(tmp_path / "none")])
    assert res.exit_code == 2 and "download" in res.output and len(res.output.strip().splitlines()) == 1
