"""End to end through the CLI on a tiny digits model: prepare → distill → resume → sample → eval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from data_util import ok, write_recipe
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
    return write_recipe(tmp, name, tree, sections)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, monkeypatch_module):
    tmp = tmp_path_factory.mktemp("e2e")
    monkeypatch_module.setenv("APEXCTL_HOME", str(tmp / "home"))
    ok(["prepare", str(_recipe(tmp, "prep")), "-q"])
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
    ok(["distill", str(full), "-q"])
    part = _recipe(workdir, "part")
    out = ok(["distill", str(part), "--until", "3", "-q"])
    assert "checkpointed" in out and not (workdir / "part" / "model").exists()
    assert (workdir / "part" / "checkpoints" / "step-000003" / "COMPLETE").is_file()
    ok(["distill", str(part), "--resume", "auto", "-q"])
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
    ok(["distill", str(r), "-q"])
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
    ok(["export", str(workdir / "both"), "--out", str(workdir / "exp-ema")])
    ok(["export", str(workdir / "both"), "--weights", "live", "--out", str(workdir / "exp-live")])
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
    ok(["sample", "a handwritten digit seven", "an even digit", "--recipe", r, "-n", "3", "--out", str(workdir / "s1")])
    ok(["sample", "a handwritten digit seven", "an even digit", "--recipe", r, "-n", "3", "--out", str(workdir / "s2")])
    files = sorted(p.name for p in (workdir / "s1").glob("*.png"))
    assert len(files) == 7 and "grid.png" in files
    for f in files:
        assert (workdir / "s1" / f).read_bytes() == (workdir / "s2" / f).read_bytes()
    # the one-step image equals z − F(z, 1, c) computed directly
    from apexctl.engine.sampler import one_step
    from apexctl.images import to_uint8
    from apexctl.inference import seeded_noise
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
    out = ok(
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
    import apexctl.training.session as trainer

    real = trainer.build_objective
    calls = {"n": 0}

    def build(recipe, *args, **kwargs):
        fn = real(recipe, *args, **kwargs)

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
    line = [x for x in res.output.strip().splitlines() if not x.startswith("warning:")][-1]
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
    out = ok(["distill", str(r), "-q"])
    assert (workdir / "sig" / "checkpoints" / "step-000002" / "COMPLETE").is_file()
    assert not (workdir / "sig" / "model").exists() and "checkpointed" in out
    monkeypatch.undo()
    ok(["distill", str(r), "--resume", "auto", "-q"])
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
    ok(["distill", str(gc), "-q"])
    assert _losses(workdir / "gc") == pytest.approx(_losses(workdir / "full"), rel=1e-5)
    bf = _recipe(workdir, "bf16", hardware={"device": "cpu", "precision": "bf16"})
    ok(["distill", str(bf), "-q"])
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
    ok(["prepare", str(r), "-q"])
    ok(["distill", str(r), "-q"])
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
    ok(["distill", str(lr), "-q"])
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


# ---- training at scale: locks, non-finite skips, kill/resume, DDP (issue 4) -----------------------------------
def _env(workdir: Path) -> dict:
    import os

    return {
        **os.environ,
        "APEXCTL_HOME": str(workdir / "home"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_run_folder_lock(workdir):
    """A live writer makes a second run exit 2 with one line; a lock left by a dead pid is taken over with a warning."""
    import os
    import socket

    from apexctl.training.lock import RunLock

    r = _recipe(workdir, "locked", train={"steps": 2})
    with RunLock(workdir / "locked"):
        res = runner.invoke(app, ["distill", str(r), "-q"])
        launched = runner.invoke(app, ["distill", str(r), "--launch", "2", "-q"])  # refused before any launch
    assert launched.exit_code == 2 and "is in use by another run" in launched.output, launched.output
    assert res.exit_code == 2, res.output
    line = res.output.strip().splitlines()[-1]
    assert "is in use by another run" in line and f"pid {os.getpid()}" in line, res.output
    assert not (workdir / "locked" / ".lock").exists()  # released on exit
    stale = {"pid": _dead_pid(), "host": socket.gethostname(), "started": 0}
    (workdir / "locked" / ".lock").write_text(json.dumps(stale))
    out = ok(["distill", str(r), "-q"])
    assert f"taking over a stale lock left by pid {stale['pid']}" in out and "no longer running" in out
    assert (workdir / "locked" / "model").is_dir() and not (workdir / "locked" / ".lock").exists()
    # another host's lock is never guessed about
    (workdir / "locked" / ".lock").write_text(json.dumps({**stale, "host": "elsewhere"}))
    res = runner.invoke(app, ["distill", str(r), "-q"])
    assert res.exit_code == 2 and "another host" in res.output and ".lock" in res.output


def test_skip_nonfinite_counts_and_stops_after_a_streak(workdir, monkeypatch):
    def hook(n, out):
        if n == 3 or n >= 5:  # one isolated NaN (skipped), then NaN for good
            out.loss = out.loss * float("nan")
        return out

    _patched_objective(monkeypatch, hook)
    train = {"steps": 10, "skip_nonfinite": True, "max_consecutive_skips": 2, "checkpoint_every": 2}
    r = _recipe(workdir, "skip", train=train)
    res = runner.invoke(app, ["distill", str(r), "-q"])
    assert res.exit_code == 1, res.output
    line = [x for x in res.output.strip().splitlines() if not x.startswith("warning:")][-1]
    assert "non-finite loss/gradients in 3 consecutive steps" in line and "at step 7" in line, line
    assert "step-000006" in line  # steps 5 and 6 were skipped (and checkpointed), 7 is the third in a row
    rows = [json.loads(x) for x in (workdir / "skip" / "metrics.jsonl").read_text().splitlines()]
    by = {x["step"]: x for x in rows}
    assert by[2]["skipped"] == 0 and by[3]["skipped"] == 1 and by[3]["grad_norm"] is None
    assert by[4]["skipped_in_a_row"] == 0 and by[6]["skipped"] == 3 and by[6]["skipped_in_a_row"] == 2
    # a skipped step leaves the weights alone: step-4's checkpoint != step-2's, step-6's == step-4's weights
    ck = workdir / "skip" / "checkpoints"
    w4, w6 = (load_file(str(ck / f"step-00000{s}" / "model.safetensors")) for s in (4, 6))
    assert all(torch.equal(w4[k], w6[k]) for k in w4)


def _wait_for(predicate, proc, timeout: float = 120.0) -> None:
    import time

    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.1)


def test_sigterm_checkpoints_and_partial_checkpoints_are_ignored(workdir):
    """SIGTERM to a real process: it finishes the step, checkpoints, exits 0 with a message. A half-written
    checkpoint (a killed save: step-N.tmp, or a folder without COMPLETE) and a stale lock do not stop
    --resume auto, which continues from the newest complete one to exactly what an uninterrupted run reaches."""
    import signal
    import subprocess
    import sys

    r = _recipe(workdir, "term", train={"steps": 400, "checkpoint_every": 1000, "keep_last": 10})
    proc = subprocess.Popen(
        [sys.executable, "-m", "apexctl", "distill", str(r), "-q"],
        env=_env(workdir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = workdir / "term" / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    k = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert f"stopped at step {k} on SIGTERM" in out and "--resume auto" in out
    ck = workdir / "term" / "checkpoints"
    assert [p.name for p in ck.iterdir()] == [f"step-{k:06d}"] and (ck / f"step-{k:06d}" / "COMPLETE").is_file()
    assert not (workdir / "term" / ".lock").exists()
    # what a SIGKILL during a save leaves behind, and the lock of the killed process
    (ck / f"step-{k + 1:06d}.tmp").mkdir()
    (ck / f"step-{k + 1:06d}.tmp" / "model.safetensors").write_bytes(b"partial")
    (ck / f"step-{k + 2:06d}").mkdir()
    (workdir / "term" / ".lock").write_text(
        json.dumps({"pid": _dead_pid(), "host": __import__("socket").gethostname()})
    )
    out = ok(["distill", str(r), "--resume", "auto", "--until", str(k + 3), "-q"])
    assert f"resumed from {ck / f'step-{k:06d}'} at step {k}" in out and "stale lock" in out
    # the uninterrupted reference: the same recipe run straight to k + 3, checkpointing every step
    ref = _recipe(workdir, "term-ref", train={"steps": 400, "checkpoint_every": 1, "keep_last": 100})
    ok(["distill", str(ref), "--until", str(k + 3), "-q"])
    for step in (k, k + 3):
        a = load_file(str(ck / f"step-{step:06d}" / "model.safetensors"))
        b = load_file(str(workdir / "term-ref" / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), step
    rows = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert rows == list(range(1, k + 4))  # no duplicated or missing rows across the stop


def _distill_subprocess(workdir: Path, *args: str) -> tuple[str, str]:
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "apexctl", "distill", *args, "-q"],
        env=_env(workdir),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout, res.stderr


def _sampler_state(ck: Path) -> dict:
    states = [torch.load(p, weights_only=False) for p in sorted(ck.glob("custom_checkpoint_*.pkl"))]
    return next(s for s in states if isinstance(s, dict) and {"epoch", "pos"} <= set(s))


def test_ddp_two_processes_resume_and_world_size_change(workdir):
    """`--launch 2` (DDP over gloo on CPU): both ranks hold identical parameters at every checkpoint; resuming a
    2-process checkpoint on 2 processes gives exactly the uninterrupted 2-process run; resuming it on 1 process
    with the same global batch continues at the same data position."""
    train = {"steps": 6, "micro_batch": 4, "checkpoint_every": 3, "keep_last": 5}
    x = _recipe(workdir, "ddp", train=train)
    out, err = _distill_subprocess(workdir, str(x), "--launch", "2")
    assert "launching 2 processes" in err and out.count("saved to") == 1, out  # printed by rank 0 only
    ck = workdir / "ddp" / "checkpoints"
    for step in (3, 6):
        info = json.loads((ck / f"step-{step:06d}" / "COMPLETE").read_text())
        assert info["world_size"] == 2 and info["global_batch"] == 8
        assert len(info["param_checksums"]) == 2 and len(set(info["param_checksums"])) == 1
        assert {p.name for p in (ck / f"step-{step:06d}").glob("random_states_*")} == {
            "random_states_0.pkl",
            "random_states_1.pkl",
        }
    rows = [json.loads(r) for r in (workdir / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"peak_mem_mb", "peak_mem_mb/rank0", "peak_mem_mb/rank1", "samples_per_s", "loss/fake"} <= set(rows[-1])
    # exact resume on 2 processes, into another run folder
    y = _recipe(workdir, "ddp-resumed", train=train)
    _distill_subprocess(workdir, str(y), "--launch", "2", "--resume", str(ck / "step-000003"))
    a, b = _weights(workdir / "ddp"), _weights(workdir / "ddp-resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows_y = [json.loads(r) for r in (workdir / "ddp-resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows_y] == [r["loss"] for r in rows[3:]]
    # 2 → 1 process with the same global batch (1 × 8): the data position is world-size independent
    z = _recipe(workdir, "ddp-to-1", train={**train, "micro_batch": 8})
    out = ok(["distill", str(z), "--resume", str(ck / "step-000003")])
    assert "resumed from" in out and "at step 3" in out
    zc = workdir / "ddp-to-1" / "checkpoints"
    assert _sampler_state(zc / "step-000006") == _sampler_state(ck / "step-000006")
    assert _sampler_state(ck / "step-000006")["pos"] == 6 * 8
    assert (workdir / "ddp-to-1" / "model").is_dir()


FSDP_TRAIN = {
    "steps": 4,
    "micro_batch": 2,
    "grad_accum": 2,
    "ema_decay": None,
    "max_grad_norm": 1.0,
    "checkpoint_every": 2,
    "keep_last": 5,
}


def _fsdp_recipe(workdir: Path, name: str, strategy: str = "fsdp", **sections) -> Path:
    return _recipe(
        workdir,
        name,
        method={"reference": "self", **sections.pop("method", {})},
        train={**FSDP_TRAIN, **sections.pop("train", {})},
        hardware={"device": "cpu", "strategy": strategy},
        **sections,
    )


def test_fsdp_two_processes_match_ddp_and_resume_exactly(workdir):
    """`hardware.strategy: fsdp` (torch FSDP2 over gloo) on 2 processes: the exported weights are those of a DDP
    run of the same recipe (same data and noise per rank; up to float summation order), and --until + --resume
    auto reaches exactly the uninterrupted FSDP run. Checkpoints keep the DDP layout (model.safetensors)."""
    _distill_subprocess(workdir, str(_fsdp_recipe(workdir, "fsdp-ddp", strategy="ddp")), "--launch", "2")
    out, _ = _distill_subprocess(workdir, str(_fsdp_recipe(workdir, "fsdp")), "--launch", "2")
    assert out.count("saved to") == 1, out
    fsdp, ddp = _weights(workdir / "fsdp"), _weights(workdir / "fsdp-ddp")
    assert fsdp.keys() == ddp.keys()
    for k in fsdp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-4, atol=1e-5, msg=k)
    base = load_file(
        str(next((workdir / "home" / "tiny").glob("digits-*")) / "transformer" / "diffusion_pytorch_model.safetensors")
    )
    assert any(not torch.equal(fsdp[k], base[k]) for k in fsdp)  # training moved the weights
    assert _losses(workdir / "fsdp") == pytest.approx(_losses(workdir / "fsdp-ddp"), rel=1e-4)
    ck = workdir / "fsdp" / "checkpoints" / "step-000004"
    info = json.loads((ck / "COMPLETE").read_text())
    assert info["world_size"] == 2 and "param_checksums" not in info
    mid = load_file(str(ck / "model.safetensors"))
    assert all(torch.equal(mid[k], fsdp[k]) for k in fsdp)
    # interrupted at step 2, resumed with --resume auto: exactly the uninterrupted run
    part = _fsdp_recipe(workdir, "fsdp-part")
    out, _ = _distill_subprocess(workdir, str(part), "--launch", "2", "--until", "2")
    assert not (workdir / "fsdp-part" / "model").exists()
    out, _ = _distill_subprocess(workdir, str(part), "--launch", "2", "--resume", "auto")
    assert "resumed from" in out and "at step 2" in out, out
    resumed = _weights(workdir / "fsdp-part")
    assert all(torch.equal(resumed[k], fsdp[k]) for k in fsdp)
    assert _losses(workdir / "fsdp-part") == _losses(workdir / "fsdp")


def test_fsdp_lora_exports_an_adapter(workdir):
    """LoRA under FSDP (frozen base and adapter in the same sharded blocks): RUN/lora loads onto the base model,
    `apexctl export` rebuilds the same adapter from the FSDP checkpoint, and sample grids are drawn."""
    from apexctl.models import load_backbone

    r = _fsdp_recipe(
        workdir,
        "fsdp-lora",
        model={"lora": {"rank": 2, "alpha": 2.0}},
        method={"reference": "base"},  # forwards with the adapters off, through the sharded module
        train={"sample_every": 4, "sample_images": 2},  # the grid's forward is a collective under FSDP
    )
    _distill_subprocess(workdir, str(r), "--launch", "2")
    assert (workdir / "fsdp-lora" / "samples" / "step-000004.png").is_file()
    lora = workdir / "fsdp-lora" / "lora"
    files = sorted(lora.glob("*.safetensors"))
    assert files, list(lora.iterdir())
    adapter = load_file(str(files[0]))
    assert any("lora_B" in k and float(v.abs().max()) > 0 for k, v in adapter.items())  # B moved from zero
    bb = load_backbone(TINY, load_text_encoder=False, load_codec=False)
    bb.load_lora(lora)
    assert any("lora_B" in n for n, _ in bb.transformer.named_parameters())
    ok(["export", str(workdir / "fsdp-lora"), "--weights", "live", "--out", str(workdir / "fsdp-lora-exp")])
    again = load_file(str(workdir / "fsdp-lora-exp" / files[0].name))
    assert again.keys() == adapter.keys() and all(torch.equal(again[k], adapter[k]) for k in adapter)


def test_sample_grids_do_not_change_training(workdir):
    """train.sample_every: fixed-seed 1-step grids at RUN/samples/step-N.png, drawn without touching the training
    RNG (the losses equal the run without grids), identical for identical weights."""
    from PIL import Image

    prompts = ["a handwritten digit seven", "an even digit"]
    r = _recipe(workdir, "grids", train={"sample_every": 3, "sample_prompts": prompts, "sample_images": 3})
    ok(["distill", str(r), "-q"])
    assert _losses(workdir / "grids") == _losses(workdir / "full")
    files = sorted(p.name for p in (workdir / "grids" / "samples").glob("*.png"))
    assert files == ["step-000003.png", "step-000006.png"]
    im = Image.open(workdir / "grids" / "samples" / "step-000006.png")
    assert im.width > 3 * 8 and im.height > 2 * 8
    bad = _recipe(workdir, "grids-bad", train={"sample_every": 3, "sample_prompts": ["not in the cache"]})
    res = runner.invoke(app, ["distill", str(bad), "-q"])
    assert res.exit_code == 2 and "'not in the cache' is not in the cache" in res.output, res.output


def test_optional_packages_and_strategy_errors_exit_2(workdir):
    import importlib.util

    cases = []
    if importlib.util.find_spec("bitsandbytes") is None:
        cases.append(({"train": {"optimizer": "adamw8bit"}}, "needs bitsandbytes"))
    if importlib.util.find_spec("tensorboard") is None:
        cases.append(({"train": {"log_with": "tensorboard"}}, "needs the tensorboard package"))
    no_ema = {"method": {"reference": "self"}, "train": {"ema_decay": None}}
    cases.append(({"hardware": {"device": "cpu", "strategy": "fsdp"}, **no_ema}, "launch 2 or more"))
    cases.append(({"hardware": {"device": "cpu", "strategy": "fsdp"}}, "does not support an EMA"))
    for sections, message in cases:
        r = _recipe(workdir, "optional", **sections)
        res = runner.invoke(app, ["distill", str(r), "-q"])
        assert res.exit_code == 2 and message in res.output, res.output


def test_dry_run_counts_lora_parameters_on_the_meta_device(workdir):
    from apexctl.lora import add_lora
    from apexctl.models import load_backbone

    r = _recipe(workdir, "dry", model={"lora": {"rank": 4, "alpha": 4}})
    out = ok(["distill", str(r), "--dry-run"])
    line = next(x for x in out.splitlines() if x.startswith("params"))
    bb = load_backbone(TINY)
    total_base = sum(p.numel() for p in bb.transformer.parameters())
    add_lora(bb.transformer, rank=4, alpha=4, targets=bb.lora_targets, dropout=0.0, init="default")
    trainable = sum(p.numel() for p in bb.transformer.parameters() if p.requires_grad)
    total = sum(p.numel() for p in bb.transformer.parameters())
    assert total > total_base and total - total_base == trainable
    assert f"{total:,} denoiser parameters (base {total_base:,} + adapter {trainable:,}), " in line
    assert f"{trainable:,} trainable (LoRA r=4" in line
    assert "memory     per GPU ≈" in out and "adamw states" in out
