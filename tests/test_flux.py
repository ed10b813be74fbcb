"""What only the FLUX.1 adapter does, on hub-free tiny builds (docs/design.md §3-§4): 2×2 packing with image / text ids, the
embedded guidance of dev models, LoRA on the single-stream blocks. tests/test_family_conformance.py holds what every
family satisfies against its stock pipeline (the dev build's Euler parity included)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from apexctl.models.flux import FluxBackbone, latent_image_ids, pack_latents, unpack_latents
from apexctl.models.tiny_flux import build_tiny_flux


@pytest.fixture(scope="module")
def dev(tmp_path_factory) -> FluxBackbone:
    return FluxBackbone.from_pretrained(
        build_tiny_flux(tmp_path_factory.mktemp("flux_dev") / "tiny", guidance_embeds=True)
    )


def test_packing_and_ids_match_the_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 16, 16)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 4, 16, 16))
    assert torch.equal(unpack_latents(packed, 16, 16), x)
    # _unpack_latents works in pixel units: 32 px with vae_scale_factor 2
    assert torch.equal(FluxPipeline._unpack_latents(packed, 32, 32, 2), x)
    assert torch.equal(latent_image_ids(16, 16), FluxPipeline._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32))


def test_the_pipeline_text_ids_are_the_zeros_velocity_passes(dev):
    pipe = dev._text_pipeline()
    with torch.no_grad():
        _, _, text_ids = pipe.encode_prompt(["a red fox", ""], None, device="cpu")
    assert torch.equal(text_ids, torch.zeros(dev.max_sequence_length, 3))


def test_dev_takes_the_embedded_guidance_as_an_input(dev):
    assert dev.guidance_embeds and dev.embedded_guidance == 3.5
    assert dev.scheduler.config.use_dynamic_shifting
    x, t, cond = torch.randn(1, 4, 16, 16), torch.tensor([0.5]), dev.encode_prompts(["a red fox"])
    with torch.no_grad():
        v = dev.velocity(x, t, cond)
        dev.embedded_guidance = 1.0
        try:
            assert (dev.velocity(x, t, cond) - v).abs().max() > 1e-4  # another value, another velocity
        finally:
            dev.embedded_guidance = 3.5


def test_lora_targets_reach_the_single_stream_blocks(dev):
    names = {n for n, _ in dev.transformer.named_modules()}
    for target in ("to_q", "to_k", "to_v", "proj_mlp", "proj_out"):
        assert f"single_transformer_blocks.0.{target}" in names or f"single_transformer_blocks.0.attn.{target}" in names
    assert {"proj_mlp", "proj_out"} <= set(dev.lora_targets)
