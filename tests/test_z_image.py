"""Z-Image adapter against the stock diffusers ZImagePipeline, on a hub-free tiny build (DESIGN §3-§4)."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from apexctl.models.tiny_z_image import build_tiny_z_image
from apexctl.models.z_image import ZImageBackbone

PROMPTS = ["a red fox", "a handwritten digit seven in the snow"]
PIPE_KW = dict(height=32, width=32, output_type="latent")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_z_image(tmp_path_factory.mktemp("z_image") / "tiny")


@pytest.fixture(scope="module")
def zi(folder) -> ZImageBackbone:
    return ZImageBackbone.from_pretrained(folder)


@pytest.fixture(scope="module")
def pipe(folder):
    from diffusers import ZImagePipeline

    p = ZImagePipeline.from_pretrained(folder)
    p.set_progress_bar_config(disable=True)
    return p


def _x(seed: int, b: int = 2) -> torch.Tensor:
    return torch.randn(b, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_folder_layout_and_scheduler(folder, zi, pipe):
    assert json.loads((folder / "apexctl_model.json").read_text()) == {"family": "z_image"}
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "ZImagePipeline"
    assert len(pipe.tokenizer) > 100 and pipe.tokenizer.chat_template
    assert zi.latent_shape(32, 32) == (4, 16, 16)
    sig = zi.teacher_sigmas(4, (4, 16, 16))
    assert len(sig) == 5 and sig[0] == 1.0 and sig[-1] == 0.0
    assert len(zi.scheduler.sigmas) == zi.scheduler.config.num_train_timesteps  # stateless


def test_encode_prompts_equals_pipeline(zi, pipe):
    ours = zi.encode_prompts(PROMPTS + [""])
    pos, neg = pipe.encode_prompt(list(PROMPTS), device="cpu", do_classifier_free_guidance=True)
    ref = pos + neg[:1]
    lengths = [int(e.shape[0]) for e in ref]
    assert len(set(lengths)) > 1  # variable length → right padding present
    assert ours.embeds.shape == (3, max(lengths), zi.embed_dim) and ours.mask.dtype == torch.long
    assert ours.mask.sum(1).tolist() == lengths
    for a, b in zip(ZImageBackbone.cond_to_list(ours), ref, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_euler_reproduces_stock_pipeline(zi, pipe, guidance):
    """Our scale s ↔ the pipeline's guidance_scale s − 1 (its rule is c + g(c − u); g = 0 turns CFG off)."""
    from apexctl.engine.sampler import euler

    z = _x(0)
    cond = zi.encode_prompts(PROMPTS)
    uncond = zi.encode_prompts([""] * len(PROMPTS)) if guidance > 1 else None
    ours = euler(zi, z, cond, steps=4, uncond=uncond, guidance_scale=guidance)
    neg = {"negative_prompt": [""] * len(PROMPTS)} if guidance > 1 else {}
    ref = pipe(
        list(PROMPTS), num_inference_steps=4, latents=z.clone(), guidance_scale=guidance - 1.0, **neg, **PIPE_KW
    ).images
    assert ref.shape == ours.shape
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    assert (ours - z).abs().max() > 0.1  # the sampler actually moved


def test_velocity_is_negated_reversed_time_model(zi):
    cond = zi.encode_prompts(PROMPTS)
    x, t = _x(5), torch.tensor([0.8, 0.3])
    with torch.no_grad():
        raw = zi.transformer(
            list(x.unsqueeze(2).unbind(0)), 1 - t, ZImageBackbone.cond_to_list(cond), return_dict=False
        )[0]
        v = zi.velocity(x, t, cond)
    torch.testing.assert_close(v, -torch.stack(raw).squeeze(2), atol=1e-5, rtol=0)


def test_vae_normalisation(zi):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    cfg = zi.codec.config
    with torch.no_grad():
        lat = zi.encode_images(images)
        raw = zi.codec.encode(images).latent_dist.mode()
        out = zi.decode_latents(lat)
        ref = zi.codec.decode(lat / cfg.scaling_factor + cfg.shift_factor, return_dict=False)[0]
    assert lat.shape == (2, *zi.latent_shape(32, 32))
    torch.testing.assert_close(lat, (raw - cfg.shift_factor) * cfg.scaling_factor)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_condition_site_sees_per_sample_rows(zi):
    from apexctl.engine.shift import ConditionShift

    site = zi.condition_site()
    assert site is zi.transformer.cap_embedder
    cond = zi.encode_prompts(PROMPTS)
    seen = []
    handle = site.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    x, t = _x(3), torch.tensor([0.5, 0.5])
    try:
        with torch.no_grad():
            v = zi.velocity(x, t, cond)
    finally:
        handle.remove()
    assert seen == [torch.Size([2, 32, 32])]  # [B, tokens rounded up to 32, dim]
    assert zi.condition_dim() == 32
    # a shift on row 1 only changes row 1, and equals shifting that row alone
    shift = ConditionShift(a=-1.0, b=0.1)
    fake = torch.tensor([False, True])
    with torch.no_grad(), shift.applied(site, fake):
        v_shift = zi.velocity(x, t, cond)
    with torch.no_grad(), shift.applied(site, torch.tensor([True])):
        v_one = zi.velocity(x[1:], t[1:], cond[1])
    assert torch.equal(v_shift[0], v[0]) and not torch.allclose(v_shift[1], v[1])
    torch.testing.assert_close(v_shift[1:], v_one, atol=1e-5, rtol=0)
    assert not zi.transformer.cap_embedder._forward_hooks and not zi.transformer.cap_embedder._forward_pre_hooks


def test_save_pretrained_round_trip(zi, folder, tmp_path):
    out = tmp_path / "copy"
    bias = zi.transformer.cap_embedder[1].bias
    with torch.no_grad():
        bias.add_(0.5)  # a "trained" transformer
    try:
        zi.save_pretrained(out, source=folder)
        again = ZImageBackbone.from_pretrained(out)
        cond = zi.encode_prompts(PROMPTS)
        x, t = _x(2), torch.tensor([0.7, 0.2])
        with torch.no_grad():
            assert torch.equal(again.velocity(x, t, again.encode_prompts(PROMPTS)), zi.velocity(x, t, cond))
    finally:
        with torch.no_grad():
            bias.sub_(0.5)
    weights = "text_encoder/model.safetensors"
    assert os.stat(out / weights).st_ino == os.stat(folder / weights).st_ino  # hard-linked
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "ZImagePipeline"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_lora_round_trip(folder, tmp_path):
    from peft import LoraConfig

    bb = ZImageBackbone.from_pretrained(folder)
    bb.transformer.add_adapter(
        LoraConfig(r=2, lora_alpha=4, init_lora_weights="gaussian", target_modules=bb.lora_targets)
    )
    with torch.no_grad():
        for name, p in bb.transformer.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    bb.save_lora(tmp_path / "lora")
    fresh = ZImageBackbone.from_pretrained(folder)
    fresh.load_lora(tmp_path / "lora")
    cond = bb.encode_prompts(PROMPTS)
    x, t = _x(4), torch.tensor([0.9, 0.4])
    with torch.no_grad():
        v_lora = bb.velocity(x, t, cond)
        assert torch.equal(fresh.velocity(x, t, cond), v_lora)
        assert not torch.allclose(ZImageBackbone.from_pretrained(folder).velocity(x, t, cond), v_lora)
