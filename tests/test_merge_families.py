"""merge-lora and the ComfyUI export on every family other than Qwen-Image (tests/test_lora.py covers that one from
a real training run): the merged folder loads in the stock diffusers pipeline, whose 1-step output equals apexctl's
one step through base + adapter, and the ComfyUI file names the diffusers modules ComfyUI maps."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from apexctl.cli import app
from apexctl.errors import BadInput
from apexctl.lora import COMFYUI_NAME, add_lora

runner = CliRunner()
PROMPT = "a red fox in the snow"


def _flux_pack(z):
    from apexctl.models.flux import pack_latents

    return pack_latents(z)


def _flux_unpack(x, z):
    from apexctl.models.flux import unpack_latents

    return unpack_latents(x, z.shape[-2], z.shape[-1])


# family → (stock pipeline kwargs for "1 step, no guidance", latents in, latents out)
NO_GUIDANCE = {
    "sana": (dict(guidance_scale=1.0, use_resolution_binning=False), None, None),
    "sd3": (dict(guidance_scale=1.0), None, None),
    "flux": (dict(guidance_scale=0.0, true_cfg_scale=1.0), _flux_pack, _flux_unpack),
    "z_image": (dict(guidance_scale=0.0), None, None),  # Z-Image: g = 0 turns CFG off
}


def _trained_lora(family: str, folder):
    """A tiny <family> build with a non-zero rank-2 adapter on the family's default targets, saved to ``folder``."""
    from apexctl.models import load_backbone, resolve_model_path

    bb = load_backbone(resolve_model_path(f"tiny:{family}"))
    add_lora(bb.transformer, rank=2, alpha=4.0, targets=bb.lora_targets, dropout=0.0, init="gaussian")
    with torch.no_grad():
        for name, p in bb.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return bb, bb.save_lora(folder, comfyui=bb.comfyui)


@pytest.fixture(autouse=True)
def _home(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("APEXCTL_HOME", str(tmp_path_factory.getbasetemp() / "home"))


@pytest.mark.parametrize("family", sorted(NO_GUIDANCE))
def test_merged_folder_in_stock_pipeline_equals_one_step(family, tmp_path):
    from diffusers import DiffusionPipeline

    from apexctl.engine.sampler import one_step

    bb, lora = _trained_lora(family, tmp_path / "lora")
    out = tmp_path / "merged"
    res = runner.invoke(app, ["merge-lora", "--lora", str(lora), "--base", f"tiny:{family}", "--out", str(out)])
    assert res.exit_code == 0, res.output
    merged = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert not any("lora_" in k for k in merged)

    z = torch.randn(1, *bb.latent_shape(32, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = one_step(bb, z, bb.encode_prompts([PROMPT]))
    kwargs, pack, unpack = NO_GUIDANCE[family]
    pipe = DiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    latents = pack(z) if pack else z.clone()
    stock = pipe(PROMPT, num_inference_steps=1, height=32, width=32, latents=latents, output_type="latent", **kwargs)
    stock = unpack(stock.images, z) if unpack else stock.images
    torch.testing.assert_close(stock, ours, atol=1e-4, rtol=1e-4)
    # the adapter mattered: the unmerged base gives another image
    from apexctl.models import load_backbone, resolve_model_path

    base = load_backbone(resolve_model_path(f"tiny:{family}"))
    with torch.no_grad():
        assert (one_step(base, z, base.encode_prompts([PROMPT])) - ours).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["qwen_image", "sd3", "flux", "z_image"])
def test_comfyui_keys_name_diffusers_modules_with_alpha(family, tmp_path):
    from apexctl.models import load_backbone, resolve_model_path

    preset = "test" if family == "qwen_image" else family
    bb = load_backbone(resolve_model_path(f"tiny:{preset}"))
    add_lora(bb.transformer, rank=2, alpha=4.0, targets=bb.lora_targets, dropout=0.0, init="gaussian")
    with torch.no_grad():
        for name, p in bb.transformer.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    folder = bb.save_lora(tmp_path / "lora", comfyui=True)
    comfy = load_file(str(folder / COMFYUI_NAME))
    linears = {n for n, m in bb.transformer.named_modules() if isinstance(m, nn.Linear) and "lora_" not in n}
    modules = {k.removeprefix("transformer.").rpartition(".")[0] for k in comfy if k.endswith(".alpha")}
    assert modules and modules <= {n.removesuffix(".base_layer") for n in linears}
    for m in modules:
        a, b = comfy[f"transformer.{m}.lora_A.weight"], comfy[f"transformer.{m}.lora_B.weight"]
        assert a.shape[0] == b.shape[1] == 2 and float(comfy[f"transformer.{m}.alpha"]) == 4.0
    assert all(k.startswith("transformer.") for k in comfy)


def test_comfyui_refused_for_sana_before_training(tmp_path):
    from apexctl.models import load_backbone, resolve_model_path

    bb = load_backbone(resolve_model_path("tiny:sana"))
    add_lora(bb.transformer, rank=2, alpha=4.0, targets=bb.lora_targets, dropout=0.0, init="gaussian")
    with pytest.raises(BadInput, match="'comfyui' is not available for family sana"):
        bb.save_lora(tmp_path / "lora", comfyui=True)
    assert not (tmp_path / "lora").exists()


def test_lora_on_the_wrong_base_exits_2_and_writes_nothing(tmp_path):
    from apexctl.lora import LORA_MARKER

    _, lora = _trained_lora("flux", tmp_path / "lora")
    out = tmp_path / "merged"
    res = runner.invoke(app, ["merge-lora", "--lora", str(lora), "--base", "tiny:sd3", "--out", str(out)])
    assert res.exit_code == 2 and "a LoRA for family flux cannot be applied to a sd3 base" in res.output
    (lora / LORA_MARKER).unlink()  # a foreign LoRA (no apexctl marker) whose shapes do not fit: still one line
    res = runner.invoke(app, ["merge-lora", "--lora", str(lora), "--base", "tiny:sd3", "--out", str(out)])
    assert res.exit_code == 2 and "does not fit the sd3 base model" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not out.exists()
