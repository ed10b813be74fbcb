"""SD3 / SD3.5 adapter against the stock diffusers pipeline, on a hub-free tiny build (DESIGN §3-§4)."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from apexctl.models.base import Cond
from apexctl.models.sd3 import SD3Backbone
from apexctl.models.tiny_sd3 import build_tiny_sd3
from apexctl.models.tokenizers import clip_tokenizer_det, t5_tokenizer_det

PROMPTS = ["a red fox", "a handwritten digit seven in the snow"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "tiny")


@pytest.fixture(scope="module")
def sd3(folder) -> SD3Backbone:
    return SD3Backbone.from_pretrained(folder)


@pytest.fixture(scope="module")
def pipe(folder):
    from diffusers import StableDiffusion3Pipeline

    p = StableDiffusion3Pipeline.from_pretrained(folder)
    p.set_progress_bar_config(disable=True)
    return p


def test_tokenizers_are_deterministic():
    assert clip_tokenizer_det().backend_tokenizer.to_str() == clip_tokenizer_det().backend_tokenizer.to_str()
    assert t5_tokenizer_det().backend_tokenizer.to_str() == t5_tokenizer_det().backend_tokenizer.to_str()
    clip, t5 = clip_tokenizer_det(), t5_tokenizer_det()
    assert len(clip("a red fox").input_ids) == 5  # bos + 3 words + eos
    assert len(t5("a red fox").input_ids) == 4  # 3 words + </s>


def test_folder_layout(folder):
    assert json.loads((folder / "apexctl_model.json").read_text()) == {"family": "sd3"}
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"


def test_encode_prompts_equals_pipeline(sd3, pipe):
    ours = sd3.encode_prompts(PROMPTS + [""])
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            PROMPTS + [""], None, None, device="cpu", do_classifier_free_guidance=False
        )
    assert torch.equal(ours.embeds, embeds) and torch.equal(ours.pooled, pooled)
    assert ours.embeds.shape == (3, 77 + 256, sd3.embed_dim) and sd3.embed_dim == 48
    assert ours.pooled.shape == (3, sd3.pooled_dim) and sd3.pooled_dim == 32
    assert torch.equal(ours.mask, torch.ones(3, 77 + 256, dtype=torch.long))
    # Cond.cat keeps pooled rows
    both = Cond.cat([ours[0], ours[1:]])
    assert torch.equal(both.pooled, ours.pooled) and torch.equal(both.embeds, ours.embeds)


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_euler_reproduces_stock_pipeline(sd3, pipe, guidance):
    from apexctl.engine.sampler import euler

    z = torch.randn(len(PROMPTS), *sd3.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    assert z.shape[1:] == (4, 8, 8)
    cond = sd3.encode_prompts(PROMPTS)
    uncond = sd3.encode_prompts([""] * len(PROMPTS)) if guidance > 1 else None
    ours = euler(sd3, z, cond, steps=4, uncond=uncond, guidance_scale=guidance)
    kwargs = dict(
        prompt=PROMPTS,
        negative_prompt=[""] * len(PROMPTS) if guidance > 1 else None,
        guidance_scale=guidance,
        num_inference_steps=4,
        height=32,
        width=32,
        latents=z,
    )
    ref = pipe(**kwargs, output_type="latent").images
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    assert (ours - z).abs().max() > 0.1  # the sampler actually moved
    torch.testing.assert_close(sd3.teacher_sigmas(4, (4, 8, 8)), pipe.scheduler.sigmas.float(), atol=0, rtol=0)

    if guidance == 1.0:
        image = pipe(**kwargs, output_type="pt").images
        with torch.no_grad():
            decoded = sd3.decode_latents(ours)
        torch.testing.assert_close(((decoded + 1) / 2).clamp(0, 1), image, atol=1e-4, rtol=0)


def test_vae_normalisation(sd3):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        lat = sd3.encode_images(images)
        raw = sd3.codec.encode(images).latent_dist.mode()
    cfg = sd3.codec.config
    assert cfg.shift_factor != 0 and cfg.scaling_factor != 1
    torch.testing.assert_close(lat / cfg.scaling_factor + cfg.shift_factor, raw)


def test_condition_site_is_context_embedder(sd3):
    site = sd3.condition_site()
    assert site is sd3.transformer.context_embedder
    cond = sd3.encode_prompts(PROMPTS)
    seen = []
    handle = site.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    try:
        with torch.no_grad():
            sd3.velocity(torch.randn(2, 4, 8, 8), torch.tensor([0.5, 0.5]), cond)
    finally:
        handle.remove()
    assert seen == [torch.Size([2, cond.embeds.shape[1], sd3.condition_dim()])]


def test_save_pretrained_round_trip(sd3, folder, tmp_path):
    out = tmp_path / "copy"
    with torch.no_grad():
        sd3.transformer.proj_out.bias.add_(0.5)
    try:
        sd3.save_pretrained(out, source=folder)
        again = SD3Backbone.from_pretrained(out)
        x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([0.7])
        with torch.no_grad():
            assert torch.equal(
                again.velocity(x, t, again.encode_prompts(["a red fox"])),
                sd3.velocity(x, t, sd3.encode_prompts(["a red fox"])),
            )
    finally:
        with torch.no_grad():
            sd3.transformer.proj_out.bias.sub_(0.5)
    weights = "text_encoder_3/model.safetensors"
    assert os.stat(out / weights).st_ino == os.stat(folder / weights).st_ino  # hard-linked
    assert json.loads((out / "apexctl_model.json").read_text()) == {"family": "sd3"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_lora_round_trip(folder, tmp_path):
    from peft import LoraConfig

    bb = SD3Backbone.from_pretrained(folder)
    bb.transformer.add_adapter(
        LoraConfig(r=2, lora_alpha=4, init_lora_weights="gaussian", target_modules=bb.lora_targets)
    )
    with torch.no_grad():
        for name, p in bb.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(3))
    bb.save_lora(tmp_path / "lora")
    fresh = SD3Backbone.from_pretrained(folder)
    fresh.load_lora(tmp_path / "lora")
    cond = bb.encode_prompts(["a red fox"])
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4)), torch.tensor([0.6])
    plain = SD3Backbone.from_pretrained(folder)
    with torch.no_grad():
        v = bb.velocity(x, t, cond)
        assert torch.equal(fresh.velocity(x, t, cond), v)
        assert (plain.velocity(x, t, cond) - v).abs().max() > 1e-3  # the adapter does something
