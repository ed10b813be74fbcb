"""FLUX.1 (schnell / dev) adapter against the stock diffusers pipeline, on a hub-free tiny build (DESIGN §3-§4)."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from apexctl.models.base import Cond
from apexctl.models.flux import FluxBackbone, pack_latents, unpack_latents

PROMPTS = ["a red fox", "a handwritten digit seven in the snow"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from apexctl.models.tiny_flux import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny")


@pytest.fixture(scope="module")
def dev_folder(tmp_path_factory):
    from apexctl.models.tiny_flux import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("flux_dev") / "tiny", guidance_embeds=True)


@pytest.fixture(scope="module")
def flux(folder) -> FluxBackbone:
    return FluxBackbone.from_pretrained(folder)


def _pipe(path):
    from diffusers import FluxPipeline

    p = FluxPipeline.from_pretrained(path)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def pipe(folder):
    return _pipe(folder)


def test_folder_layout(folder):
    assert json.loads((folder / "apexctl_model.json").read_text()) == {"family": "flux"}
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]


def test_packing_matches_pipeline():
    from diffusers import FluxPipeline

    from apexctl.models.flux import latent_image_ids

    x = torch.randn(2, 4, 16, 16)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 4, 16, 16))
    assert torch.equal(unpack_latents(packed, 16, 16), x)
    # _unpack_latents works in pixel units: 32 px with vae_scale_factor 2
    assert torch.equal(FluxPipeline._unpack_latents(packed, 32, 32, 2), x)
    assert torch.equal(latent_image_ids(16, 16), FluxPipeline._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32))


def test_encode_prompts_equals_pipeline(flux, pipe):
    ours = flux.encode_prompts(PROMPTS + [""])
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS + [""], None, device="cpu")
    assert torch.equal(ours.embeds, embeds) and torch.equal(ours.pooled, pooled)
    assert ours.embeds.shape == (3, 512, flux.embed_dim) and flux.embed_dim == 32
    assert ours.pooled.shape == (3, flux.pooled_dim) and flux.pooled_dim == 16
    assert torch.equal(ours.mask, torch.ones(3, 512, dtype=torch.long))
    assert torch.equal(text_ids, torch.zeros(512, 3))
    both = Cond.cat([ours[0], ours[1:]])
    assert torch.equal(both.pooled, ours.pooled) and torch.equal(both.embeds, ours.embeds)


def _parity(bb, pipe, true_cfg: float, guidance_scale: float, decode: bool = False):
    from apexctl.engine.sampler import euler

    z = torch.randn(len(PROMPTS), *bb.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    assert z.shape[1:] == (4, 16, 16)
    cond = bb.encode_prompts(PROMPTS)
    uncond = bb.encode_prompts([""] * len(PROMPTS)) if true_cfg > 1 else None
    ours = euler(bb, z, cond, steps=4, uncond=uncond, guidance_scale=true_cfg)
    kwargs = dict(
        prompt=PROMPTS,
        negative_prompt=[""] * len(PROMPTS) if true_cfg > 1 else None,
        true_cfg_scale=true_cfg,
        guidance_scale=guidance_scale,
        num_inference_steps=4,
        height=32,
        width=32,
        latents=pack_latents(z),
    )
    ref = pipe(**kwargs, output_type="latent").images
    torch.testing.assert_close(ours, unpack_latents(ref, 16, 16), atol=1e-4, rtol=0)
    assert (ours - z).abs().max() > 0.1  # the sampler actually moved
    torch.testing.assert_close(bb.teacher_sigmas(4, (4, 16, 16)), pipe.scheduler.sigmas.float(), atol=0, rtol=0)
    if decode:
        image = pipe(**kwargs, output_type="pt").images
        with torch.no_grad():
            decoded = bb.decode_latents(ours)
        torch.testing.assert_close(((decoded + 1) / 2).clamp(0, 1), image, atol=1e-4, rtol=0)


@pytest.mark.parametrize("true_cfg", [1.0, 4.0])
def test_euler_reproduces_stock_pipeline(flux, pipe, true_cfg):
    # schnell-like: no guidance embedding, so the pipeline's guidance_scale is ignored
    _parity(flux, pipe, true_cfg, guidance_scale=0.0, decode=true_cfg == 1.0)


def test_euler_reproduces_stock_pipeline_dev(dev_folder):
    bb = FluxBackbone.from_pretrained(dev_folder)
    assert bb.guidance_embeds and bb.embedded_guidance == 3.5
    assert bb.scheduler.config.use_dynamic_shifting
    pipe = _pipe(dev_folder)
    _parity(bb, pipe, 1.0, guidance_scale=3.5)
    # the embedded guidance matters: another value gives another velocity
    x, t, cond = torch.randn(1, 4, 16, 16), torch.tensor([0.5]), bb.encode_prompts(["a red fox"])
    with torch.no_grad():
        v = bb.velocity(x, t, cond)
        bb.embedded_guidance = 1.0
        try:
            assert (bb.velocity(x, t, cond) - v).abs().max() > 1e-4
        finally:
            bb.embedded_guidance = 3.5


def test_vae_normalisation(flux):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        lat = flux.encode_images(images)
        raw = flux.codec.encode(images).latent_dist.mode()
    cfg = flux.codec.config
    assert cfg.shift_factor != 0 and cfg.scaling_factor != 1
    assert lat.shape == (2, 4, 16, 16)
    torch.testing.assert_close(lat / cfg.scaling_factor + cfg.shift_factor, raw)


def test_condition_site_is_context_embedder(flux):
    site = flux.condition_site()
    assert site is flux.transformer.context_embedder
    cond = flux.encode_prompts(PROMPTS)
    seen = []
    handle = site.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    try:
        with torch.no_grad():
            flux.velocity(torch.randn(2, 4, 16, 16), torch.tensor([0.5, 0.5]), cond)
    finally:
        handle.remove()
    assert seen == [torch.Size([2, cond.embeds.shape[1], flux.condition_dim()])]


def test_save_pretrained_round_trip(flux, folder, tmp_path):
    out = tmp_path / "copy"
    with torch.no_grad():
        flux.transformer.proj_out.bias.add_(0.5)
    try:
        flux.save_pretrained(out, source=folder)
        again = FluxBackbone.from_pretrained(out)
        x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2)), torch.tensor([0.7])
        with torch.no_grad():
            assert torch.equal(
                again.velocity(x, t, again.encode_prompts(["a red fox"])),
                flux.velocity(x, t, flux.encode_prompts(["a red fox"])),
            )
    finally:
        with torch.no_grad():
            flux.transformer.proj_out.bias.sub_(0.5)
    weights = "text_encoder_2/model.safetensors"
    assert os.stat(out / weights).st_ino == os.stat(folder / weights).st_ino  # hard-linked
    assert json.loads((out / "apexctl_model.json").read_text()) == {"family": "flux"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_lora_targets_exist(flux):
    names = [n for n, _ in flux.transformer.named_modules()]
    for target in flux.lora_targets:
        assert any(n.endswith("." + target) for n in names), target
    single = [n for n in names if n.startswith("single_transformer_blocks.0.")]
    for target in ("to_q", "to_k", "to_v", "proj_mlp", "proj_out"):
        assert (
            f"single_transformer_blocks.0.{target}" in single or f"single_transformer_blocks.0.attn.{target}" in single
        )


def test_lora_round_trip(folder, tmp_path):
    from peft import LoraConfig

    bb = FluxBackbone.from_pretrained(folder)
    bb.transformer.add_adapter(
        LoraConfig(r=2, lora_alpha=4, init_lora_weights="gaussian", target_modules=bb.lora_targets)
    )
    with torch.no_grad():
        for name, p in bb.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(3))
    bb.save_lora(tmp_path / "lora")
    fresh = FluxBackbone.from_pretrained(folder)
    fresh.load_lora(tmp_path / "lora")
    cond = bb.encode_prompts(["a red fox"])
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4)), torch.tensor([0.6])
    plain = FluxBackbone.from_pretrained(folder)
    with torch.no_grad():
        v = bb.velocity(x, t, cond)
        assert torch.equal(fresh.velocity(x, t, cond), v)
        assert (plain.velocity(x, t, cond) - v).abs().max() > 1e-3  # the adapter does something
    # the stock pipeline loads it too, to the same velocity
    pipe = _pipe(folder)
    pipe.load_lora_weights(tmp_path / "lora", weight_name="pytorch_lora_weights.safetensors")
    via_pipe = FluxBackbone(pipe.transformer, pipe.scheduler, codec_config=dict(plain.codec_config))
    with torch.no_grad():
        torch.testing.assert_close(via_pipe.velocity(x, t, cond), v, atol=1e-6, rtol=0)
