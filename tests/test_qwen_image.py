"""What only the Qwen-Image adapter does, on hub-free tiny builds (docs/design.md §3-§4): its tokenizer template, the pixel
codec of the embedded default, ``tiny:`` specs, the single-step schedule. tests/test_family_conformance.py holds what
every family satisfies against its stock pipeline (prompt encoding, Euler, codec, condition site, save, LoRA)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from apexctl.errors import BadInput
from apexctl.models import QwenImageBackbone, load_backbone, resolve_model_path
from apexctl.models.tokenizers import QWEN_IMAGE_DROP_IDX, QWEN_IMAGE_TEMPLATE, qwen2_tokenizer, template_prefix_len


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A private APEXCTL_HOME, so ``tiny:`` specs build into the test's temp folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APEXCTL_HOME", str(tmp_path_factory.mktemp("apexctl_home")))
        yield os.environ["APEXCTL_HOME"]


@pytest.fixture(scope="module")
def qwen(home) -> QwenImageBackbone:
    return load_backbone(resolve_model_path("tiny:test"))


@pytest.fixture(scope="module")
def digits(home) -> QwenImageBackbone:
    return load_backbone("tiny:digits")


def test_tokenizer_template_prefix_is_34_tokens_and_deterministic():
    a, b = qwen2_tokenizer(), qwen2_tokenizer()
    assert template_prefix_len(a) == QWEN_IMAGE_DROP_IDX == 34
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    # what the pipeline keeps after dropping 34 tokens is exactly the prompt and the template's tail
    ids = a(QWEN_IMAGE_TEMPLATE.format("an even digit")).input_ids[QWEN_IMAGE_DROP_IDX:]
    assert a.decode(ids) == "an even digit<|im_end|>\n<|im_start|>assistant\n"
    # corpus words are single tokens
    assert len(a(" seven").input_ids) == 1 and len(a("a digit greater than five").input_ids) == 5


def test_a_prompt_without_padding_still_gets_a_mask(qwen):
    """The pipeline returns no mask when nothing is padded; ours is then all ones."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(resolve_model_path("tiny:test"))
    one = qwen.encode_prompts(["a red fox"])
    embeds, mask = pipe.encode_prompt("a red fox", device="cpu")
    assert mask is None and torch.equal(one.mask, torch.ones(1, embeds.shape[1], dtype=torch.long))
    assert torch.equal(one.embeds, embeds)


def test_pixel_codec_digits(digits):
    assert digits.latent_shape(8, 8) == (1, 8, 8)
    gray = torch.rand(3, 1, 8, 8) * 2 - 1
    lat = digits.encode_images(gray.repeat(1, 3, 1, 1))
    assert torch.equal(lat, gray)
    rgb = torch.rand(3, 3, 8, 8)
    torch.testing.assert_close(digits.encode_images(rgb), rgb.mean(1, keepdim=True))
    assert torch.equal(digits.decode_latents(lat), gray.repeat(1, 3, 1, 1))
    cond = digits.encode_prompts(["a handwritten digit seven", "an odd digit"])
    assert digits.embed_dim == cond.embeds.shape[-1] == 32
    v = digits.velocity(torch.randn(2, 1, 8, 8), torch.tensor([1.0, 0.3]), cond)
    assert v.shape == (2, 1, 8, 8) and torch.isfinite(v).all()


def test_tiny_spec_cache_and_bad_inputs(home, tmp_path):
    a = resolve_model_path("tiny:digits")
    assert resolve_model_path("tiny:digits") == a and a.startswith(home)
    assert resolve_model_path("tiny:digits?num_layers=1") != a
    assert resolve_model_path("some/hub-id") == "some/hub-id"
    with pytest.raises(BadInput, match="allowed: test, digits"):
        resolve_model_path("tiny:nope")
    with pytest.raises(BadInput, match="num_layerz"):
        resolve_model_path("tiny:digits?num_layerz=2")

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "apexctl_model.json").write_text('{"family": "nope"}')
    with pytest.raises(BadInput, match=r"bad.*qwen_image"):
        load_backbone(str(bad))
    with pytest.raises(BadInput, match=r"missing.*qwen_image"):
        load_backbone(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match=r"empty.*qwen_image"):
        load_backbone(str(tmp_path / "empty"))


def test_one_step_euler_schedule_is_finite_despite_shift_terminal(qwen):
    """Qwen-Image's scheduler config (shift_terminal 0.02) makes diffusers' 1-step schedule NaN; ours is [1, 0]."""
    bb = qwen
    assert bb.scheduler.config.get("shift_terminal")
    torch.testing.assert_close(bb.teacher_sigmas(1, (4, 8, 8)), torch.tensor([1.0, 0.0]))
    assert torch.isfinite(bb.teacher_sigmas(4, (4, 8, 8))).all()
