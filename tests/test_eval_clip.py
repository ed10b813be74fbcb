"""apexctl/eval/clip/model.py: the shared CLIP loader (real from_pretrained on a tiny random model) and its errors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from tiny_eval_models import build_tiny_clip

from apexctl.errors import BadInput
from apexctl.eval.clip.model import embed_images, embed_texts, load_clip


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def test_load_and_embed(tiny_clip_dir):
    clip = load_clip(tiny_clip_dir, device="cpu")
    imgs = embed_images(clip, [Image.new("RGB", (40, 30), (200, 0, 0)), Image.new("L", (8, 8), 30)])
    txts = embed_texts(clip, ["a photo of a red dog", "a photo of a blue-colored object", "x"])
    assert imgs.shape == (2, 16) and txts.shape == (3, 16)
    assert torch.allclose(imgs.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(txts.norm(dim=-1), torch.ones(3), atol=1e-5)
    # batching does not change the result
    assert torch.allclose(embed_texts(clip, ["x"]), txts[2:], atol=1e-5)


@pytest.mark.parametrize("where", ["missing", "empty", "hub"])
def test_missing_weights_is_one_line_bad_input(tmp_path, where):
    path = {"missing": tmp_path / "nope", "empty": tmp_path, "hub": "openai/clip-vit-large-patch14"}[where]
    with pytest.raises(BadInput) as err:
        load_clip(path, option="--clip")
    msg = str(err.value)
    assert "\n" not in msg and "--clip" in msg and "openai/clip-vit-large-patch14" in msg
