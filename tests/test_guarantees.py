"""README promises that a one-line breakage used to slip past (issue 13). Each test names the breakage it catches;
``bench/mutation_check.py`` applies each of them to a scratch copy of the package and checks that it is caught.

The training tests share one prepared digits cache and one 4-step run (module fixtures); every test passes alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import LinearDenoiser
from safetensors.torch import load_file
from typer.testing import CliRunner

from apexctl.cli import app
from apexctl.engine import sampler
from apexctl.engine.cond import Cond

runner = CliRunner()
TINY = "tiny:digits?num_layers=1&num_attention_heads=2&attention_head_dim=8"


# ---- the few-step sampler: two steps by hand ------------------------------------------------------------------
def _cond(values: list[float]) -> Cond:
    embeds = torch.tensor(values).reshape(-1, 1, 1)
    return Cond(embeds=embeds, mask=torch.ones(len(values), 1, dtype=torch.long))


def test_few_step_is_two_endpoint_steps_by_hand():
    """Breakage: ``x̂ = x + t·v`` instead of ``x − t·v`` in ``few_step`` (``--method few``, ``sample.method: few``,
    the 2/4-step eval rows). Two steps on t = 1, ½, 0 of F(x, t, c) = α·x + β·t + w·e, written out by hand, with
    the stochastic re-noising replayed from the per-image generators and with the deterministic one (ẑ)."""
    alpha, beta, w = 0.5, -0.3, 0.7
    model = LinearDenoiser(alpha, beta, w)
    e = [0.4, -1.1]
    cond = _cond(e)
    seeds = [10, 11]
    z = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(3))

    def F(x: torch.Tensor, t: float) -> torch.Tensor:  # the velocity, by hand: α·x + β·t + w·e (per row)
        return alpha * x + beta * t + w * torch.tensor(e).reshape(2, 1, 1, 1)

    v1 = F(z, 1.0)
    x_hat1 = z - 1.0 * v1  # x̂ = x_t − t·F at t = 1
    # stochastic: x_½ = ½·ε + ½·x̂ with ε row i the first draw of generator i (the images' own generators)
    eps = torch.cat([torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(s)) for s in seeds])
    x_half = 0.5 * eps + 0.5 * x_hat1
    want_stochastic = x_half - 0.5 * F(x_half, 0.5)
    # deterministic: ε = ẑ = x_t + (1 − t)·F = z at t = 1
    x_half = 0.5 * z + 0.5 * x_hat1
    want_deterministic = x_half - 0.5 * F(x_half, 0.5)

    for renoise, want in (("stochastic", want_stochastic), ("deterministic", want_deterministic)):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        got = sampler.few_step(model, z, cond, 2, renoise, gens)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=renoise)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        via = sampler.generate(model, z, cond, 2, "few", renoise=renoise, generator=gens)
        torch.testing.assert_close(via, want, rtol=1e-6, atol=1e-6, msg=f"generate(method='few'), {renoise}")
    assert (want_stochastic - want_deterministic).abs().max() > 0.1  # the two re-noisings differ here

    # deterministic, three steps (t = 1, ⅔, ⅓, 0): there ẑ = x_t + (1 − t)·F uses the velocity
    x, times = z, [1.0, 2 / 3, 1 / 3, 0.0]
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        v = F(x, t)
        x_hat = x - t * v
        x = t_next * (x + (1 - t) * v) + (1 - t_next) * x_hat
    got = sampler.few_step(model, z, cond, 3, "deterministic")
    torch.testing.assert_close(got, x_hat, rtol=1e-5, atol=1e-6)


def test_few_step_grid_power_puts_the_second_step_at_low_noise():
    """``grid_power`` p: times (1 − i/N)^p. p = 2, N = 2: t = 1, ¼, 0 by hand (stochastic re-noising), and the
    recipe's ``sample.grid_power`` reaches the sampler through the resolved settings."""
    from apexctl.inference import ModelInfo, resolve_sample_settings
    from apexctl.recipe import validate_recipe

    alpha, beta, w = 0.5, -0.3, 0.7
    model, e = LinearDenoiser(alpha, beta, w), [0.4, -1.1]
    z = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(3))

    def F(x: torch.Tensor, t: float) -> torch.Tensor:
        return alpha * x + beta * t + w * torch.tensor(e).reshape(2, 1, 1, 1)

    eps = torch.cat([torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(s)) for s in (10, 11)])
    x_q = 0.25 * eps + 0.75 * (z - F(z, 1.0))
    want = x_q - 0.25 * F(x_q, 0.25)
    gens = [torch.Generator().manual_seed(s) for s in (10, 11)]
    got = sampler.generate(model, z, _cond(e), 2, "few", generator=gens, grid_power=2.0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    r = validate_recipe({"model": {"path": "tiny:digits"}, "sample": {"grid_power": 2.0}})
    assert resolve_sample_settings(r, ModelInfo(distilled=True), steps=2).sampler_kwargs()["grid_power"] == 2.0


def test_few_step_returns_the_data_point_of_an_exact_velocity():
    """A model whose velocity is exactly (x_t − x*)/t (the straight path to one data point x*) has x̂ = x* at every
    step: the few-step sampler returns x* for any number of steps and either re-noising."""
    target = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(1))

    class Exact:
        def velocity(self, x_t, t, cond):
            return (x_t - target) / t.reshape(-1, 1, 1, 1)

    z = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(2))
    for steps in (1, 2, 4):
        for renoise in ("stochastic", "deterministic"):
            gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
            got = sampler.few_step(Exact(), z, None, steps, renoise, gens)
            torch.testing.assert_close(got, target, rtol=1e-5, atol=1e-5, msg=f"{steps} steps, {renoise}")


# ---- training runs on a tiny digits model ---------------------------------------------------------------------
def _invoke(args: list, code: int = 0) -> str:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == code, res.output
    return res.output


def _recipe(tmp: Path, name: str, **sections) -> Path:
    tree = {
        "model": {"path": TINY},
        "data": {"source": "digits", "cache_dir": str(tmp / "cache"), "num_workers": 0},
        "method": {"objective": "apex"},
        "train": {
            "steps": 4,
            "micro_batch": 8,
            "lr": 1e-2,
            "lr_schedule": "constant",
            "warmup_steps": 0,
            "ema_decay": 0.9,
            "log_every": 1,
            "checkpoint_every": 1,
            "keep_last": 3,
            "seed": 7,
        },
        "hardware": {"device": "cpu", "threads": 1},
        "output": {"dir": str(tmp / name)},
    }
    for k, v in sections.items():
        tree[k].update(v)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _state(ck: Path, key: str) -> dict:
    """The registered checkpoint object whose state holds ``key`` (EMA: ``shadow``; LR schedule: ``last_epoch``)."""
    states = [torch.load(p, weights_only=False) for p in sorted(ck.glob("custom_checkpoint_*.pkl"))]
    return next(s for s in states if isinstance(s, dict) and key in s)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """APEXCTL_HOME (the tiny model is built there) and the digits cache, prepared once."""
    tmp = tmp_path_factory.mktemp("guarantees")
    mp = pytest.MonkeyPatch()
    mp.setenv("APEXCTL_HOME", str(tmp / "home"))
    threads = torch.get_num_threads()  # hardware.threads: 1 is process-wide
    _invoke(["prepare", _recipe(tmp, "prep"), "-q"])
    yield tmp
    torch.set_num_threads(threads)
    mp.undo()


@pytest.fixture(scope="module")
def run4(home):
    """A 4-step run: a checkpoint every step (keep_last 3), a sample grid at step 4, model/ = EMA, model-live/.
    Returns the run folder and what each sample grid was drawn from (the images handed to ``save_grid``)."""
    import apexctl.images

    grids: list[dict] = []
    real = apexctl.images.save_grid

    def spy(images, path, *args, **kwargs):
        grids.append({"images": torch.as_tensor(images).clone(), "path": Path(path), "labels": kwargs.get("labels")})
        return real(images, path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(apexctl.images, "save_grid", spy)
        _invoke(["distill", _recipe(home, "run4", train={"sample_every": 4, "export": "both"}), "-q"])
    return home / "run4", grids


def test_keep_last_leaves_exactly_the_newest_checkpoints(run4):
    """Breakage: ``keep_last`` pruning does nothing. Four checkpoints written, keep_last 3: the three newest are
    left, whole, and nothing else (no temporary or half-pruned folder)."""
    run, _ = run4
    ck = run / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-000002", "step-000003", "step-000004"]
    assert all((p / "COMPLETE").is_file() and (p / "model.safetensors").is_file() for p in ck.iterdir())


def test_sample_grid_is_drawn_from_the_ema(run4):
    """Breakage: grids drawn from the live weights instead of the EMA ("the EMA when that is what gets exported").
    The step-4 grid is the one-step output of the exported EMA model (model/) for the grid's prompts and seeds, and
    not that of the live weights (model-live/)."""
    from apexctl.data.cache import LatentCache
    from apexctl.inference import seeded_noise
    from apexctl.models import load_backbone
    from apexctl.recipe import load_recipe

    run, grids = run4
    assert [g["path"] for g in grids] == [run / "samples" / "step-000004.png"]
    assert (run / "samples" / "step-000004.png").is_file()
    recipe = load_recipe(run / "recipe.yaml")
    k, labels = recipe.train.sample_images, grids[0]["labels"]
    cache = LatentCache.open(recipe.data.cache_dir)
    rows = [cache.prompt_index(p) for p in labels for _ in range(k)]
    seeds = [recipe.sample.seed + j for _ in labels for j in range(k)]
    z = seeded_noise(tuple(cache.latents.shape[1:]), seeds)
    cond = cache.cond(torch.tensor(rows))

    def images(folder: str) -> torch.Tensor:
        bb = load_backbone(str(run / folder))
        bb.eval()
        with torch.no_grad():
            return bb.decode_latents(sampler.one_step(bb, z, cond)).float()

    got, ema, live = grids[0]["images"], images("model"), images("model-live")
    assert got.shape == ema.shape == (len(rows), *got.shape[1:])
    torch.testing.assert_close(got, ema, rtol=0, atol=1e-5)
    assert (got - live).abs().max() > 1e-2  # the EMA and the live model draw visibly different grids


def test_resume_auto_takes_the_newest_complete_checkpoint(run4, home, monkeypatch):
    """Breakage: resume picks the oldest complete checkpoint. Three complete checkpoints (steps 2, 3, 4): `--resume
    auto` says it resumed from step 4, continues from there (one step to reach --until 5) and logs each step once."""
    import apexctl.training.loop as loop

    run = home / "newest"
    shutil.copytree(run4[0], run)
    recipe = _recipe(home, "newest", train={"steps": 6})
    calls = []
    real = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda sess: calls.append(sess.counter.step) or real(sess))
    out = _invoke(["distill", recipe, "--resume", "auto", "--until", "5", "-q"])
    assert f"resumed from {run / 'checkpoints' / 'step-000004'} at step 4" in out, out
    assert calls == [4]  # one step trained, from step 4
    assert _steps(run) == [1, 2, 3, 4, 5]


def _patch_objective(monkeypatch, hook) -> None:
    """Wrap the real objective; ``hook(call, out)`` may alter the LossOut (one call per step with grad_accum 1)."""
    import apexctl.training.session as session

    real = session.build_objective
    calls = {"n": 0}

    def build(*args, **kwargs):
        fn = real(*args, **kwargs)

        def wrapped(*a, **kw):
            calls["n"] += 1
            return hook(calls["n"], fn(*a, **kw))

        return wrapped

    monkeypatch.setattr(session, "build_objective", build)


def test_a_skipped_step_leaves_the_ema_unchanged(home, monkeypatch):
    """Breakage: the EMA updated on skipped non-finite steps ("weights, optimizer and EMA stay unchanged"). Step 3's
    loss is NaN and skipped: the EMA shadow, the weights and the optimizer state after step 3 equal those after step
    2, while the step counter and the LR schedule advance; step 4 trains again (so the comparison can fail)."""

    def hook(n, out):
        if n == 3:
            out.loss = out.loss * float("nan")
        return out

    _patch_objective(monkeypatch, hook)
    r = _recipe(home, "skip", train={"skip_nonfinite": True, "keep_last": 4})
    _invoke(["distill", r, "-q"])
    run = home / "skip"
    ck = {s: run / "checkpoints" / f"step-{s:06d}" for s in (2, 3, 4)}
    rows = {x["step"]: x for x in _rows(run)}
    assert rows[2]["skipped"] == 0 and rows[3]["skipped"] == 1 and rows[4]["skipped"] == 1

    ema = {s: _state(c, "shadow")["shadow"] for s, c in ck.items()}
    assert len(ema[2]) > 0 and all(torch.equal(a, b) for a, b in zip(ema[2], ema[3], strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(ema[3], ema[4], strict=True))

    w = {s: load_file(str(c / "model.safetensors")) for s, c in ck.items()}
    assert all(torch.equal(w[2][k], w[3][k]) for k in w[2])
    assert any(not torch.equal(w[3][k], w[4][k]) for k in w[3])

    opt = {s: torch.load(c / "optimizer.bin", weights_only=False)["state"] for s, c in ck.items()}
    assert opt[2].keys() == opt[3].keys() and opt[2]
    for i in opt[2]:
        for name, value in opt[2][i].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt[3][i][name])), (i, name)
    assert [_state(ck[s], "last_epoch")["last_epoch"] for s in (2, 3)] == [2, 3]  # the LR schedule advanced


class _Killed(Exception):
    """Stands for a kill between logging a step and checkpointing it."""


def test_a_run_killed_after_logging_resumes_with_each_step_logged_once(home, monkeypatch):
    """Breakage: resume no longer drops the ``metrics.jsonl`` rows past the checkpoint (rows 1,2,3,4,3,4,5,6). A run
    that logged steps 3 and 4 and died before checkpointing step 4 resumes from step 2: the steps column is then
    1..6 once each, and the re-done steps 3–4 log what the killed run had logged for them."""
    import apexctl.training.checkpoint as ckpt

    r = _recipe(home, "killed", train={"steps": 6, "checkpoint_every": 2, "keep_last": 5})
    run = home / "killed"
    real = ckpt.save_checkpoint

    def dies_at_4(sess, step, *args, **kwargs):
        if step == 4:
            raise _Killed(f"killed before checkpointing step {step}")
        return real(sess, step, *args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(ckpt, "save_checkpoint", dies_at_4)
        res = runner.invoke(app, ["distill", str(r), "-q"])
    assert isinstance(res.exception, _Killed), res.output
    before = _rows(run)
    assert [x["step"] for x in before] == [1, 2, 3, 4]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]

    out = _invoke(["distill", r, "--resume", "auto", "-q"])
    assert f"resumed from {run / 'checkpoints' / 'step-000002'} at step 2" in out, out
    after = _rows(run)
    assert [x["step"] for x in after] == [1, 2, 3, 4, 5, 6]
    assert [x["loss"] for x in after[:4]] == [x["loss"] for x in before]  # same machine, same process: exact


def test_gradient_checkpointing_is_active(home, monkeypatch):
    """Breakage: ``enable_gradient_checkpointing()`` never called (``hardware.gradient_checkpointing``). The
    denoiser's ``gradient_checkpointing`` flag is set, and its blocks run through ``torch.utils.checkpoint`` in the
    training forwards (with gradient); the run without the option never calls it."""
    import torch.utils.checkpoint as tuc

    import apexctl.training.loop as loop

    sessions, calls = [], []
    real_setup, real_ckpt = loop.setup, tuc.checkpoint

    def setup(*a, **kw):
        sessions.append(real_setup(*a, **kw))
        return sessions[-1]

    def checkpoint(*a, **kw):
        calls.append(torch.is_grad_enabled())
        return real_ckpt(*a, **kw)

    monkeypatch.setattr(loop, "setup", setup)
    monkeypatch.setattr(tuc, "checkpoint", checkpoint)
    train = {"steps": 2, "ema_decay": None, "checkpoint_every": 100}
    _invoke(["distill", _recipe(home, "gc", train=train, hardware={"gradient_checkpointing": True}), "-q"])
    assert sessions[-1].transformer.gradient_checkpointing is True
    assert len(calls) >= 2 and all(calls)  # at least one block per training step, each with gradient
    calls.clear()
    _invoke(["distill", _recipe(home, "no-gc", train=train), "-q"])
    assert sessions[-1].transformer.gradient_checkpointing is False and calls == []
