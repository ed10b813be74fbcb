"""SANA adapter against the stock diffusers SanaPipeline, on a hub-free tiny build (DESIGN §3-§4)."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from apexctl.models.sana import SanaBackbone, default_complex_human_instruction
from apexctl.models.tiny_sana import build_tiny_sana, gemma_tokenizer

PROMPTS = ["a red fox", "a handwritten digit seven in the snow"]
PIPE_KW = dict(height=32, width=32, output_type="latent", use_resolution_binning=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_sana(tmp_path_factory.mktemp("sana") / "tiny")


@pytest.fixture(scope="module")
def sana(folder) -> SanaBackbone:
    return SanaBackbone.from_pretrained(folder)


@pytest.fixture(scope="module")
def pipe(folder):
    from diffusers import SanaPipeline

    p = SanaPipeline.from_pretrained(folder)
    p.set_progress_bar_config(disable=True)
    return p


def _x(seed: int, b: int = 2) -> torch.Tensor:
    return torch.randn(b, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_tokenizer_is_deterministic_gemma_style():
    a, b = gemma_tokenizer(), gemma_tokenizer()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    ids = a("a handwritten digit seven").input_ids
    assert ids[0] == a.bos_token_id and len(ids) == 5  # <bos> + one token per corpus word


def test_folder_layout_and_scheduler(folder, sana, pipe):
    assert json.loads((folder / "apexctl_model.json").read_text()) == {"family": "sana"}
    assert type(pipe.scheduler).__name__ == type(sana.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert sana.latent_shape(32, 32) == (4, 16, 16)
    sig = sana.teacher_sigmas(4, (4, 16, 16))
    assert len(sig) == 5 and sig[0] == 1.0 and sig[-1] == 0.0
    assert len(sana.scheduler.sigmas) == sana.scheduler.config.num_train_timesteps  # stateless


def test_encode_prompts_equals_pipeline(sana, pipe):
    ours = sana.encode_prompts(PROMPTS + [""])
    embeds, mask, neg, neg_mask = pipe.encode_prompt(
        PROMPTS,
        do_classifier_free_guidance=True,
        negative_prompt="",
        device="cpu",
        complex_human_instruction=default_complex_human_instruction(),
    )
    assert ours.embeds.shape == (3, 300, sana.embed_dim) and ours.mask.dtype == torch.long
    assert torch.equal(ours.embeds[:2], embeds) and torch.equal(ours.mask[:2], mask.long())
    # "" is encoded as the pipeline's negative prompt (no complex_human_instruction)
    assert torch.equal(ours.embeds[2:], neg[:1]) and torch.equal(ours.mask[2:], neg_mask[:1].long())
    assert ours.mask[2].sum() < ours.mask[1].sum() < 300  # right padding present
    assert torch.equal(sana.encode_negative_prompts(["", ""]).embeds, neg)


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_euler_reproduces_stock_pipeline(sana, pipe, guidance):
    from apexctl.engine.sampler import euler

    z = _x(0)
    cond = sana.encode_prompts(PROMPTS)
    uncond = sana.encode_prompts([""] * len(PROMPTS)) if guidance > 1 else None
    ours = euler(sana, z, cond, steps=4, uncond=uncond, guidance_scale=guidance)
    neg = {"negative_prompt": ""} if guidance > 1 else {}
    ref = pipe(PROMPTS, num_inference_steps=4, latents=z.clone(), guidance_scale=guidance, **neg, **PIPE_KW).images
    assert ref.shape == ours.shape
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    assert (ours - z).abs().max() > 0.1  # the sampler actually moved


def test_vae_normalisation(sana):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        lat = sana.encode_images(images)
        raw = sana.codec.encode(images).latent
        out = sana.decode_latents(lat)
        ref = sana.codec.decode(raw, return_dict=False)[0]
    assert lat.shape == (2, *sana.latent_shape(32, 32))
    torch.testing.assert_close(lat, raw * sana.codec.config.scaling_factor)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_condition_site_is_caption_projection(sana):
    site = sana.condition_site()
    assert site is sana.transformer.caption_projection
    cond = sana.encode_prompts(PROMPTS)
    seen = []
    handle = site.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    try:
        with torch.no_grad():
            sana.velocity(_x(3), torch.tensor([0.5, 0.5]), cond)
    finally:
        handle.remove()
    inner = sana.transformer.config.num_attention_heads * sana.transformer.config.attention_head_dim
    assert seen == [torch.Size([2, cond.embeds.shape[1], inner])]
    assert sana.condition_dim() == inner


def test_save_pretrained_round_trip(sana, folder, tmp_path):
    out = tmp_path / "copy"
    bias = sana.transformer.proj_out.bias
    with torch.no_grad():
        bias.add_(0.5)  # a "trained" transformer
    try:
        sana.save_pretrained(out, source=folder)
        again = SanaBackbone.from_pretrained(out)
        cond = sana.encode_prompts(PROMPTS)
        x, t = _x(2), torch.tensor([0.7, 0.2])
        with torch.no_grad():
            assert torch.equal(again.velocity(x, t, again.encode_prompts(PROMPTS)), sana.velocity(x, t, cond))
    finally:
        with torch.no_grad():
            bias.sub_(0.5)
    weights = "text_encoder/model.safetensors"
    assert os.stat(out / weights).st_ino == os.stat(folder / weights).st_ino  # hard-linked
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "SanaPipeline"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_lora_round_trip(folder, tmp_path):
    from peft import LoraConfig

    bb = SanaBackbone.from_pretrained(folder)
    bb.transformer.add_adapter(
        LoraConfig(r=2, lora_alpha=4, init_lora_weights="gaussian", target_modules=bb.lora_targets)
    )
    with torch.no_grad():
        for name, p in bb.transformer.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    bb.save_lora(tmp_path / "lora")
    fresh = SanaBackbone.from_pretrained(folder)
    fresh.load_lora(tmp_path / "lora")
    cond = bb.encode_prompts(PROMPTS)
    x, t = _x(4), torch.tensor([0.9, 0.4])
    with torch.no_grad():
        v_lora = bb.velocity(x, t, cond)
        assert torch.equal(fresh.velocity(x, t, cond), v_lora)
        assert not torch.allclose(SanaBackbone.from_pretrained(folder).velocity(x, t, cond), v_lora)
