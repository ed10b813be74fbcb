"""What only the SD3 / SD3.5 adapter does, on a hub-free tiny build (docs/design.md §3-§4): deterministic CLIP / T5 tokenizers
and running without T5. tests/test_family_conformance.py holds what every family satisfies against its stock pipeline."""

from __future__ import annotations

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from apexctl.models.sd3 import SD3Backbone
from apexctl.models.tiny_sd3 import build_tiny_sd3
from apexctl.models.tokenizers import clip_tokenizer_det, t5_tokenizer_det


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "tiny")


def test_tokenizers_are_deterministic():
    assert clip_tokenizer_det().backend_tokenizer.to_str() == clip_tokenizer_det().backend_tokenizer.to_str()
    assert t5_tokenizer_det().backend_tokenizer.to_str() == t5_tokenizer_det().backend_tokenizer.to_str()
    clip, t5 = clip_tokenizer_det(), t5_tokenizer_det()
    assert len(clip("a red fox").input_ids) == 5  # bos + 3 words + eos
    assert len(t5("a red fox").input_ids) == 4  # 3 words + </s>


def _without_t5(folder, dest):
    """A copy of ``folder`` without T5, as the stock pipeline allows (model_index.json entries null)."""
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    index = json.loads((dest / "model_index.json").read_text())
    (dest / "model_index.json").write_text(
        json.dumps({**index, "text_encoder_3": [None, None], "tokenizer_3": [None, None]})
    )
    return dest


def test_a_folder_without_t5_loads_encodes_and_saves_without_it(folder, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    no_t5 = _without_t5(folder, tmp_path / "no_t5")
    bb = SD3Backbone.from_pretrained(no_t5)
    assert bb.text_encoder_3 is None and bb.tokenizer_3 is None and bb.text_encoder_2 is not None
    pipe = StableDiffusion3Pipeline.from_pretrained(no_t5, text_encoder_3=None, tokenizer_3=None)
    prompts = ["a red fox", "two cats"]
    ours = bb.encode_prompts(prompts)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(ours.embeds, embeds) and torch.equal(ours.pooled, pooled)
    assert ours.embeds.shape[1] == 77 + 256 and not ours.embeds[:, 77:].any()  # the T5 tokens are zeros
    for source in (no_t5, None):  # linked from the folder or saved from memory: still without T5
        out = tmp_path / f"out-{source is None}"
        bb.save_pretrained(out, source=source)
        index = json.loads((out / "model_index.json").read_text())
        assert index["text_encoder_3"] == index["tokenizer_3"] == [None, None]
        assert not (out / "text_encoder_3").exists() and (out / "text_encoder_2").is_dir()
        assert SD3Backbone.from_pretrained(out).text_encoder_3 is None
    # loaded without any text encoder, the parts come from the source folder, T5 included
    bare = SD3Backbone.from_pretrained(folder, load_text_encoder=False)
    bare.save_pretrained(tmp_path / "full", source=folder)
    assert json.loads((tmp_path / "full" / "model_index.json").read_text())["text_encoder_3"] == [
        "transformers",
        "T5EncoderModel",
    ]
    assert (tmp_path / "full" / "tokenizer_3").is_dir()
    # loaded without text encoders from a folder without T5 (what `apexctl export` does): saved without T5
    SD3Backbone.from_pretrained(no_t5, load_text_encoder=False).save_pretrained(tmp_path / "bare", source=no_t5)
    assert json.loads((tmp_path / "bare" / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    assert SD3Backbone.from_pretrained(tmp_path / "bare").text_encoder_3 is None
