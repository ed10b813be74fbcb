"""The shipped recipes: each validates and plans with `distill --dry-run` (no weights), and its LoRA targets name
real modules of its family's architecture (checked on the tiny build, which uses the same diffusers classes)."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn
from typer.testing import CliRunner

from apexctl.cli import app
from apexctl.recipe import load_recipe

runner = CliRunner()
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
PAPER = {
    # recipe: (family, LoRA rank or None, global batch, lr, steps)
    "qwen_lora.yaml": ("qwen_image", 64, 64, 1e-4, 2000),
    "qwen_lora_r32.yaml": ("qwen_image", 32, 64, 1e-4, 2000),
    "qwen_full.yaml": ("qwen_image", None, 64, 1e-5, 2000),
    "sana_0.6b.yaml": ("sana", None, 64, 1e-5, 8000),
    "sana_1.6b.yaml": ("sana", None, 64, 1e-5, 8000),
    "sd3.5_medium_lora.yaml": ("sd3", 64, 64, 1e-4, 2000),
    "flux_dev_lora.yaml": ("flux", 64, 64, 1e-4, 2000),
    "z_image_lora.yaml": ("z_image", 64, 64, 1e-4, 2000),
}
TINY = {
    "qwen_image": "tiny:test",
    "sana": "tiny:sana",
    "sd3": "tiny:sd3",
    "flux": "tiny:flux",
    "z_image": "tiny:z_image",
}
#: the released APEX code's Qwen-Image LoRA target list (shared/notes/apex-paper.md, "Training settings")
OFFICIAL_QWEN_TARGETS = {
    "to_k", "to_q", "to_v", "to_out.0", "img_mlp.net.0.proj", "img_mlp.net.2", "add_k_proj", "add_q_proj",
    "add_v_proj", "txt_mlp.net.0.proj", "txt_mlp.net.2", "attn.to_add_out", "timestep_embedder.linear_1",
    "timestep_embedder.linear_2",
}  # fmt: skip


def test_every_shipped_recipe_is_listed_here():
    shipped = {p.name for p in RECIPES.glob("*.yaml")} - {
        "digits.yaml",
        "digits_teacher.yaml",
        "scenes.yaml",
        "scenes_teacher.yaml",
        "digits_apex.yaml",  # the previous default objective, kept for the comparison
        "scenes_apex.yaml",
        "digits_pairs.yaml",  # the digits teacher's (noise, sample) pairs for the regression warm start
    }
    assert shipped == set(PAPER)


def test_digits_pairs_recipe_synthesises_every_digits_prompt():
    from apexctl.data.digits import all_prompts

    r = load_recipe(RECIPES / "digits_pairs.yaml")
    assert r.data.source == "prompts" and r.data.synthesize is not None and r.data.synthesize.guidance == 2.0
    assert (RECIPES.parent / r.data.path).read_text().splitlines() == all_prompts()


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_recipe_settings_and_dry_run(name):
    family, rank, global_batch, lr, steps = PAPER[name]
    r = load_recipe(RECIPES / name)
    assert r.model.family == family and r.model.dtype == "bf16" and r.hardware.precision == "bf16"
    assert (r.model.lora.rank if r.model.lora else None) == rank
    if r.model.lora:
        assert r.model.lora.alpha == rank  # α = r: scale 1, as the released configs
    assert r.train.global_batch == global_batch and r.train.lr == lr and r.train.steps == steps
    assert r.method.objective == "apex_full" and (r.method.shift.a, r.method.shift.b) == (-1.0, 0.0)
    # the digits winner where the family and strategy allow it: the frozen teacher as the real score, the
    # target-time input (not SANA, not FSDP)
    fsdp = r.hardware.strategy == "fsdp"
    assert r.method.reference == ("self" if fsdp and not r.model.lora else "base")
    assert r.method.target_time == ("none" if family == "sana" or fsdp else "embed")
    assert r.train.micro_batch >= 4  # the four row groups
    res = runner.invoke(app, ["distill", str(RECIPES / name), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert f"= {global_batch} global" in res.output and r.model.path in res.output


def test_qwen_lora_uses_the_official_target_list_at_512():
    for name in ("qwen_lora.yaml", "qwen_lora_r32.yaml"):
        r = load_recipe(RECIPES / name)
        assert set(r.model.lora.targets) == OFFICIAL_QWEN_TARGETS
        assert r.data.resolution == 512 and r.train.betas == (0.9, 0.99)


def test_a_wrong_process_count_is_caught_by_the_dry_run():
    res = runner.invoke(app, ["distill", str(RECIPES / "qwen_full.yaml"), "--dry-run", "--set", "hardware.processes=8"])
    assert res.exit_code == 2 and "global_batch = 64" in res.output


def _matches(module_name: str, target: str) -> bool:
    """peft's rule for a string target: the module's full name is the target or ends with '.' + target."""
    return module_name == target or module_name.endswith("." + target)


@pytest.mark.parametrize("name", sorted(n for n, v in PAPER.items() if v[1] is not None))
def test_lora_targets_name_linear_modules_of_the_family(name, monkeypatch, tmp_path):
    monkeypatch.setenv("APEXCTL_HOME", str(tmp_path))
    from apexctl.models import load_backbone, resolve_model_path

    r = load_recipe(RECIPES / name)
    bb = load_backbone(resolve_model_path(TINY[r.model.family]))
    assert bb.family == r.model.family
    linears = [n for n, m in bb.transformer.named_modules() if isinstance(m, nn.Linear)]
    targets = r.model.lora.targets or bb.lora_targets
    missing = [t for t in targets if not any(_matches(n, t) for n in linears)]
    assert not missing, f"{name}: targets match no Linear module of {type(bb.transformer).__name__}: {missing}"


def test_qwen_lora_recipe_end_to_end_on_the_tiny_build(tmp_path, monkeypatch):
    """The shipped recipe as a user runs it, sizes overridden: teacher synthesis from a prompt file → distill
    (guided reference, EMA, gradient checkpointing, ComfyUI export) → merge-lora → stock pipeline at one step.
    The base is loaded in fp32 here (the recipe's bf16 base would differ from the fp32 merge by bf16 rounding) and
    the learning rate raised so that the adapter visibly changes the image."""
    import torch
    from diffusers import QwenImagePipeline

    from apexctl.engine.sampler import one_step
    from apexctl.inference import load_trained
    from apexctl.models.qwen_image import pack_latents

    monkeypatch.setenv("APEXCTL_HOME", str(tmp_path / "home"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in the snow\na blue car\ntwo cats on a sofa\na green apple\n")
    sets = [
        "model.path=tiny:test",
        "model.dtype=fp32",
        "train.lr=0.005",
        "train.ema_decay=0.5",
        f"data.path={prompts}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.resolution=32",
        "data.synthesize.steps=4",
        "train.steps=2",
        "train.micro_batch=4",  # apex_full: one row per group
        "train.grad_accum=1",
        "train.global_batch=4",
        "hardware.device=cpu",
        "hardware.precision=fp32",
        f"output.dir={tmp_path / 'run'}",
    ]
    args = [a for s in sets for a in ("--set", s)]
    for cmd in ("prepare", "distill"):
        res = runner.invoke(app, [cmd, str(RECIPES / "qwen_lora.yaml"), *args, "-q"])
        assert res.exit_code == 0, res.output
    lora = tmp_path / "run" / "lora"
    assert (lora / "pytorch_lora_weights.safetensors").is_file() and (lora / "comfyui_lora.safetensors").is_file()
    out = tmp_path / "merged"
    res = runner.invoke(app, ["merge-lora", "--lora", str(tmp_path / "run"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    pipe = QwenImagePipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    stock = pipe("a red fox in the snow", num_inference_steps=1, height=32, width=32, latents=pack_latents(z),
                 output_type="latent", true_cfg_scale=1.0).images  # fmt: skip
    ours = load_trained(load_recipe(tmp_path / "run" / "recipe.yaml"))
    with torch.no_grad():
        want = pack_latents(one_step(ours, z, ours.encode_prompts(["a red fox in the snow"])))
    torch.testing.assert_close(stock, want, atol=1e-5, rtol=1e-5)
    from apexctl.models import load_backbone, resolve_model_path

    base = load_backbone(resolve_model_path("tiny:test"))
    with torch.no_grad():
        plain = pack_latents(one_step(base, z, base.encode_prompts(["a red fox in the snow"])))
    assert (plain - want).abs().max() > 1e-3  # the trained adapter is in the merged weights
