"""The ``apex`` recipe options: reference = base for full tuning, critic = separate, generator_steps = N."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import LinearDenoiser
from data_util import ok, write_recipe
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from apexctl.engine.flow import TimeSampler, interpolate, velocity_target
from apexctl.engine.objectives import ApexConfig, LossOut, Net, _all, _mse, apex
from apexctl.engine.shift import ConditionShift
from apexctl.errors import BadInput
from apexctl.models.base import Cond
from apexctl.recipe import validate_recipe

X = torch.tensor([0.8, -0.4]).reshape(2, 1, 1, 1)
E = torch.tensor([1.5, -2.0]).reshape(2, 1, 1)
COND = Cond(E, torch.ones(2, 1, dtype=torch.long))


# ---- generator_steps = 1 is the objective as it was before the options existed --------------------------------


def _apex_v0(net, x, cond, cfg, reference=None, generator=None, uncond=None) -> LossOut:
    """``apex`` as of commit ee0e2db (before critic / generator_steps), verbatim."""
    B, dev = x.shape[0], x.device
    z = torch.randn(x.shape, generator=generator).to(x)
    z_fm = torch.randn(x.shape, generator=generator).to(x)
    t_fm = cfg.fm_time(B, dev, generator).to(x.dtype)
    x_t = interpolate(x, z_fm, t_fm)
    v = net(torch.cat([z, x_t]), torch.cat([torch.ones_like(t_fm), t_fm]), Cond.cat([cond, cond]))
    f_gen, f_fm = v[:B], v[B:]
    loss_fm = _mse(f_fm, velocity_target(x, z_fm))
    x_hat = (z - f_gen).detach()
    s = cfg.critic_time(B, dev, generator).to(x.dtype)
    z2 = torch.randn(x.shape, generator=generator).to(x)
    u = interpolate(x_hat, z2, s)
    f_fake = net(u, s, cond, fake=_all(B, dev))
    loss_fake = _mse(f_fake, velocity_target(x_hat, z2))
    with torch.no_grad():
        ref = reference if reference is not None else net
        if cfg.reference_guidance > 1.0:
            both = ref(torch.cat([u, u]), torch.cat([s, s]), Cond.cat([cond, uncond]))
            f_ref = net.backbone.guidance_combine(both[:B], both[B:], cfg.reference_guidance)
        else:
            f_ref = ref(u, s, cond)
        delta = f_fake.detach() - f_ref
        if cfg.delta_clip is not None:
            delta = delta.clamp(-cfg.delta_clip, cfg.delta_clip)
    loss_rect = _mse(f_gen, (f_gen - delta).detach())
    loss = cfg.fm_weight * loss_fm + cfg.fake_weight * loss_fake + cfg.rectify_weight * loss_rect
    return LossOut(loss, {"fm": loss_fm, "fake": loss_fake, "rect": loss_rect, "delta_abs": delta.abs().mean()})


class MLPDenoiser(LinearDenoiser):
    """A tiny nonlinear F: an MLP on (x, t, mean-pooled projected condition); the condition site is ``site``."""

    def __init__(self, seed: int = 0, d: int = 16) -> None:
        nn.Module.__init__(self)
        torch.manual_seed(seed)
        self.transformer = nn.Module()
        self.transformer.site = nn.Linear(4, 8)
        self.transformer.mlp = nn.Sequential(nn.Linear(d + 1 + 8, 32), nn.SiLU(), nn.Linear(32, d))
        self.d = d

    def velocity(self, x_t, t, cond: Cond):
        tr = self.transformer
        h = tr.site(cond.embeds).mean(1)
        flat = x_t.reshape(x_t.shape[0], -1)
        return tr.mlp(torch.cat([flat, t.reshape(-1, 1), h], 1)).reshape(x_t.shape)


def _mlp_batch(B: int = 4):
    g = torch.Generator().manual_seed(123)
    x = torch.randn((B, 1, 4, 4), generator=g)
    cond = Cond(torch.randn((B, 3, 4), generator=g), torch.ones(B, 3, dtype=torch.long))
    return x, cond


@pytest.mark.parametrize("clip", [1.0, None])
def test_generator_steps_1_is_bit_identical_to_the_previous_objective(clip):
    x, cond = _mlp_batch()
    cfg = ApexConfig(delta_clip=clip, rectify_weight=0.5, critic_time=TimeSampler(kind="logit_normal"))
    assert cfg.generator_steps == 1
    results = []
    for fn in (apex, _apex_v0):
        bb = MLPDenoiser()
        shift = ConditionShift(a=-1.0, b=0.1, learnable=True)
        out = fn(Net(bb, shift), x, cond, cfg, generator=torch.Generator().manual_seed(9))
        out.loss.backward()
        grads = [p.grad.clone() for p in list(bb.transformer.parameters()) + list(shift.parameters())]
        results.append((out, grads))
    (new, g_new), (old, g_old) = results
    assert torch.equal(new.loss, old.loss)
    for k in ("fm", "fake", "rect", "delta_abs"):
        assert torch.equal(new.terms[k], old.terms[k]), k
    assert len(g_new) == len(g_old) and all(torch.equal(a, b) for a, b in zip(g_new, g_old, strict=True))


# ---- generator_steps = 2: inputs at τ = 0.5 and the rectify gradient ----------------------------------------------


class RecordingDenoiser(LinearDenoiser):
    """LinearDenoiser that records every call (inputs, grad mode) and keeps the grad-mode outputs' gradients."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.calls: list[tuple[torch.Tensor, torch.Tensor, bool, torch.Tensor]] = []

    def velocity(self, x_t, t, cond):
        v = super().velocity(x_t, t, cond)
        if v.requires_grad:
            v.retain_grad()
        self.calls.append((x_t.detach().clone(), t.detach().clone(), torch.is_grad_enabled(), v))
        return v


def _seed_with_both_times(n_steps: int) -> int:
    """A seed whose τ draw (after z, z_fm, t_fm) gives one row at τ = 1 and one at τ < 1."""
    for seed in range(100):
        g = torch.Generator().manual_seed(seed)
        torch.randn((2, 1, 1, 1), generator=g), torch.randn((2, 1, 1, 1), generator=g), torch.rand(2, generator=g)
        k = torch.randint(0, n_steps, (2,), generator=g)
        if sorted(k.tolist()) == [0, 1]:
            return seed
    raise AssertionError("no seed")


def test_generator_steps_2_renoised_inputs_and_rectify_gradient():
    a, b, alpha, beta, w = -1.0, 0.25, 0.5, -0.3, 0.7
    seed = _seed_with_both_times(2)
    bb = RecordingDenoiser(alpha, beta, w)
    cfg = ApexConfig(generator_steps=2, delta_clip=None, fm_weight=0.0, fake_weight=0.0, rectify_weight=1.0)
    out = apex(Net(bb, ConditionShift(a=a, b=b)), X, COND, cfg, generator=torch.Generator().manual_seed(seed))
    out.loss.backward()

    g = torch.Generator().manual_seed(seed)
    z = torch.randn((2, 1, 1, 1), generator=g)
    torch.randn((2, 1, 1, 1), generator=g), torch.rand(2, generator=g)  # z_fm, t_fm (unused: w_fm = 0)
    tau = (2 - torch.randint(0, 2, (2,), generator=g)).float() / 2
    z1 = torch.randn((2, 1, 1, 1), generator=g)
    s, z2 = torch.rand(2, generator=g).reshape(-1, 1, 1, 1), torch.randn((2, 1, 1, 1), generator=g)
    r = int((tau < 1).nonzero())  # the τ = 0.5 row
    h = w * E.reshape(-1, 1, 1, 1)

    # call 0: the no-grad one-step sample of the τ < 1 row only, from fresh noise z' at t = 1
    x0, t0, grad0, _ = bb.calls[0]
    assert not grad0 and x0.shape[0] == 1 and torch.equal(x0[0], z1[r]) and t0.tolist() == [1.0]
    x1_hat = z1[r] - (alpha * z1[r] + beta + h[r])
    # call 1: generator rows (then FM rows) with grad: x_τ = z at τ = 1, 0.5·z + 0.5·x̂₁ at τ = 0.5
    x_in, t_in, grad1, v = bb.calls[1]
    assert grad1 and t_in[:2].tolist() == tau.tolist() and sorted(tau.tolist()) == [0.5, 1.0]
    torch.testing.assert_close(x_in[r], 0.5 * z[r] + 0.5 * x1_hat)
    torch.testing.assert_close(x_in[1 - r], z[1 - r], rtol=0, atol=0)

    # x̂ = x_τ − τ·F(x_τ, τ, c) feeds the critic step; Δ = F(u,s,c_fake) − F(u,s,c) = (a−1)·h + b here
    tb = tau.reshape(-1, 1, 1, 1)
    f_gen = alpha * x_in[:2] + beta * tb + h
    x_hat = x_in[:2] - tb * f_gen
    u = s * z2 + (1 - s) * x_hat
    torch.testing.assert_close(bb.calls[2][0], u)
    delta = (a - 1) * h + b
    assert out.terms["rect"].item() == pytest.approx(((delta / tb) ** 2).mean().item(), rel=1e-5)
    # the rectify gradient on F(x_τ, τ, c) is 2Δ/(τ·numel) per element (numel = 2 rows × 1 element)
    torch.testing.assert_close(v.grad[:2], 2 * delta / (tb * 2))
    assert torch.all(v.grad[2:] == 0)  # FM rows: w_fm = 0


def test_generator_steps_draw_only_the_grid():
    seen: set[float] = set()
    for seed in range(20):
        rec = RecordingDenoiser()
        cfg = ApexConfig(generator_steps=4)
        apex(Net(rec, ConditionShift()), X, COND, cfg, generator=torch.Generator().manual_seed(seed))
        # calls: [no-grad x̂₁ of the τ < 1 rows], generator + FM rows, shifted branch, reference
        gen_times = rec.calls[-3][1][:2].tolist()
        assert len(rec.calls) == (4 if min(gen_times) < 1 else 3)
        seen |= set(gen_times)
    assert seen == {1.0, 0.75, 0.5, 0.25}


# ---- critic = separate: gradients by hand -------------------------------------------------------------------------


def test_separate_critic_gradients_by_hand():
    alpha, beta, w = 0.5, -0.3, 0.7
    ca, cb, cw = 0.2, 0.4, -0.5
    lp, mu = 0.7, 0.5
    gen = LinearDenoiser(alpha, beta, w)
    crit = LinearDenoiser(ca, cb, cw)
    shift = ConditionShift(a=-1.0, b=0.25, learnable=True)
    calls = []

    def critic(u, s, c):
        calls.append(torch.is_grad_enabled())
        return crit.velocity(u, s, c)

    cfg = ApexConfig(delta_clip=None, fake_weight=lp, rectify_weight=mu)
    out = apex(Net(gen, shift), X, COND, cfg, generator=torch.Generator().manual_seed(7), critic=critic)
    out.loss.backward()
    assert calls == [True]

    g = torch.Generator().manual_seed(7)
    z, zfm = torch.randn((2, 1, 1, 1), generator=g), torch.randn((2, 1, 1, 1), generator=g)
    tfm, s = (torch.rand(2, generator=g) * 0.9).reshape(-1, 1, 1, 1), torch.rand(2, generator=g).reshape(-1, 1, 1, 1)
    z2 = torch.randn((2, 1, 1, 1), generator=g)
    e = E.reshape(-1, 1, 1, 1)
    xt = tfm * zfm + (1 - tfm) * X
    r_fm = alpha * xt + beta * tfm + w * e - (zfm - X)
    xhat = z - (alpha * z + beta + w * e)
    u = s * z2 + (1 - s) * xhat
    f_fake = ca * u + cb * s + cw * e  # the critic with the REAL condition (no shift)
    r_fake = f_fake - (z2 - xhat)
    delta = f_fake - (alpha * u + beta * s + w * e)  # F_φ − F_ref (self)
    assert out.terms["fake"].item() == pytest.approx((r_fake**2).mean().item(), rel=1e-5)
    assert out.terms["rect"].item() == pytest.approx((delta**2).mean().item(), rel=1e-5)

    # the critic: gradient from λ_p·L_fake only
    tr = crit.transformer
    assert tr.alpha.grad.item() == pytest.approx(lp * (2 * r_fake * u).mean().item(), rel=1e-5)
    assert tr.beta.grad.item() == pytest.approx(lp * (2 * r_fake * s).mean().item(), rel=1e-5)
    assert tr.site.weight.grad.item() == pytest.approx(lp * (2 * r_fake * e).mean().item(), rel=1e-5)
    # the generator: w_fm·L_fm + μ·L_rect only (nothing from L_fake); the shift is unused
    tr = gen.transformer
    assert tr.alpha.grad.item() == pytest.approx(
        ((2 * r_fm * xt).mean() + mu * (2 * delta * z).mean()).item(), rel=1e-5
    )
    assert tr.beta.grad.item() == pytest.approx(((2 * r_fm * tfm).mean() + mu * (2 * delta).mean()).item(), rel=1e-5)
    assert tr.site.weight.grad.item() == pytest.approx(
        ((2 * r_fm * e).mean() + mu * (2 * delta * e).mean()).item(), rel=1e-5
    )
    assert shift.a.grad is None and shift.b.grad is None


# ---- recipe validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "extra", "message"),
    [
        (
            {"objective": "apex", "critic": "separate"},
            {"hardware": {"strategy": "fsdp"}},
            "method.critic = 'separate' is not supported",
        ),
        ({"critic": "separate", "objective": "apex_paper"}, {}, "critic = 'separate' is a key of method"),
        ({"objective": "apex", "critic": "separate", "shift": {"learnable": True}}, {}, "method.shift.learnable"),
        (
            {"target_time": "embed"},
            {"hardware": {"strategy": "fsdp"}, "model": {"path": "tiny:digits", "lora": {"rank": 2}}},
            "method.target_time = 'embed'",
        ),
        ({"target_time": "none"}, {"train": {"micro_batch": 3}}, "train.micro_batch = 3"),
        ({"reference": "base"}, {"hardware": {"strategy": "fsdp"}}, "method.reference = 'base'"),
        ({"generator_steps": 0}, {}, "method.generator_steps = 0"),
        (
            {"gan_weight": 0.1, "target_time": "none"},
            {"hardware": {"strategy": "fsdp"}, "model": {"path": "tiny:digits", "lora": {"rank": 2}}},
            "method.gan_weight = 0.1",
        ),
        ({"generator_steps": 2, "objective": "flow_matching"}, {}, "generator_steps = 2 is a key of method"),
    ],
)
def test_bad_combinations_are_refused(method, extra, message):
    with pytest.raises(BadInput, match=message.replace(".", r"\.")):
        validate_recipe({"model": {"path": "tiny:digits"}, "method": method, **extra})  # the last "model" wins


def test_good_combinations_validate():
    r = validate_recipe(
        {
            "model": {"path": "tiny:digits"},
            "method": {"objective": "apex", "reference": "base", "critic": "separate", "generator_steps": 3},
        }
    )
    assert (r.method.reference, r.method.critic, r.method.generator_steps) == ("base", "separate", 3)
    lora = {"path": "tiny:digits", "lora": {"rank": 2}}
    validate_recipe(
        {"model": lora, "method": {"reference": "base", "target_time": "none"}, "hardware": {"strategy": "fsdp"}}
    )
    # apex_full splits micro-batches of 4 into its 4 groups; full_batch needs no minimum
    validate_recipe({"model": {"path": "tiny:digits"}, "method": {"full_batch": True}, "train": {"micro_batch": 1}})


# ---- the trainer: tiny digits model ---------------------------------------------------------------------------------

runner = CliRunner()
TINY = "tiny:digits?num_layers=1&num_attention_heads=2&attention_head_dim=8"


def _recipe(tmp: Path, name: str, method: dict | None = None, **sections) -> Path:
    tree = {
        "model": {"path": TINY},
        "data": {"source": "digits", "cache_dir": str(tmp / "cache"), "limit": 64},
        "method": {"objective": "apex", **(method or {})},
        "train": {"steps": 4, "micro_batch": 4, "lr": 1e-3, "log_every": 1, "checkpoint_every": 100, "seed": 5},
        "hardware": {"device": "cpu", "threads": 1},
        "output": {"dir": str(tmp / name)},
    }
    return write_recipe(tmp, name, tree, sections)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    # diffusers/transformers give their loggers a stderr handler on first use: take it outside CliRunner, whose
    # captured stderr is closed after each invoke (later tests' warnings would hit a closed stream)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.get_logger("diffusers")
    transformers_logging.get_logger("transformers")
    tmp = tmp_path_factory.mktemp("apex-options")
    mp = pytest.MonkeyPatch()
    mp.setenv("APEXCTL_HOME", str(tmp / "home"))
    ok(["prepare", str(_recipe(tmp, "prep")), "-q"])
    yield tmp
    mp.undo()


def _distill_on_two_processes(work: Path, recipe: Path) -> None:
    """``apexctl distill RECIPE --launch 2`` (DDP over gloo) in a subprocess; it must succeed."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "APEXCTL_HOME": str(work / "home"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "apexctl", "distill", str(recipe), "--launch", "2", "-q"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr


def _session(work: Path, name: str, method: dict, model: dict | None = None):
    from apexctl.recipe import load_recipe
    from apexctl.training.hardware import make_accelerator
    from apexctl.training.session import setup

    recipe = load_recipe(_recipe(work, name, method, **({"model": model} if model else {})))
    return setup(recipe, make_accelerator(recipe))


def _uninterrupted_equals_resumed(work: Path, name: str, method: dict) -> tuple[Path, Path]:
    full, part = _recipe(work, f"{name}-full", method), _recipe(work, f"{name}-part", method)
    ok(["distill", str(full), "-q"])
    ok(["distill", str(part), "--until", "2", "-q"])
    ok(["distill", str(part), "--resume", "auto", "-q"])
    runs = work / f"{name}-full", work / f"{name}-part"
    a, b = (load_file(str(r / "model" / "transformer" / "diffusion_pytorch_model.safetensors")) for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la, lb = ([json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in runs)
    assert [r["step"] for r in lb] == [1, 2, 3, 4]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    return runs


def test_base_reference_full_tuning_uses_the_starting_weights(work):
    from apexctl.models import load_backbone
    from apexctl.training.step import train_step

    sess = _session(work, "base-sess", {"reference": "base"})
    for _ in range(3):
        train_step(sess)
    fresh = load_backbone(TINY)
    ref = sess.objective.keywords["reference"]
    assert ref is not None
    g = torch.Generator().manual_seed(0)
    x, cond = sess.cache.batch(torch.arange(4), torch.zeros(4, dtype=torch.bool), None)
    u = torch.randn(x.shape, generator=g)
    s = torch.rand(4, generator=g)
    with torch.no_grad():
        want = fresh.velocity(u, s, cond)
        live = sess.backbone.velocity(u, s, cond)
    got = ref(u, s, cond)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.allclose(live, want, atol=1e-4)  # training moved the live model, not the reference
    assert sess.backbone.denoiser is sess.wrapped  # the forward module is restored


def test_base_reference_full_tuning_resumes_exactly(work):
    _uninterrupted_equals_resumed(work, "base", {"reference": "base"})


def test_separate_critic_starts_equal_and_only_adapters_train_with_lora(work):
    from apexctl.training.closures import make_critic

    sess = _session(work, "critic-sess", {"critic": "separate"})
    live = dict(sess.transformer.named_parameters())
    crit = dict(sess.critic.named_parameters())
    assert live.keys() == crit.keys()
    for n in live:
        assert torch.equal(live[n], crit[n]) and live[n].data_ptr() != crit[n].data_ptr(), n
    assert len(sess.critic_params) == len(live) and sess.opt.param_groups[-1]["params"] == sess.critic_params
    # outside the DDP module: its gradients are averaged over ranks by hand, and it is clipped with the rest
    assert sess.unwrapped_trainable == sess.critic_params and sess.trainable[-len(live) :] == sess.critic_params
    assert sess.opt.param_groups[-1]["lr"] == sess.opt.param_groups[0]["lr"]

    from apexctl.lora import make_trainable
    from apexctl.models import load_backbone
    from apexctl.recipe import LoraSpec

    bb = load_backbone(TINY)
    make_trainable(bb, LoraSpec(rank=2, alpha=2, init="gaussian"))
    c = make_critic(bb.transformer)
    base = {n: p for n, p in bb.transformer.named_parameters()}
    for n, p in c.named_parameters():
        if p.requires_grad:
            assert "lora" in n and p is not base[n] and torch.equal(p, base[n])
        else:
            assert p is base[n]  # the frozen base is shared, not copied


def _critic_state(ck: Path) -> dict[str, torch.Tensor]:
    """The separate critic's trained parameters (name → tensor, in training order) stored in checkpoint ``ck``."""
    for pkl in sorted(ck.glob("custom_checkpoint_*.pkl")):
        st = torch.load(pkl, weights_only=False)
        if isinstance(st, dict) and "critic" in st:
            return st["critic"]
    raise AssertionError("no critic state in the checkpoint")


def test_separate_critic_trains_by_l_fake_and_resumes_exactly(work):
    full, part = _uninterrupted_equals_resumed(work, "critic", {"critic": "separate"})
    a, b = (_critic_state(r / "checkpoints" / "step-000004") for r in (full, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    gen = load_file(str(full / "model" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(a[k], gen[k]) for k in a)  # the critic trained apart from the generator
    assert not (full / "model" / "critic").exists()  # training only: not exported
    out = ok(["distill", str(_recipe(work, "critic-dry", {"critic": "separate"})), "--dry-run"])
    assert "separate critic" in out and "critic: separate copy" in out


def test_generator_steps_train(work):
    from apexctl.training.step import train_step

    sess = _session(work, "steps-sess", {"generator_steps": 2})
    assert sess.objective.keywords["cfg"].generator_steps == 2
    out = train_step(sess)
    assert {"fm", "fake", "rect"} <= set(out.terms) and all(v == v for v in out.terms.values())


def test_separate_critic_under_ddp_stays_replicated(work):
    """`--launch 2` (DDP over gloo): the critic lives outside the DDP module; it starts from the broadcast model
    (LoRA adapters are initialised per rank) and its gradients are averaged by hand, so both ranks hold the same
    critic at the checkpoint (the trainer compares parameter checksums, critic included, and refuses otherwise)."""
    r = _recipe(
        work,
        "critic-ddp",
        {"critic": "separate", "generator_steps": 2},
        model={"lora": {"rank": 2, "alpha": 2, "init": "gaussian"}},
        train={"steps": 2, "micro_batch": 2},
        hardware={"processes": 2},
    )
    _distill_on_two_processes(work, r)
    from apexctl.training.checkpoint import param_checksum

    ck = work / "critic-ddp" / "checkpoints" / "step-000002"
    info = json.loads((ck / "COMPLETE").read_text())
    assert info["world_size"] == 2 and len(info["param_checksums"]) == 2
    # each rank's checksum is that of the trained parameters this checkpoint holds, the critic's included: the
    # generator's adapter (model.safetensors), then the critic's (save_checkpoint refuses unequal checksums:
    # tests/test_train_cli.py::test_replicas_that_differ_are_not_checkpointed)
    critic, model = _critic_state(ck), load_file(str(ck / "model.safetensors"))
    assert critic and all("lora_" in n for n in critic)
    assert any(not torch.equal(model[n], critic[n]) for n in critic)  # the critic trained apart: it counts
    want = param_checksum([model[n] for n in critic] + list(critic.values()))
    for rank_sum in info["param_checksums"]:
        assert rank_sum == pytest.approx(want, rel=1e-12, abs=0)


# ---- DMD2's two time scales and the critic's own lr / clip --------------------------------------------------------


def test_two_time_scales_move_the_generator_every_nth_step_only(work):
    from apexctl.training.step import train_step

    method = {"critic": "separate", "critic_updates": 3, "critic_lr": 5e-3, "critic_max_grad_norm": 0.5}
    sess = _session(work, "ttur-sess", method)
    assert sess.opt.param_groups[-1]["lr"] == 5e-3 and sess.opt.param_groups[0]["lr"] == 1e-3
    gen = lambda: [p.detach().clone() for p in sess.params]  # noqa: E731
    crit = lambda: [p.detach().clone() for p in sess.critic_params]  # noqa: E731
    moved = []
    for _ in range(3):
        g0, c0 = gen(), crit()
        train_step(sess)
        moved.append(
            (
                any(not torch.equal(a, b) for a, b in zip(g0, gen(), strict=True)),
                any(not torch.equal(a, b) for a, b in zip(c0, crit(), strict=True)),
            )
        )
    # steps 1, 2: the critic alone; step 3: both
    assert moved == [(False, True), (False, True), (True, True)]


def test_critic_knobs_need_a_separate_critic():
    from apexctl.recipe import Recipe

    with pytest.raises(ValueError, match="method.critic_lr"):
        Recipe.model_validate({"model": {"path": "tiny:digits"}, "method": {"critic_lr": 1e-3}})


def test_apex_full_trains_and_resumes_exactly(work):
    method = {"objective": "apex_full", "target_reference": "ema", "critic_updates": 2}
    full, _ = _uninterrupted_equals_resumed(work, "full", method)
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/e2e", "loss/mul", "loss/any", "loss/adv", "loss/rect"} <= set(rows[-1])  # step 4: a full step
    assert set(rows[0]) & {"loss/e2e", "loss/rect"} == set()  # step 1: a critic step (adv rows only)


def test_target_time_embedder_folds_away_at_tt_zero(work):
    """e(0) = 0 whatever the embedder's weights: the stock module is the model at tt = 0; tt > 0 changes it."""
    from apexctl.engine.target_time import TargetTimeEmbedding

    sess = _session(work, "tt-sess", {"objective": "apex_full", "target_time": "embed"})
    emb = sess.net.target_time
    assert isinstance(emb, TargetTimeEmbedding) and emb.fc1.out_features == sess.backbone.time_embedding_dim()
    assert sess.aux_params and all(any(p is q for q in sess.trainable) for p in sess.aux_params)
    with torch.no_grad():
        for p in emb.parameters():
            p.normal_(0, 0.5)
    g = torch.Generator().manual_seed(0)
    x, cond = sess.cache.batch(torch.arange(4), torch.zeros(4, dtype=torch.bool), None)
    u, t = torch.randn(x.shape, generator=g), torch.rand(4, generator=g)
    with torch.no_grad():
        stock = sess.backbone.velocity(u, t, cond)
        at0 = sess.net(u, t, cond, tt=torch.zeros(4))
        at_t = sess.net(u, t, cond, tt=t)
    torch.testing.assert_close(at0, stock, rtol=0, atol=0)
    assert not torch.allclose(at_t, stock, atol=1e-4)


def test_target_time_run_resumes_and_exports_the_stock_module(work):
    from apexctl.models import load_backbone

    full, _ = _uninterrupted_equals_resumed(work, "tt", {"objective": "apex_full", "target_time": "embed"})
    state = [torch.load(p, weights_only=False) for p in sorted((full / "checkpoints" / "step-000004").glob("*.pkl"))]
    emb = [s for s in state if isinstance(s, dict) and "fc2.weight" in s]
    assert emb and emb[0]["fc2.weight"].abs().sum() > 0  # the embedder trained (it starts at zero)
    exported = load_backbone(str(full / "model"))  # a stock folder: no embedder keys
    keys = load_file(str(full / "model" / "transformer" / "diffusion_pytorch_model.safetensors")).keys()
    assert not any("fc1" in k or "target" in k for k in keys) and exported.family == "qwen_image"


def test_critic_lag_is_logged_and_measures_the_moment_gap(work):
    from apexctl.training.diagnostics import moment_gap

    a = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    # means (1, 2) vs (1, 2) + (0, 1); stds (1, 1) vs (0, 0): √(((0 + 1) + (1 + 1))/2)
    b = torch.tensor([[1.0, 3.0], [1.0, 3.0]])
    assert moment_gap(a, b) == pytest.approx(math.sqrt(1.5))
    assert moment_gap(a, a) == 0.0
    for name, method in (("lag", {}), ("lag-sep", {"critic": "separate"})):
        p = _recipe(work, name, method, train={"log_every": 3, "diag_every": 2})  # logged: 2, 3, 4
        ok(["distill", str(p), "-q"])
        rows = [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [2, 3, 4]
        lags = [r.get("diag/critic_lag") for r in rows]
        assert lags[1] is None and lags[0] > 0 and lags[2] > 0, lags
    ok(["distill", str(_recipe(work, "lag-off", {}, train={"log_every": 3})), "-q"])
    a, b = (
        load_file(str(work / n / "model" / "transformer" / "diffusion_pytorch_model.safetensors"))
        for n in ("lag", "lag-off")
    )
    assert all(torch.equal(a[k], b[k]) for k in a)  # measuring it does not change training


def test_gan_term_trains_the_head_and_resumes_exactly(work):
    """apex_full with the target-time input and the GAN head: its terms are logged, the head is checkpointed (an
    interrupted run resumes bit for bit), and it learns (the head's weights move)."""
    method = {"objective": "apex_full", "target_time": "embed", "gan_weight": 0.5}
    full, _ = _uninterrupted_equals_resumed(work, "gan", method)
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/gan_d", "loss/gan_g", "loss/gan_real_acc", "loss/gan_fake_acc"} <= set(rows[-1])
    sess = _session(work, "gan-head", {**method, "gan_lr": 0.01})
    head = sess.objective.keywords["gan"].head
    group = next(g for g in sess.opt.param_groups if g["params"][0] is next(head.parameters()))
    assert group["lr"] == 0.01 and group["weight_decay"] == 0.0  # the head's own lr (train.lr is 1e-3)
    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    from apexctl.training.step import train_step

    train_step(sess)
    assert any(not torch.equal(before[n], p) for n, p in head.named_parameters())


def test_gan_term_on_a_separate_critic_adds_to_the_apex_loss(work):
    """apex with a separate critic: the loss is the same objective's plus w·(L_D + L_G), the rest unchanged (the GAN
    term draws its random numbers last)."""
    from apexctl.training.step import train_step

    # one session at a time: a session's setup seeds the global RNG its steps draw from
    a = train_step(_session(work, "gan-off", {"critic": "separate"}))
    b = train_step(_session(work, "gan-on", {"critic": "separate", "gan_weight": 0.5}))
    assert a.terms["fake"] == pytest.approx(b.terms["fake"], rel=1e-6)
    assert a.terms["fm"] == pytest.approx(b.terms["fm"], rel=1e-6)
    assert b.loss == pytest.approx(a.loss + 0.5 * (b.terms["gan_d"] + b.terms["gan_g"]), rel=1e-5)


@pytest.mark.parametrize(
    ("name", "method", "model"),
    [
        ("gan-ddp", {"objective": "apex_full", "target_time": "embed", "gan_weight": 0.5}, None),
        ("gan-sep-ddp", {"critic": "separate", "gan_weight": 0.5}, {"lora": {"rank": 2, "init": "gaussian"}}),
    ],
)
def test_gan_term_under_ddp(work, name, method, model):
    """`--launch 2`: the GAN term on the self-critic (apex_full with the target-time input: its live critic pass
    runs through the DDP module, the detached one beside it) and on a separate LoRA critic; both ranks checkpoint
    equal parameters, the GAN head's and the target-time embedder's included (the trainer compares checksums and
    refuses otherwise; the embedder, initialised from each rank's RNG stream, is broadcast from rank 0)."""
    r = _recipe(
        work,
        name,
        method,
        train={"steps": 2, "micro_batch": 4},
        hardware={"processes": 2},
        **({"model": model} if model else {}),
    )
    _distill_on_two_processes(work, r)
    info = json.loads((work / name / "checkpoints" / "step-000002" / "COMPLETE").read_text())
    assert info["world_size"] == 2 and info["param_checksums"][0] == info["param_checksums"][1]
    rows = [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines()]
    assert "loss/gan_d" in rows[-1]
