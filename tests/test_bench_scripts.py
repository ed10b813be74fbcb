"""The bench scripts run (on CPU-sized settings) so they cannot rot between the days a GPU is lent."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_gpu_smoke_tiny_runs_the_recipe_objectives(tmp_path, monkeypatch):
    out = tmp_path / "smoke.json"
    argv = ["gpu_smoke.py", "--tiny", "--steps", "2", "--warmup", "1", "--resolution", "64", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(BENCH / "gpu_smoke.py"), run_name="__main__")
    summary = json.loads(out.read_text())
    assert set(summary["results"]) == {"flow_matching", "apex"}
    assert 0 < summary["trainable"] < summary["parameters"]
    for r in summary["results"].values():
        assert r["s_per_step"] > 0 and r["samples_per_s"] == pytest.approx(4 / r["s_per_step"])
    # flow matching: one transformer forward per step; apex with the recipe's guided reference: generator + FM
    # rows together, the shifted critic rows, and the reference on [c; ∅] rows together = three
    assert summary["results"]["flow_matching"]["forwards_per_step"] == 1
    assert summary["results"]["apex"]["forwards_per_step"] == 3
    assert summary["ratios"]["step_time"] > 0


def test_published_qwen_config_gives_the_papers_lora_sizes():
    """The bundled config is the real architecture: 20.43 B parameters; the recipes' LoRAs are the paper's 0.4 B
    (r=64) and 0.2 B (r=32) trainable parameters (Table 1), counted on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel
    from peft import LoraConfig

    from apexctl.recipe import load_recipe

    gs = runpy.run_path(str(BENCH / "gpu_smoke.py"))
    cfg = {k: v for k, v in gs["published_config"]()["transformer"].items() if not k.startswith("_")}
    counts = {}
    for name in ("qwen_lora.yaml", "qwen_lora_r32.yaml"):
        lora = load_recipe(BENCH.parent / "recipes" / name).model.lora
        with init_empty_weights():
            m = QwenImageTransformer2DModel(**cfg)
            total = sum(p.numel() for p in m.parameters())
            m.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=lora.targets))
        counts[name] = sum(p.numel() for n, p in m.named_parameters() if "lora_" in n)
    assert total == 20_430_401_088
    assert counts["qwen_lora.yaml"] == 425_279_488 and counts["qwen_lora_r32.yaml"] == 212_639_744
