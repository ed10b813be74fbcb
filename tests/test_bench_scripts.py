"""The bench scripts run (on CPU-sized settings) so they cannot rot between the days a GPU is lent."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_gpu_smoke_tiny_runs_the_recipe_objectives(tmp_path, monkeypatch):
    import importlib.util

    out = tmp_path / "smoke.json"
    schemes = [q for q, lib in (("int8", "torchao"), ("nf4", "bitsandbytes")) if importlib.util.find_spec(lib)]
    argv = ["gpu_smoke.py", "--tiny", "--steps", "2", "--warmup", "1", "--resolution", "64", "--out", str(out),
            "--quantize", ",".join(schemes)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(BENCH / "gpu_smoke.py"), run_name="__main__")
    summary = json.loads(out.read_text())
    assert set(summary["results"]) == {"flow_matching", "apex"}
    assert 0 < summary["trainable"] < summary["parameters"]
    assert set(summary["quantized"]) == set(schemes)
    for q in summary["quantized"].values():  # the apex step on each quantised base: same adapter, smaller weights
        assert set(q["results"]) == {"apex"} and q["results"]["apex"]["forwards_per_step"] == 3
        assert q["trainable"] == summary["trainable"] and q["weight_gib"] < summary["weight_gib"]
        assert q["vs_bf16"]["step_time"] > 0
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


def test_sample_speed_quick_writes_tables_with_measured_speedups(tmp_path, monkeypatch):
    # median of 3 (not --quick's 1) so one scheduling hiccup on a busy machine cannot invert a ratio
    argv = ["sample_speed.py", "--quick", "--reps", "3", "--threads", "1", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(BENCH / "sample_speed.py"), run_name="__main__")
    summary = json.loads((tmp_path / "sample_speed.json").read_text())
    md = (tmp_path / "sample_speed.md").read_text()
    assert summary["meta"]["quick"] and summary["meta"]["reps"] == 3 and summary["meta"]["threads"] == 1
    assert set(summary["configs"]) == {"digits", "large"}
    for name, res in summary["configs"].items():
        assert f"## {name}:" in md
        rows = {(r["name"], r["mode"]): r for r in res["rows"]}
        assert {m for _, m in rows} == {"end-to-end", "transformer"}
        teacher = [r for r in res["rows"] if r["kind"] == "teacher"]
        students = {r["steps"]: r for r in res["rows"] if r["kind"] == "student" and r["mode"] == "end-to-end"}
        assert sorted(students) == [1, 2, 4] and {r["nfe"] for r in students.values()} == {1, 2, 4}
        assert res["teacher"]["steps"] >= 2 and res["teacher"]["guidance"] > 1
        for t in teacher:
            assert t["nfe"] == 2 * t["steps"]
            for b in ("batch1", "batch8"):
                assert t[b]["speedup_vs_teacher"] == pytest.approx(1.0)
        # end-to-end gives pixels, transformer-only gives latents
        assert res["output_shape"]["end-to-end"][-1] == res["image_size"]
        assert res["output_shape"]["transformer"] == res["latent_shape"]
        for mode in ("end-to-end", "transformer"):
            one = rows[("student 1-step", mode)]
            t = next(r for r in teacher if r["mode"] == mode)
            for b in ("batch1", "batch8"):
                ms, t_ms = one[b]["ms_per_image"], t[b]["ms_per_image"]
                assert 0 < ms < t_ms  # 1 forward vs 2·N forwards' worth of rows
                assert one[b]["speedup_vs_teacher"] == pytest.approx(t_ms / ms) and one[b]["speedup_vs_teacher"] > 1
                assert one[b]["images_per_s"] == pytest.approx(1e3 / ms)
                assert one[b]["ms_min"] <= ms <= one[b]["ms_max"]
                # the markdown carries the same number
                assert f"{one[b]['speedup_vs_teacher']:.2f}×" in md


def test_gpu_check_driver_runs_a_stage_and_writes_valid_recipes(tmp_path, monkeypatch):
    """bench/gpu_check.py on CPU: the one stage that runs anywhere (few-step sampling of a tiny model) goes through
    the driver into the JSON; the shortened bf16 digits recipes it writes are valid recipes."""
    from apexctl.recipe import load_recipe

    out = tmp_path / "gpu_check.json"
    argv = ["gpu_check.py", "--only", "sample_few", "--out", str(out), "--work", str(tmp_path / "work")]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(BENCH / "gpu_check.py"), run_name="__main__")
    report = json.loads(out.read_text())
    (stage,) = report["stages"]
    assert stage["name"] == "sample_few" and stage["ok"], stage
    assert stage["numbers"]["steps"] == 4 and stage["numbers"]["method"] == "few"
    assert report["device"]["available"] is False  # this CPU machine
    gc = runpy.run_path(str(BENCH / "gpu_check.py"))
    work = tmp_path / "recipes"
    work.mkdir()
    paths = [work / f"{n}.yaml" for n in ("teacher", "student", "pairs")]
    gc["_digits_recipes"](work, *paths, 100, 50)
    teacher, student, pairs = (load_recipe(p) for p in paths)
    assert (teacher.train.steps, student.train.steps) == (100, 50)
    assert teacher.hardware.precision == student.hardware.precision == "bf16"
    assert student.model.path == pairs.model.path == str(work / "teacher" / "model")
    assert {s["name"] for s in gc["stages"](work, 1, 1)} == {
        "smoke",
        "sample_few",
        "digits_bf16",
        "prepare_cuda",
        "memory",
    }
    assert sum(s["limit"] for s in gc["stages"](work, 1, 1)) <= 600  # the 10-minute budget


def test_quantize_quality_measures_every_installed_scheme_against_the_unquantized_base(tmp_path, monkeypatch):
    """bench/quantize_quality.py on CPU-sized settings (a 20-step teacher, 2 images per prompt, 2 student steps):
    every scheme with a library gets a teacher row and a student row; the unquantised rows are the reference (0
    apart from themselves), a quantised teacher is not bit-identical to it; the table has every row."""
    from apexctl.models.quantize import PACKAGES, _installed

    out = tmp_path / "out"
    argv = ["quantize_quality.py", "--teacher", str(tmp_path / "none"), "--work", str(tmp_path / "work"),
            "--out", str(out), "--per-prompt", "2", "--student-steps", "2", "--teacher-steps", "20"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(BENCH / "quantize_quality.py"), run_name="__main__")
    res = json.loads((out / "quantize_quality.json").read_text())
    schemes = ["none", *(s for s in ("int8", "fp8", "nf4") if _installed(PACKAGES[s]))]
    assert res["schemes"] == schemes and list(res["teacher"]) == list(res["student"]) == schemes
    assert res["teacher"]["none"]["rel_l2"] == 0 and res["student"]["none"]["deployed_vs_unquantized_run"] == 0
    assert res["student"]["none"]["own_vs_deployed"] < 1e-6  # the unquantised run's own base is the fp32 base
    for s in schemes[1:]:
        assert 0 < res["teacher"][s]["rel_l2"] < 0.5 and res["student"][s]["own_vs_deployed"] > 0
    md = (out / "quantize_quality.md").read_text()
    assert all(f"| {s} |" in md for s in schemes) and res["teacher"]["none"]["fd"] > 0
