"""Qwen-Image adapter against the stock diffusers pipeline, on hub-free tiny builds (DESIGN §3-§4)."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from apexctl.errors import BadInput
from apexctl.models import QwenImageBackbone, load_backbone, resolve_model_path
from apexctl.models.qwen_image import pack_latents
from apexctl.models.tokenizers import QWEN_IMAGE_DROP_IDX, QWEN_IMAGE_TEMPLATE, qwen2_tokenizer, template_prefix_len

PROMPTS = ["a red fox", "a handwritten digit seven in the snow"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A private APEXCTL_HOME, so ``tiny:`` specs build into the test's temp folder."""
    old = os.environ.get("APEXCTL_HOME")
    os.environ["APEXCTL_HOME"] = str(tmp_path_factory.mktemp("apexctl_home"))
    yield os.environ["APEXCTL_HOME"]
    if old is None:
        os.environ.pop("APEXCTL_HOME")
    else:
        os.environ["APEXCTL_HOME"] = old


@pytest.fixture(scope="module")
def test_folder(home) -> str:
    return resolve_model_path("tiny:test")


@pytest.fixture(scope="module")
def qwen(test_folder) -> QwenImageBackbone:
    bb = load_backbone(test_folder)
    assert isinstance(bb, QwenImageBackbone)
    return bb


@pytest.fixture(scope="module")
def pipe(test_folder):
    from diffusers import QwenImagePipeline

    p = QwenImagePipeline.from_pretrained(test_folder)
    p.set_progress_bar_config(disable=True)
    return p


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


def test_encode_prompts_equals_pipeline(qwen, pipe):
    ours = qwen.encode_prompts(PROMPTS + [""])
    embeds, mask = pipe.encode_prompt(PROMPTS + [""], device="cpu")
    assert torch.equal(ours.embeds, embeds)
    assert torch.equal(ours.mask, mask) and ours.mask.dtype == torch.long
    assert ours.mask[2].sum() < ours.mask[1].sum()  # padding present
    one = qwen.encode_prompts(["a red fox"])
    embeds1, mask1 = pipe.encode_prompt("a red fox", device="cpu")
    assert mask1 is None and torch.equal(one.mask, torch.ones(1, embeds1.shape[1], dtype=torch.long))
    assert torch.equal(one.embeds, embeds1)
    assert qwen.embed_dim == embeds.shape[-1] == 16


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_euler_reproduces_stock_pipeline(qwen, pipe, guidance):
    from apexctl.engine.sampler import euler

    z = torch.randn(len(PROMPTS), *qwen.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    cond = qwen.encode_prompts(PROMPTS)
    uncond = qwen.encode_prompts([""] * len(PROMPTS)) if guidance > 1 else None
    ours = euler(qwen, z, cond, steps=4, uncond=uncond, guidance_scale=guidance)

    kwargs = dict(
        prompt=PROMPTS,
        negative_prompt=[""] * len(PROMPTS) if guidance > 1 else None,
        true_cfg_scale=guidance,
        num_inference_steps=4,
        height=32,
        width=32,
        latents=pack_latents(z),
    )
    ref = pipe(**kwargs, output_type="latent").images
    assert ref.shape == pack_latents(ours).shape
    torch.testing.assert_close(pack_latents(ours), ref, atol=1e-4, rtol=0)
    assert (ours - z).abs().max() > 0.1  # the sampler actually moved

    image = pipe(**kwargs, output_type="pt").images
    with torch.no_grad():
        decoded = qwen.decode_latents(ours)
    torch.testing.assert_close(((decoded + 1) / 2).clamp(0, 1), image, atol=1e-4, rtol=0)


def test_teacher_sigmas_match_pipeline_scheduler(qwen, pipe):
    pipe(prompt="a red fox", num_inference_steps=3, height=64, width=32, true_cfg_scale=1.0, output_type="latent")
    sig = qwen.teacher_sigmas(3, qwen.latent_shape(64, 32))
    torch.testing.assert_close(sig, pipe.scheduler.sigmas.float(), atol=0, rtol=0)
    assert sig[0] == 1.0 and sig[-1] == 0.0 and len(sig) == 4
    # stateless: the adapter's own scheduler is untouched
    assert len(qwen.scheduler.sigmas) == qwen.scheduler.config.num_train_timesteps


def test_vae_codec_normalisation_and_round_trip_shape(qwen):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        lat = qwen.encode_images(images)
        raw = qwen.codec.encode(images[:, :, None]).latent_dist.mode()[:, :, 0]
        out = qwen.decode_latents(lat)
    assert lat.shape == (2, *qwen.latent_shape(32, 32)) == (2, 4, 8, 8)
    mean = torch.tensor(qwen.codec.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(qwen.codec.config.latents_std).view(1, -1, 1, 1)
    torch.testing.assert_close(lat * std + mean, raw)
    assert out.shape == images.shape


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


def test_save_pretrained_round_trip_links_frozen_parts(digits, home, tmp_path):
    source = resolve_model_path("tiny:digits")
    out = tmp_path / "copy"
    out.mkdir()
    (out / "stale.txt").write_text("replaced")  # an existing folder is replaced as a whole
    with torch.no_grad():
        digits.transformer.proj_out.bias.add_(0.5)  # a "trained" transformer
    try:
        digits.save_pretrained(out, source=source)
        again = load_backbone(str(out))
        cond = digits.encode_prompts(["a drawing of the digit three"])
        x, t = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([0.7])
        with torch.no_grad():
            assert torch.equal(
                again.velocity(x, t, again.encode_prompts(["a drawing of the digit three"])),
                digits.velocity(x, t, cond),
            )
    finally:
        with torch.no_grad():
            digits.transformer.proj_out.bias.sub_(0.5)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "apexctl_model.json").read_text()) == {"family": "qwen_image"}
    weights = "text_encoder/model.safetensors"
    assert os.stat(out / weights).st_ino == os.stat(os.path.join(source, weights)).st_ino  # hard-linked
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


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


def test_condition_site_is_txt_in(qwen):
    site = qwen.condition_site()
    assert site is qwen.transformer.txt_in
    cond = qwen.encode_prompts(PROMPTS)
    seen = []
    handle = site.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    try:
        with torch.no_grad():
            qwen.velocity(torch.randn(2, 4, 8, 8), torch.tensor([0.5, 0.5]), cond)
    finally:
        handle.remove()
    assert seen == [torch.Size([2, cond.embeds.shape[1], qwen.transformer.inner_dim])]
    assert qwen.condition_dim() == qwen.transformer.inner_dim


def test_one_step_euler_schedule_is_finite_despite_shift_terminal():
    """Qwen-Image's scheduler config (shift_terminal 0.02) makes diffusers' 1-step schedule NaN; ours is [1, 0]."""
    from apexctl.models import load_backbone, resolve_model_path

    bb = load_backbone(resolve_model_path("tiny:test"))
    assert bb.scheduler.config.get("shift_terminal")
    torch.testing.assert_close(bb.teacher_sigmas(1, (4, 8, 8)), torch.tensor([1.0, 0.0]))
    assert torch.isfinite(bb.teacher_sigmas(4, (4, 8, 8))).all()
