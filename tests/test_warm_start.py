"""The regression warm start on the teacher's (noise, sample) pairs and the critic warm-up ramp (DMD2's stabilisers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from data_util import fails, ok, write_recipe
from safetensors.torch import load_file

from apexctl.engine.cond import Cond
from apexctl.engine.objectives import Net, apex, regression
from apexctl.engine.shift import ConditionShift
from apexctl.recipe_method import ApexFullMethod, ApexMethod

TINY = "tiny:digits?num_layers=1&num_attention_heads=2&attention_head_dim=8"
PROMPTS = ["a handwritten digit three", "a handwritten digit seven"]
SYNTH = {"steps": 3, "guidance": 2.0, "images_per_prompt": 6, "seed": 40, "batch": 5}


def test_regression_is_the_one_step_velocity_error_by_hand(linear_backbone):
    """F(x, t, c) = α·x + β·t + w·e: at t = 1 from z, L = mean (α·z + β + w·e − (z − x))²."""
    net = Net(linear_backbone, ConditionShift(a=-1.0))
    z = torch.tensor([0.5, -1.0, 2.0, 0.25]).reshape(2, 1, 1, 2)
    x = torch.tensor([0.1, 0.2, -0.3, 0.4]).reshape(2, 1, 1, 2)
    e = torch.tensor([[[1.0]], [[-2.0]]])
    cond = Cond(e, torch.ones(2, 1, dtype=torch.long))
    out = regression(net, x, z, cond)
    f = 0.5 * z + (-0.3) + 0.7 * e.reshape(2, 1, 1, 1)
    assert torch.allclose(out.loss, ((f - (z - x)) ** 2).mean())
    assert set(out.terms) == {"warm"}
    out.loss.backward()
    assert linear_backbone.transformer.alpha.grad is not None


def test_rectify_ramp_starts_after_the_warm_start():
    m = ApexFullMethod(warm_start_steps=10, rectify_warmup=100)
    assert [m.rectify_scale(s) for s in (0, 10, 60, 110, 500)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert ApexMethod().rectify_scale(0) == 1.0  # no ramp: the full weight from the first step


def test_apex_with_rectify_scale_zero_drops_only_the_rectify_term(linear_backbone):
    from apexctl.engine.config import ApexConfig

    net = Net(linear_backbone, ConditionShift(a=-1.0))
    x = torch.randn(4, 1, 1, 2, generator=torch.Generator().manual_seed(0))
    cond = Cond(torch.randn(4, 1, 1), torch.ones(4, 1, dtype=torch.long))
    cfg = ApexConfig()
    full = apex(net, x, cond, cfg, generator=torch.Generator().manual_seed(1))
    off = apex(net, x, cond, cfg, generator=torch.Generator().manual_seed(1), rectify_scale=0.0)
    half = apex(net, x, cond, cfg, generator=torch.Generator().manual_seed(1), rectify_scale=0.5)
    t = full.terms
    assert torch.allclose(off.loss, cfg.fm_weight * t["fm"] + cfg.fake_weight * t["fake"])
    assert torch.allclose(half.loss, off.loss + 0.5 * cfg.rectify_weight * t["rect"])
    assert torch.allclose(full.loss, off.loss + cfg.rectify_weight * t["rect"])


def _recipe(tmp: Path, name: str, method: dict, cache: str = "cache-syn", **data) -> Path:
    source = {
        "source": "prompts",
        "path": str(tmp / "prompts.txt"),
        "synthesize": SYNTH,
        "cache_dtype": "fp32",
    }
    tree = {
        "model": {"path": TINY},
        "data": {"cache_dir": str(tmp / cache), **(data or source)},
        "method": {"objective": "apex_full", "reference": "base", "target_time": "none", **method},
        "train": {"steps": 5, "micro_batch": 4, "lr": 1e-3, "log_every": 1, "checkpoint_every": 100, "seed": 3},
        "hardware": {"device": "cpu", "threads": 1},
        "output": {"dir": str(tmp / name)},
    }
    return write_recipe(tmp, name, tree, {})


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.get_logger("diffusers")
    transformers_logging.get_logger("transformers")
    tmp = tmp_path_factory.mktemp("warm-start")
    mp = pytest.MonkeyPatch()
    mp.setenv("APEXCTL_HOME", str(tmp / "home"))
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    ok(["prepare", str(_recipe(tmp, "prep", {})), "-q"])
    yield tmp
    mp.undo()


def test_pairs_rebuild_the_teachers_noise_exactly(work):
    """z from the recorded seed, run through the teacher's synthesis sampler, gives the cached latent x."""
    from apexctl.data.cache import LatentCache, PairSampler
    from apexctl.engine import sampler
    from apexctl.models import load_backbone, resolve_model_path
    from apexctl.training.warm_start import WarmStartPairs

    cache = LatentCache.open(work / "cache-syn")

    def open_pairs() -> WarmStartPairs:
        return WarmStartPairs(cache, PairSampler(len(cache), seed=0), cache.latent_shape, key="k")

    pairs = open_pairs()
    x, z, cond = pairs.batch(5, rank=0, world=1)
    bb = load_backbone(resolve_model_path(TINY))
    uncond = bb.encode_prompts([""]).expand(len(x))
    again = sampler.generate(bb, z, cond, SYNTH["steps"], "euler", uncond=uncond, guidance_scale=SYNTH["guidance"])
    assert torch.allclose(again, x, atol=1e-5)
    # rank r of W takes rows r::W of the same draw
    p1, p2 = open_pairs(), open_pairs()
    x0, z0, _ = p1.batch(2, rank=0, world=2)
    x1, z1, _ = p2.batch(2, rank=1, world=2)
    assert torch.equal(torch.stack([x0, x1], 1).flatten(0, 1), x[:4]) and torch.equal(z1, z[1:4:2])


def test_warm_start_then_objective_with_ramp_and_exact_resume(work):
    method = {"warm_start_steps": 3, "rectify_warmup": 2}
    full, part = _recipe(work, "ws-full", method), _recipe(work, "ws-part", method)
    ok(["distill", str(full), "-q"])
    ok(["distill", str(part), "--until", "2", "-q"])  # stopped inside the warm start: its data order resumes
    ok(["distill", str(part), "--resume", "auto", "-q"])
    runs = work / "ws-full", work / "ws-part"
    a, b = (load_file(str(r / "model" / "transformer" / "diffusion_pytorch_model.safetensors")) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [
        json.loads(x)["loss"] for x in (runs[1] / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(set(r) & {"loss/warm", "loss/e2e"} == {"loss/warm"} for r in rows[:3])
    assert all("loss/e2e" in r and "loss/warm" not in r for r in rows[3:])
    # step 4 is the ramp's first step (scale 0): the loss is the groups' loss alone; step 5 adds half the rectify term
    assert rows[3]["loss"] == pytest.approx(_groups_mean(rows[3]), rel=1e-5)
    assert rows[4]["loss"] == pytest.approx(_groups_mean(rows[4]) + 0.5 * 0.25 * rows[4]["loss/rect"], rel=1e-5)


def _groups_mean(row: dict) -> float:
    """L_main from the logged group means (four equal groups of one row each at micro-batch 4)."""
    return sum(row[f"loss/{g}"] for g in ("e2e", "mul", "any", "adv")) / 4


def test_warm_start_without_seeds_is_refused(work):
    ok(["prepare", str(_recipe(work, "dig", {}, cache="cache-dig", source="digits", limit=32)), "-q"])
    r = _recipe(work, "noseed", {"warm_start_steps": 2}, cache="cache-dig", source="digits", limit=32)
    assert "no recorded synthesis seeds" in fails(["distill", str(r), "-q"])
    r = _recipe(work, "nocache", {"warm_start_steps": 2, "warm_start_cache": str(work / "nowhere")})
    assert "is not a prepared cache" in fails(["distill", str(r), "-q"])


def test_dry_run_names_the_stabilisers(work):
    method = {"warm_start_steps": 3, "rectify_warmup": 2, "gan_weight": 0.5}
    out = ok(["distill", str(_recipe(work, "dry", method)), "--dry-run"])
    assert f"warm start: steps 1–3 regress F(z, 1, c) on the teacher's pairs in {work / 'cache-syn'}" in out
    assert "rectify_weight ramps from 0 over 2 steps" in out and "GAN term: 0.5·(L_D + L_G)" in out
