"""End to end through the CLI on a tiny digits model: prepare → distill → resume → sample → eval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from data_util import EMA_RUN, digits_recipe, ok
from safetensors.torch import load_file
from typer.testing import CliRunner

from apexctl.cli import app

runner = CliRunner()
TINY = "tiny:digits?num_layers=2&num_attention_heads=2&attention_head_dim=16"


def _recipe(tmp: Path, name: str, **sections) -> Path:
    train = {"micro_batch": 8, "seed": 3} | sections.pop("train", {})
    return digits_recipe(tmp, name, model_path=TINY, preset=EMA_RUN, train=train, **sections)


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


@pytest.fixture(scope="module")
def full(workdir) -> Path:
    """The uninterrupted 6-step run of the default recipe, which the resume, export, sample, eval, signal,
    checkpointing and grid tests compare against (built here, so each of them also passes alone)."""
    ok(["distill", str(_recipe(workdir, "full")), "-q"])
    return workdir / "full"


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "transformer" / "diffusion_pytorch_model.safetensors"))


def test_prepare_writes_manifest(workdir):
    m = json.loads((workdir / "cache" / "manifest.json").read_text())
    prompts = json.loads((workdir / "cache" / "prompts.json").read_text())
    assert m["num_images"] == 1400 and m["latent_shape"] == [1, 8, 8] and "" in prompts
    assert m["num_pairs"] > m["num_images"]  # several prompts per image (single + multi-mode)


def test_resume_matches_uninterrupted_run(workdir, full):
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


def test_export_holds_ema_weights(workdir, full):
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


def test_sample_writes_pngs_and_is_deterministic(workdir, full):
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


def _one_step_images(model: Path, texts: list[str], seeds: list[int]) -> torch.Tensor:
    """The one-step images x = z − F(z, 1, c) of ``model``, computed directly (not through apexctl.inference)."""
    from apexctl.engine.sampler import one_step
    from apexctl.inference import seeded_noise
    from apexctl.models import load_backbone

    bb = load_backbone(str(model))
    with torch.no_grad():
        x = one_step(bb, seeded_noise((1, 8, 8), seeds), bb.encode_prompts(texts))
        return bb.decode_latents(x).float()


def test_eval_digits_reports_rows(workdir, full):
    """Each row is the judge's score of that model's images: the student row equals the score of the student's
    one-step images recomputed here, and differs from the teacher's one-step row (the same sampler on the
    starting weights) and from the student's own 2-step row."""
    from apexctl.data.digits import eval_prompts, load_split
    from apexctl.eval.toy.digits import DigitsJudge

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
    res = json.loads((full / "eval" / "digits" / "results.json").read_text())
    rows = res["rows"]
    assert set(rows) == {
        "real data (held-out)",
        "teacher 2 steps",
        "teacher 1 step",
        "student 1 step",
        "student 2 steps",
    }
    assert rows["student 1 step"]["n"] == 15 * 4 and rows["real data (held-out)"]["alignment"]["single"] > 0.9
    assert "teacher 1 step" in out
    assert len(list((full / "eval" / "digits").glob("grid_*.png"))) == 4

    # the student row, recomputed: the same prompts and seeds (image k of a prompt: seed k), the student's weights
    prompts = eval_prompts()
    texts = [p.prompt for p in prompts for _ in range(4)]
    seeds = [k for _ in prompts for k in range(4)]
    judge = DigitsJudge.fit(load_split(), seed=0)
    want = judge.score(
        _one_step_images(full / "model", texts, seeds),
        [p.allowed for p in prompts for _ in range(4)],
        [p.kind for p in prompts for _ in range(4)],
    )
    got = rows["student 1 step"]
    for kind in ("single", "multi"):  # at most one image judged differently (last-bit differences of the batch)
        assert got["alignment"][kind] == pytest.approx(want["alignment"][kind], abs=1.01 / 40), kind
    assert got["fd"] == pytest.approx(want["fd"], rel=1e-3) and got["diversity"] == pytest.approx(
        want["diversity"], rel=1e-3
    )
    # the rows are not one model's images scored twice: 6 trained steps (measured: 1.8 %) and a second sampling
    # step (10 %) move the FD by far more than the recomputation's tolerance; the tiny model is far from real digits
    for other in ("teacher 1 step", "student 2 steps"):
        assert abs(rows[other]["fd"] - got["fd"]) > 5e-3 * got["fd"], other
    assert got["fd"] > 3 * rows["real data (held-out)"]["fd"]


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


def test_sigint_checkpoints_and_resume_finishes(workdir, full, monkeypatch):
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


def _spy_denoiser(monkeypatch) -> dict[str, list]:
    """Hooks on the denoiser of every run that starts from now on: ``blocks`` gets one entry per call of its first
    transformer block (grad mode, and whether it ran inside ``backward``: a recomputation); ``dtypes`` the
    output dtype of every forward of its first Linear (``img_in``: bf16 under bf16 autocast)."""
    import accelerate

    import apexctl.training.loop as loop

    seen: dict[str, list] = {"blocks": [], "dtypes": []}
    state = {"backward": False}
    real_backward, real_setup = accelerate.Accelerator.backward, loop.setup

    def backward(self, loss, **kw):
        state["backward"] = True
        try:
            return real_backward(self, loss, **kw)
        finally:
            state["backward"] = False

    def setup(recipe, acc):
        sess = real_setup(recipe, acc)
        tr = sess.transformer
        # a pre-hook: torch's non-reentrant recomputation stops early, once it has what backward needs, so a
        # forward (post-)hook would never see it
        tr.transformer_blocks[0].register_forward_pre_hook(
            lambda m, a: seen["blocks"].append((torch.is_grad_enabled(), state["backward"]))
        )
        tr.img_in.register_forward_hook(lambda m, a, o: seen["dtypes"].append(o.dtype))
        return sess

    monkeypatch.setattr(accelerate.Accelerator, "backward", backward)
    monkeypatch.setattr(loop, "setup", setup)
    return seen


def test_gradient_checkpointing_and_bf16_autocast(workdir, full, monkeypatch):
    """Checkpointing recomputes each block's forward during backward and does not change the math; bf16 autocast
    runs the denoiser in bf16 and stays within what bf16's precision allows of fp32."""
    seen = _spy_denoiser(monkeypatch)
    gc = _recipe(workdir, "gc", hardware={"device": "cpu", "gradient_checkpointing": True})
    ok(["distill", str(gc), "-q"])
    forwards = [b for g, b in seen["blocks"] if g and not b]
    recomputed = [b for g, b in seen["blocks"] if b]
    # every grad-mode forward of the block (generator/FM rows, shifted branch: ≥ 2 per step) ran again in backward
    assert len(forwards) >= 2 * 6 and len(recomputed) == len(forwards), seen["blocks"]
    assert set(seen["dtypes"]) == {torch.float32}
    # the recomputation repeats the same kernels on the same inputs: bit-identical losses and weights
    assert _losses(workdir / "gc") == _losses(full)
    wg, wf = _weights(workdir / "gc"), _weights(full)
    assert wg.keys() == wf.keys() and all(torch.equal(wg[k], wf[k]) for k in wf)

    seen["blocks"].clear(), seen["dtypes"].clear()
    bf = _recipe(workdir, "bf16", hardware={"device": "cpu", "precision": "bf16"})
    ok(["distill", str(bf), "-q"])
    assert seen["dtypes"] and set(seen["dtypes"]) == {torch.bfloat16}  # autocast is active in every forward
    assert not any(b for _, b in seen["blocks"])  # and nothing is recomputed without checkpointing
    # bf16 keeps 8 significant bits: each op rounds at a relative 2^-9 ≈ 0.2 %; the loss is a mean over many
    # elements, so the roundings mostly cancel (measured: at most 0.1 % over the 6 steps); 1 % is 2.5 bf16 ulps
    lb, lf = _losses(workdir / "bf16"), _losses(full)
    assert lb != lf and lb == pytest.approx(lf, rel=1e-2)
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
    assert bb.transformer.training and bb.frozen_components() and not any(m.training for m in bb.frozen_components())
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
    train = {"steps": 10, "skip_nonfinite": True, "max_consecutive_skips": 2, "checkpoint_every": 2, "keep_last": 3}
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
    # a skipped step leaves weights, optimizer state, EMA and shift alone while the step counter and the LR schedule
    # advance: steps 5 and 6 were skipped (step-6 == step-4), step 3 was skipped but step 4 was not (step-4 != step-2)
    ck = {s: workdir / "skip" / "checkpoints" / f"step-00000{s}" for s in (2, 4, 6)}
    w = {s: load_file(str(ck[s] / "model.safetensors")) for s in ck}
    assert all(torch.equal(w[4][k], w[6][k]) for k in w[4])
    assert any(not torch.equal(w[2][k], w[4][k]) for k in w[2])
    opt = {s: torch.load(ck[s] / "optimizer.bin", weights_only=False) for s in ck}
    assert opt[4]["state"].keys() == opt[6]["state"].keys() and len(opt[4]["state"]) > 1
    for i, st in opt[4]["state"].items():
        assert st.keys() == opt[6]["state"][i].keys() and {"exp_avg", "exp_avg_sq"} <= set(st)
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(opt[6]["state"][i][k])) for k, v in st.items())
    # AdamW's step count: 2 updates by step 2, 3 by step 4 (1, 2, 4), still 3 at step 6
    assert [float(opt[s]["state"][0]["step"]) for s in (2, 4, 6)] == [2.0, 3.0, 3.0]
    assert not torch.equal(opt[2]["state"][0]["exp_avg"], opt[4]["state"][0]["exp_avg"])
    ema = {s: _custom_state(ck[s], {"decay", "shadow"})["shadow"] for s in ck}
    assert len(ema[4]) == len(w[4]) and all(torch.equal(a, b) for a, b in zip(ema[4], ema[6], strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(ema[2], ema[4], strict=True))
    shift = {s: _custom_state(ck[s], {"a", "b"}) for s in ck}
    assert all(torch.equal(torch.as_tensor(shift[4][k]), torch.as_tensor(shift[6][k])) for k in ("a", "b"))
    sched = {s: _custom_state(ck[s], {"last_epoch", "base_lrs"}) for s in ck}
    assert [sched[s]["last_epoch"] for s in (2, 4, 6)] == [2, 4, 6]
    # the LR the optimizer holds follows the schedule through the skips: warm-up 2, cosine over 10 steps
    from apexctl.training.optim import lr_lambda

    for s in ck:
        want = 1e-3 * lr_lambda(s, warmup=2, total=10, schedule="cosine", min_ratio=0.0)
        assert opt[s]["param_groups"][0]["lr"] == pytest.approx(want, rel=1e-12), s
    assert opt[6]["param_groups"][0]["lr"] < opt[4]["param_groups"][0]["lr"]
    assert _custom_state(ck[6], {"step", "skipped", "streak"}) == {"step": 6, "skipped": 3, "streak": 2}


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


def _custom_state(ck: Path, keys: set[str]) -> dict:
    """The registered object of checkpoint ``ck`` whose state has (at least) ``keys``."""
    states = [torch.load(p, weights_only=False) for p in sorted(ck.glob("custom_checkpoint_*.pkl"))]
    found = [s for s in states if isinstance(s, dict) and keys <= set(s)]
    assert len(found) == 1, (keys, [sorted(s) for s in states if isinstance(s, dict)])
    return found[0]


def _sampler_state(ck: Path) -> dict:
    return _custom_state(ck, {"epoch", "pos"})


def _saved_checksum(ck: Path) -> float:
    """``param_checksum`` of the trained parameters as checkpoint ``ck`` stores them: the denoiser's (in
    named_parameters order), then the learnable shift's a, b."""
    from apexctl.models import load_backbone
    from apexctl.training.checkpoint import param_checksum

    weights = load_file(str(ck / "model.safetensors"))
    names = [
        n for n, _ in load_backbone(TINY, load_text_encoder=False, load_codec=False).transformer.named_parameters()
    ]
    shift = _custom_state(ck, {"a", "b"})
    return param_checksum([weights[n] for n in names] + [torch.as_tensor(shift["a"]), torch.as_tensor(shift["b"])])


def test_replicas_that_differ_are_not_checkpointed(workdir, monkeypatch):
    """save_checkpoint gathers every rank's parameter checksum and refuses unequal ones (nothing is written); the
    checksum sees one float32 ulp in one weight and two tensors swapped. Rank 1's value is faked here: a real
    DDP run keeps the replicas equal, so the refusal cannot be reached through one."""
    from apexctl.errors import ApexError
    from apexctl.recipe import load_recipe
    from apexctl.training import checkpoint as ckpt
    from apexctl.training.hardware import make_accelerator
    from apexctl.training.session import setup

    recipe = load_recipe(_recipe(workdir, "replicas"))
    sess = setup(recipe, make_accelerator(recipe))
    params = [p.detach().clone() for p in sess.trainable]
    mine = ckpt.param_checksum(params)
    assert ckpt.param_checksum([p.clone() for p in params]) == mine
    off = [p.clone() for p in params]
    flat = off[3].view(-1)
    flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf")))
    i, j = next(
        (i, j)
        for i in range(len(params))
        for j in range(i + 1, len(params))
        if params[i].shape == params[j].shape and not torch.equal(params[i], params[j])
    )
    swapped = list(params)
    swapped[i], swapped[j] = params[j], params[i]
    assert ckpt.param_checksum(off) != mine and ckpt.param_checksum(swapped) != mine

    theirs = ckpt.param_checksum(off)
    monkeypatch.setattr(ckpt, "gather", lambda acc, value: [value, theirs])
    with pytest.raises(ApexError, match=r"step 1: parameters differ across ranks \(checksums \[.*\]\); not checkp"):
        ckpt.save_checkpoint(sess, 1)
    assert not (workdir / "replicas" / "checkpoints").exists()
    # equal checksums: saved, and recorded in the marker
    monkeypatch.setattr(ckpt, "gather", lambda acc, value: [value, value])
    folder = ckpt.save_checkpoint(sess, 1)
    assert json.loads((folder / "COMPLETE").read_text())["param_checksums"] == [mine, mine]
    assert _saved_checksum(folder) == pytest.approx(mine, rel=1e-12, abs=0)


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
        # each rank's checksum (save_checkpoint refuses unequal ones: tests/…::test_replicas_that_differ_…) is that
        # of the weights and the learnable shift saved here
        assert len(info["param_checksums"]) == 2
        for rank_sum in info["param_checksums"]:
            assert rank_sum == pytest.approx(_saved_checksum(ck / f"step-{step:06d}"), rel=1e-12, abs=0)
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


def test_sample_grids_do_not_change_training(workdir, full):
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
