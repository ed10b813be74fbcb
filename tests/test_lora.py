"""LoRA training on the real-VAE tiny Qwen-Image: only the adapter trains, the export loads in the stock pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from apexctl.cli import app
from apexctl.errors import ApexError
from apexctl.recipe import load_recipe

runner = CliRunner()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    mp = pytest.MonkeyPatch()
    mp.setenv("APEXCTL_HOME", str(tmp / "home"))
    tree = {
        "model": {"path": "tiny:test", "lora": {"rank": 4, "alpha": 8.0, "init": "gaussian"}},
        "data": {"source": "digits", "cache_dir": str(tmp / "cache"), "resolution": 32},
        "method": {"objective": "apex", "reference": "base"},
        "train": {"steps": 4, "micro_batch": 4, "lr": 1e-3, "ema_decay": 0.5, "log_every": 1, "checkpoint_every": 100},
        "hardware": {"device": "cpu"},
        "output": {"dir": str(tmp / "run"), "lora_formats": ["diffusers", "comfyui"]},
    }
    recipe = tmp / "lora.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    for cmd in (["prepare", str(recipe), "-q"], ["distill", str(recipe), "-q"]):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 0, res.output
    yield tmp, recipe
    mp.undo()


def test_only_the_adapter_trains_and_alpha_is_exported(lora_run):
    tmp, _ = lora_run
    from apexctl.models import resolve_model_path

    base = load_file(str(Path(resolve_model_path("tiny:test")) / "transformer" / "diffusion_pytorch_model.safetensors"))
    trained = load_file(str(tmp / "run" / "checkpoints" / "step-000004" / "model.safetensors"))
    lora_keys = [k for k in trained if "lora_" in k]
    assert lora_keys
    for k, v in trained.items():
        if "lora_" not in k:
            torch.testing.assert_close(v, base[k.replace(".base_layer", "")], rtol=0, atol=0, msg=k)
    f = tmp / "run" / "lora" / "pytorch_lora_weights.safetensors"
    with safe_open(str(f), "pt") as sf:
        keys, meta = list(sf.keys()), sf.metadata()
    assert keys and all(k.startswith("transformer.") for k in keys)
    cfg = json.loads(meta["lora_adapter_metadata"])
    assert cfg["transformer.lora_alpha"] == 8.0 and cfg["transformer.r"] == 4  # alpha ≠ rank survives the export


def _one_step_pipeline(path: str):
    """Stock pipeline; the scheduler without ``shift_terminal``: with Qwen-Image's real config (0.02) diffusers'
    terminal stretch divides by zero at num_inference_steps=1 and the stock pipeline returns NaN."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(path)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift_terminal=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_stock_pipeline_with_the_lora_equals_apexctl_one_step(lora_run):
    tmp, recipe = lora_run
    from apexctl.engine.sampler import one_step
    from apexctl.inference import load_trained
    from apexctl.models.qwen_image import pack_latents

    ours = load_trained(load_recipe(recipe))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x = one_step(ours, z, ours.encode_prompts(["a handwritten digit seven"]))
    stock = _stock_one_step(z, tmp / "run" / "lora")
    torch.testing.assert_close(stock, pack_latents(x), atol=1e-5, rtol=1e-5)
    # and the adapter matters: without it the base gives something else
    assert (_stock_one_step(z) - stock).abs().max() > 1e-4


def _stock_one_step(
    z: torch.Tensor, lora: Path | None = None, pipe=None, prompt: str = "a handwritten digit seven"
) -> torch.Tensor:
    """The stock Qwen-Image pipeline's packed one-step latents for ``z``: ``pipe``, else tiny:test's with the
    one-step scheduler (and ``lora`` loaded when given)."""
    from apexctl.models import resolve_model_path
    from apexctl.models.qwen_image import pack_latents

    if pipe is None:
        pipe = _one_step_pipeline(resolve_model_path("tiny:test"))
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    return pipe(
        prompt,
        num_inference_steps=1,
        height=32,
        width=32,
        latents=pack_latents(z),
        output_type="latent",
        true_cfg_scale=1.0,
    ).images


def test_zero_adapter_is_refused():
    from torch import nn

    from apexctl.lora import adapter_state, add_lora, check_not_zero

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q = nn.Linear(4, 4)

    from diffusers.loaders.peft import PeftAdapterMixin

    class TinyMixin(Tiny, PeftAdapterMixin):
        pass

    m = TinyMixin()
    add_lora(m, rank=2, alpha=2, targets=["to_q"], dropout=0.0, init="default")  # B = 0 at init
    with pytest.raises(ApexError, match="all zero"):
        check_not_zero(adapter_state(m))


def test_base_reference_full_tuning_is_refused_under_fsdp(tmp_path):
    """reference = base without LoRA keeps a frozen copy of the starting weights: fine unsharded, refused with FSDP."""
    p = tmp_path / "r.yaml"
    p.write_text("model: {path: tiny:digits}\nmethod: {reference: base}\nhardware: {strategy: fsdp, processes: 2}\n")
    res = runner.invoke(app, ["distill", str(p), "--dry-run"])
    assert res.exit_code == 2 and "method.reference = 'base'" in res.output and "fsdp" in res.output
    p.write_text("model: {path: tiny:digits}\nmethod: {reference: base}\n")
    assert runner.invoke(app, ["distill", str(p), "--dry-run"]).exit_code == 0


def test_merge_lora_loads_in_stock_pipeline_and_matches_one_step(lora_run, tmp_path):
    tmp, recipe = lora_run
    from diffusers import QwenImagePipeline

    from apexctl.engine.sampler import one_step
    from apexctl.inference import load_trained
    from apexctl.models.qwen_image import pack_latents

    out = tmp_path / "merged"
    res = runner.invoke(app, ["merge-lora", "--lora", str(tmp / "run"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    pipe = QwenImagePipeline.from_pretrained(str(out))  # stock loading, stock scheduler config as written
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    stock = _stock_one_step(z, pipe=pipe, prompt="any digit")
    ours = load_trained(load_recipe(recipe))
    torch.testing.assert_close(
        stock, pack_latents(one_step(ours, z, ours.encode_prompts(["any digit"]))), atol=1e-5, rtol=1e-5
    )
    assert not any(".lora_" in k for k in load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors")))


def test_merge_lora_parity_failure_leaves_nothing(lora_run, tmp_path):
    tmp, _ = lora_run
    out = tmp_path / "bad"
    res = runner.invoke(app, ["merge-lora", "--lora", str(tmp / "run"), "--out", str(out), "--tolerance", "-1"])
    assert res.exit_code == 1 and "merge parity failed" in res.output and not out.exists()
    res = runner.invoke(app, ["merge-lora", "--lora", str(tmp_path), "--out", str(out)])
    assert res.exit_code == 2 and "neither a run folder" in res.output


def test_comfyui_file_encodes_the_merged_update(lora_run, tmp_path):
    """ComfyUI applies ΔW = (alpha/rank)·B·A per module; that must equal what diffusers' fuse_lora merged."""
    tmp, _ = lora_run
    from apexctl.models import resolve_model_path

    comfy = load_file(str(tmp / "run" / "lora" / "comfyui_lora.safetensors"))
    modules = sorted({k[: -len(".alpha")] for k in comfy if k.endswith(".alpha")})
    assert modules and all(k.startswith("transformer.transformer_blocks.") for k in comfy)
    assert {float(comfy[m + ".alpha"]) for m in modules} == {8.0}
    out = tmp_path / "merged"
    assert runner.invoke(app, ["merge-lora", "--lora", str(tmp / "run"), "--out", str(out)]).exit_code == 0
    merged = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    base = load_file(str(Path(resolve_model_path("tiny:test")) / "transformer" / "diffusion_pytorch_model.safetensors"))
    for m in modules:
        name = m.removeprefix("transformer.") + ".weight"
        a, b = comfy[m + ".lora_A.weight"], comfy[m + ".lora_B.weight"]
        delta = float(comfy[m + ".alpha"]) / a.shape[0] * (b @ a)
        torch.testing.assert_close(merged[name] - base[name], delta, atol=1e-6, rtol=1e-4, msg=name)


def test_export_from_a_checkpoint_equals_the_end_of_run_export(lora_run, tmp_path):
    """The run's lora/ is the EMA adapter at the last step: exporting that checkpoint with EMA weights rebuilds it
    exactly; --weights live gives the checkpoint's own adapter tensors."""
    tmp, _ = lora_run
    run = tmp / "run"
    res = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "ema")])
    assert res.exit_code == 0, res.output
    want = load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))
    got = load_file(str(tmp_path / "ema" / "pytorch_lora_weights.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert (tmp_path / "ema" / "comfyui_lora.safetensors").is_file()  # the recipe's lora_formats

    res = runner.invoke(app, ["export", str(run), "--checkpoint", "step-4", "--weights", "live"])
    assert res.exit_code == 0, res.output
    live = load_file(str(run / "exports" / "step-000004-lora-live" / "pytorch_lora_weights.safetensors"))
    ckpt = load_file(str(run / "checkpoints" / "step-000004" / "model.safetensors"))
    for k, v in live.items():  # transformer.<module>.lora_A.weight ↔ <module>.lora_A.default.weight
        torch.testing.assert_close(v, ckpt[k.removeprefix("transformer.").replace(".weight", ".default.weight")])
    assert any(not torch.equal(live[k], got[k]) for k in live)  # EMA ≠ live after 4 steps at decay 0.5


def test_export_bad_checkpoint_and_run_exit_2(lora_run, tmp_path):
    tmp, _ = lora_run
    res = runner.invoke(app, ["export", str(tmp / "run"), "--checkpoint", "3"])
    assert res.exit_code == 2 and "no complete checkpoint at step 3" in res.output and "complete: 4" in res.output
    res = runner.invoke(app, ["export", str(tmp_path)])
    assert res.exit_code == 2 and "not a run folder" in res.output
    res = runner.invoke(app, ["export", str(tmp / "run"), "--weights", "best"])
    assert res.exit_code == 2 and "expected ema or live" in res.output
