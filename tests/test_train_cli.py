"""End to end through the CLI on a tiny digits model: prepare → distill → resume → sample → eval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from apexctl.cli import app

runner = CliRunner()
TINY = "tiny:digits?num_layers=2&num_attention_heads=2&attention_head_dim=16"


def _recipe(tmp: Path, name: str, **sections) -> Path:
    tree = {
        "model": {"path": TINY},
        "data": {"source": "digits", "cache_dir": str(tmp / "cache"), "cond_dropout": 0.1},
        "method": {"objective": "apex", "reference": "ema", "shift": {"learnable": True}},
        "train": {
            "steps": 6,
            "micro_batch": 8,
            "lr": 1e-3,
            "lr_schedule": "cosine",
            "warmup_steps": 2,
            "ema_decay": 0.9,
            "log_every": 1,
            "checkpoint_every": 100,
            "seed": 3,
        },
        "hardware": {"device": "cpu"},
        "output": {"dir": str(tmp / name)},
    }
    for k, v in sections.items():
        tree[k].update(v)
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


def _ok(args: list[str]) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, monkeypatch_module):
    tmp = tmp_path_factory.mktemp("e2e")
    monkeypatch_module.setenv("APEXCTL_HOME", str(tmp / "home"))
    _ok(["prepare", str(_recipe(tmp, "prep")), "-q"])
    return tmp


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "transformer" / "diffusion_pytorch_model.safetensors"))


def test_prepare_writes_manifest(workdir):
    m = json.loads((workdir / "cache" / "manifest.json").read_text())
    prompts = json.loads((workdir / "cache" / "prompts.json").read_text())
    assert m["num_images"] == 1400 and m["latent_shape"] == [1, 8, 8] and "" in prompts
    assert m["num_pairs"] > m["num_images"]  # several prompts per image (single + multi-mode)


def test_resume_matches_uninterrupted_run(workdir):
    # also builds the "full" run that the sample, eval and signal tests below reuse
    full = _recipe(workdir, "full")
    _ok(["distill", str(full), "-q"])
    part = _recipe(workdir, "part")
    out = _ok(["distill", str(part), "--until", "3", "-q"])
    assert "checkpointed" in out and not (workdir / "part" / "model").exists()
    assert (workdir / "part" / "checkpoints" / "step-000003" / "COMPLETE").is_file()
    _ok(["distill", str(part), "--resume", "auto", "-q"])
    a, b = _weights(workdir / "full"), _weights(workdir / "part")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # the training actually moved the weights, so equality is not vacuous
    base = load_file(
        str(next((workdir / "home" / "tiny").glob("digits-*")) / "transformer" / "diffusion_pytorch_model.safetensors")
    )
    assert any(not torch.equal(a[k], base[k]) for k in a)
    # the logged losses of the resumed half equal the uninterrupted run's
    la = [json.loads(x) for x in (workdir / "full" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (workdir / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lb] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=0, abs=0)
    assert {"loss/fm", "loss/fake", "loss/rect", "grad_norm", "lr", "step_time", "shift/a"} <= set(la[-1])
    assert (workdir / "full" / "recipe.yaml").is_file()


def test_export_holds_ema_weights(workdir):
    """With an EMA, model/ holds the EMA of the trained weights and model-live/ (export: both) the live ones."""
    r = _recipe(workdir, "both", train={"export": "both"})
    _ok(["distill", str(r), "-q"])
    ema, live = (
        _weights(workdir / "both"),
        load_file(str(workdir / "both" / "model-live" / "transformer" / "diffusion_pytorch_model.safetensors")),
    )
    torch.testing.assert_close(ema, _weights(workdir / "full"), rtol=0, atol=0)  # same run: export only differs
    assert any(not torch.equal(ema[k], live[k]) for k in ema)
    # model/ holds exactly the EMA shadow stored in the final checkpoint (same order as named_parameters)
    from apexctl.models import load_backbone

    ck = workdir / "both" / "checkpoints" / "step-000006"
    states = [torch.load(p, weights_only=False) for p in sorted(ck.glob("custom_checkpoint_*.pkl"))]
    shadow = next(s for s in states if isinstance(s, dict) and "shadow" in s)["shadow"]
    names = [n for n, _ in load_backbone(str(workdir / "both" / "model")).transformer.named_parameters()]
    assert len(shadow) == len(names)
    for n, s in zip(names, shadow, strict=True):
        torch.testing.assert_close(ema[n], s.to(ema[n].dtype), rtol=0, atol=0, msg=n)

    # `apexctl export` rebuilds both from the checkpoint alone
    _ok(["export", str(workdir / "both"), "--out", str(workdir / "exp-ema")])
    _ok(["export", str(workdir / "both"), "--weights", "live", "--out", str(workdir / "exp-live")])
    for folder, want in (("exp-ema", ema), ("exp-live", live)):
        got = load_file(str(workdir / folder / "transformer" / "diffusion_pytorch_model.safetensors"))
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=folder)


def test_cache_from_another_model_is_refused(workdir):
    other = _recipe(workdir, "other", model={"path": TINY + "&text_hidden=16"})
    res = runner.invoke(app, ["distill", str(other), "-q"])
    assert res.exit_code == 2 and "model_fingerprint" in res.output, res.output


def test_missing_cache_exits_2(workdir):
    r = _recipe(workdir, "nocache", data={"cache_dir": str(workdir / "nope")})
    res = runner.invoke(app, ["distill", str(r), "-q"])
    assert res.exit_code == 2 and "apexctl prepare" in res.output


def test_sample_writes_pngs_and_is_deterministic(workdir):
    r = str(_recipe(workdir, "full"))
    _ok(
        ["sample", "a handwritten digit seven", "an even digit", "--recipe", r, "-n", "3", "--out", str(workdir / "s1")]
    )
    _ok(
        ["sample", "a handwritten digit seven", "an even digit", "--recipe", r, "-n", "3", "--out", str(workdir / "s2")]
    )
    files = sorted(p.name for p in (workdir / "s1").glob("*.png"))
    assert len(files) == 7 and "grid.png" in files
    for f in files:
        assert (workdir / "s1" / f).read_bytes() == (workdir / "s2" / f).read_bytes()
    # the one-step image equals z − F(z, 1, c) computed directly
    from apexctl.engine.sampler import one_step
    from apexctl.generate import seeded_noise
    from apexctl.images import to_uint8
    from apexctl.models import load_backbone

    bb = load_backbone(str(workdir / "full" / "model"))
    x = one_step(bb, seeded_noise((1, 8, 8), [1]), bb.encode_prompts(["a handwritten digit seven"]))
    import numpy as np
    from PIL import Image

    png = np.asarray(Image.open(next((workdir / "s1").glob("001_*seed1.png"))).convert("RGB"))
    assert np.abs(png.astype(int) - to_uint8(bb.decode_latents(x))[0].astype(int)).max() <= 1


def test_sample_bad_inputs(workdir):
    res = runner.invoke(app, ["sample", "x", "--recipe", str(workdir / "prep.yaml")])
    assert res.exit_code == 2 and "no trained model yet" in res.output
    res = runner.invoke(app, ["sample", "--model", "tiny:digits"])
    assert res.exit_code == 2 and "no prompts" in res.output
    res = runner.invoke(app, ["sample", "x", "--model", str(workdir / "missing")])
    assert res.exit_code == 2


def test_eval_digits_reports_rows(workdir):
    r = str(_recipe(workdir, "full"))
    out = _ok(
        [
            "eval",
            "digits",
            "--recipe",
            r,
            "--per-prompt",
            "4",
            "--teacher-steps",
            "2",
            "--student-steps",
            "1",
            "--student-steps",
            "2",
            "-q",
        ]
    )
    res = json.loads((workdir / "full" / "eval" / "digits" / "results.json").read_text())
    assert set(res["rows"]) == {
        "real data (held-out)",
        "teacher 2 steps",
        "teacher 1 step",
        "student 1 step",
        "student 2 steps",
    }
    row = res["rows"]["student 1 step"]
    assert row["n"] == 15 * 4 and 0.0 <= row["alignment"]["single"] <= 1.0 and row["fd"] > 0
    assert res["rows"]["real data (held-out)"]["alignment"]["single"] > 0.9
    assert "teacher 1 step" in out
    assert len(list((workdir / "full" / "eval" / "digits").glob("grid_*.png"))) == 4


def _patched_objective(monkeypatch, hook):
    """Wrap the real objective; ``hook(step, out)`` may alter the LossOut or send a signal."""
    import apexctl.engine.trainer as trainer

    real = trainer.build_objective
    calls = {"n": 0}

    def build(recipe, reference=None):
        fn = real(recipe, reference)

        def wrapped(*a, **kw):
            calls["n"] += 1
            return hook(calls["n"], fn(*a, **kw))

        return wrapped

    monkeypatch.setattr(trainer, "build_objective", build)


def test_nonfinite_loss_stops_with_step_and_last_checkpoint(workdir, monkeypatch):
    def hook(n, out):
        if n == 4:
            out.loss = out.loss * float("nan")
        return out

    _patched_objective(monkeypatch, hook)
    r = _recipe(workdir, "nan", train={"checkpoint_every": 2})
    res = runner.invoke(app, ["distill", str(r), "-q"])
    assert res.exit_code == 1, res.output
    line = res.output.strip().splitlines()[-1]
    assert "non-finite loss at step 4" in line and "step-000002" in line and "fake=" in line


def test_sigint_checkpoints_and_resume_finishes(workdir, monkeypatch):
    import os
    import signal

    def hook(n, out):
        if n == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step: the step finishes, then a checkpoint
        return out

    _patched_objective(monkeypatch, hook)
    r = _recipe(workdir, "sig")
    out = _ok(["distill", str(r), "-q"])
    assert (workdir / "sig" / "checkpoints" / "step-000002" / "COMPLETE").is_file()
    assert not (workdir / "sig" / "model").exists() and "checkpointed" in out
    monkeypatch.undo()
    _ok(["distill", str(r), "--resume", "auto", "-q"])
    a, b = _weights(workdir / "full"), _weights(workdir / "sig")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_process_count_must_match_the_launch(workdir):
    r = _recipe(workdir, "procs", hardware={"device": "cpu", "processes": 4})
    res = runner.invoke(app, ["distill", str(r), "-q"])
    assert res.exit_code == 2 and "hardware.processes = 4 but this run has 1 process" in res.output


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_gradient_checkpointing_and_bf16_autocast(workdir):
    """Checkpointing recomputes, it must not change the math; bf16 autocast runs and stays close to fp32."""
    gc = _recipe(workdir, "gc", hardware={"device": "cpu", "gradient_checkpointing": True})
    _ok(["distill", str(gc), "-q"])
    assert _losses(workdir / "gc") == pytest.approx(_losses(workdir / "full"), rel=1e-5)
    bf = _recipe(workdir, "bf16", hardware={"device": "cpu", "precision": "bf16"})
    _ok(["distill", str(bf), "-q"])
    lb, lf = _losses(workdir / "bf16"), _losses(workdir / "full")
    assert lb != lf and lb == pytest.approx(lf, rel=0.1)
    assert (
        load_file(str(workdir / "bf16" / "model" / "transformer" / "diffusion_pytorch_model.safetensors"))[
            "img_in.weight"
        ].dtype
        == torch.float32
    )


@pytest.mark.parametrize(
    ("spec", "family"), [("tiny:sd3", "sd3"), ("tiny:sana", "sana"), ("tiny:flux", "flux"), ("tiny:z_image", "z_image")]
)
def test_other_families_load_by_detection_and_distill(tmp_path, monkeypatch, spec, family):
    """Each family's tiny build is found from its folder alone and trains a few APEX steps from the cache."""
    monkeypatch.setenv("APEXCTL_HOME", str(tmp_path / "home"))
    from apexctl.models import load_backbone, resolve_model_path

    bb = load_backbone(resolve_model_path(spec))
    assert bb.family == family
    bb.train()  # the denoiser trains; frozen encoders and the codec keep eval mode (no dropout)
    assert bb.transformer.training and bb._frozen() and not any(m.training for m in bb._frozen())
    r = _recipe(
        tmp_path,
        family,
        model={"path": spec},
        data={"cache_dir": str(tmp_path / "cache"), "resolution": 32},
        train={"steps": 2, "micro_batch": 2},
    )
    _ok(["prepare", str(r), "-q"])
    _ok(["distill", str(r), "-q"])
    rows = [json.loads(x) for x in (tmp_path / family / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2] and all(np.isfinite(x["loss"]) for x in rows)
    assert (tmp_path / family / "model" / "transformer").is_dir()

    # one apex LoRA step on the same cache changes only the adapter (and the learnable shift)
    lr = _recipe(
        tmp_path,
        f"{family}-lora",
        model={"path": spec, "lora": {"rank": 2, "alpha": 2.0}},
        data={"cache_dir": str(tmp_path / "cache"), "resolution": 32},
        method={"reference": "base"},
        train={"steps": 1, "micro_batch": 2, "ema_decay": None, "warmup_steps": 0, "lr_schedule": "constant"},
    )
    _ok(["distill", str(lr), "-q"])
    ck = tmp_path / f"{family}-lora" / "checkpoints" / "step-000001"
    trained = load_file(str(ck / "model.safetensors"))
    base = load_file(str(Path(resolve_model_path(spec)) / "transformer" / "diffusion_pytorch_model.safetensors"))
    lora_b = [k for k in trained if "lora_B" in k]
    moved = [k for k in lora_b if float(trained[k].abs().max()) > 0]
    # B starts at zero and moves wherever a gradient reaches it (not e.g. SD3's last-block text query, whose
    # output the model discards)
    assert lora_b and len(moved) >= 0.8 * len(lora_b), sorted(set(lora_b) - set(moved))
    for k, v in trained.items():
        if "lora_" not in k:
            torch.testing.assert_close(v, base[k.replace(".base_layer", "")], rtol=0, atol=0, msg=k)
    shift = next(
        st for st in (torch.load(f, weights_only=False) for f in sorted(ck.glob("custom_checkpoint_*.pkl")))
        if isinstance(st, dict) and set(st) == {"a", "b"}
    )  # fmt: skip
    assert float(shift["a"]) != -1.0 or float(shift["b"]) != 0.0
