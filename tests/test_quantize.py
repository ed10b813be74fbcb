"""``model.quantize``: LoRA training on a quantised frozen base (int8 / fp8 with torchao, nf4 with bitsandbytes).

One tiny Qwen-Image (real VAE, width 64 so that every block Linear is nf4-able) and one small digits cache; one
12-step ``apex`` LoRA run per scheme (and one unquantised) that the tests below read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from data_util import digits_recipe, fails, ok, prepared_home
from safetensors.torch import load_file

from apexctl.models.quantize import PACKAGES, _installed

TINY = "tiny:test?attention_head_dim=32"
SCHEMES = [s for s in ("int8", "fp8", "nf4") if _installed(PACKAGES[s])]
STEPS = 12
#: relative L2 between the one-step latents of a quantised run's LoRA and the unquantised run's (the same seed, data
#: and base; both applied to the fp32 base), measured 1.3e-4 / 7.8e-4 / 2.6e-3 (int8 / fp8 / nf4); the bound is
#: about 4× that (the random tiny base's one-step latents are close to the noise, so the numbers are small; the
#: trained digits model's are in docs/quantization.md); the lower bound shows the quantised base changed training
ONE_STEP_TOLERANCE = {"int8": 5e-4, "fp8": 3e-3, "nf4": 1e-2}
#: the same latents from the quantised run itself (its quantised base + its adapter) vs its LoRA on the fp32 base
#: (what a user deploys): measured 2.3e-4 / 1.4e-3 / 5.1e-3
DEPLOY_TOLERANCE = {"int8": 1e-3, "fp8": 6e-3, "nf4": 2e-2}


def _recipe(tmp: Path, name: str, quantize: str = "none", **sections) -> Path:
    """The runs' recipe (tiny:test of width 64, a 64-image digits cache at 32², 12 LoRA steps of apex with the
    base reference, an EMA, gradient checkpointing and a sample grid at step 5), each of ``sections`` merged in."""
    base = {
        "model": {"lora": {"rank": 4, "alpha": 4.0, "init": "gaussian"}, "quantize": quantize},
        "data": {"resolution": 32, "limit": 64},
        "method": {"objective": "apex", "reference": "base"},
        "train": {
            "steps": STEPS,
            "lr": 5e-3,
            "ema_decay": 0.9,
            "checkpoint_every": 6,
            "keep_last": 5,
            "sample_every": 5,
        },
        # recomputed activations, and an eval-mode sample grid mid-run (bitsandbytes' CPU repacking would strike there)
        "hardware": {"gradient_checkpointing": True},
    }
    merged = {k: base.get(k, {}) | sections.get(k, {}) for k in base.keys() | sections.keys()}
    return digits_recipe(tmp, name, model_path=TINY, **merged)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    yield from prepared_home(tmp_path_factory, "quantize", _recipe)


def _flat(t: torch.Tensor) -> list[torch.Tensor]:
    """The tensors a weight is stored as: itself, torchao's inner tensors, bitsandbytes' quantisation state."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
        return [x for n in flatten()[0] for x in _flat(getattr(t, n))]
    out, state = [t.detach()], getattr(t, "quant_state", None)
    while state is not None:
        out += [state.absmax, state.code] + ([state.offset] if getattr(state, "offset", None) is not None else [])
        state = getattr(state, "state2", None)
    return out


def base_bytes(transformer: torch.nn.Module) -> dict[str, list[torch.Tensor]]:
    """Copies of every stored tensor of the frozen base, by parameter / buffer name (peft's ``.base_layer`` left out
    of the names, so a base with an adapter compares with one without)."""
    frozen = {n: p for n, p in transformer.named_parameters() if not p.requires_grad}
    tensors = {**frozen, **dict(transformer.named_buffers())}
    return {n.replace(".base_layer", ""): [x.clone() for x in _flat(t)] for n, t in tensors.items()}


def same_bytes(a: dict, b: dict) -> bool:
    def equal(xs: list, ys: list) -> bool:
        return len(xs) == len(ys) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(xs, ys, strict=True))

    return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)


def quantized_backbone(scheme: str):
    from apexctl.models import load_backbone
    from apexctl.models.quantize import quantize_backbone

    bb = load_backbone(TINY, load_text_encoder=False, load_codec=False)
    quantize_backbone(bb, scheme)
    return bb


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(home):
    """scheme → (run folder, its session after training, the base's bytes right after setup)."""
    from apexctl.training import loop

    out = {}
    for scheme in ["none", *SCHEMES]:
        seen = {}

        def spy(recipe, acc, _setup=loop.setup, seen=seen):
            sess = _setup(recipe, acc)
            seen["sess"], seen["before"] = sess, base_bytes(sess.transformer)
            return sess

        mp = pytest.MonkeyPatch()
        mp.setattr(loop, "setup", spy)
        try:
            ok(["distill", _recipe(home, scheme, scheme), "-q"])
        finally:
            mp.undo()
        out[scheme] = (home / scheme, seen["sess"], seen["before"])
    return out


def _first_prompt(cache) -> int:
    return next(i for i, p in enumerate(cache.prompts) if p)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_only_the_adapter_trains_on_a_base_that_never_changes(runs, scheme):
    from peft.tuners.lora import LoraLayer

    from apexctl.models.quantize import block_linears

    run, sess, before = runs[scheme]
    assert sess.backbone.quantization == scheme and sess.backbone.compute_dtype == torch.float32
    bases = [m.base_layer for m in sess.transformer.modules() if isinstance(m, LoraLayer)]
    assert bases and all(type(b.weight) is not torch.nn.Parameter for b in bases)  # peft wrapped quantised layers
    left = [n for n, *_ in block_linears(sess.transformer) if ".lora_" not in n]
    assert left == []  # every block Linear is quantised (width 64: nf4 takes them all)
    assert same_bytes(base_bytes(sess.transformer), before)  # 12 optimizer steps moved no base byte
    assert same_bytes(before, base_bytes(quantized_backbone(scheme).transformer))  # a fresh quantisation: the same
    losses = _losses(run)
    assert len(losses) == STEPS and sum(losses[-4:]) < sum(losses[:4])
    # the checkpoint holds the trained tensors only (the base is rebuilt at resume); an unquantised run's, all
    trained = {n for n, p in sess.transformer.named_parameters() if p.requires_grad}
    assert set(load_file(str(run / "checkpoints" / "step-000012" / "model.safetensors"))) == trained
    assert set(load_file(str(runs["none"][0] / "checkpoints" / "step-000012" / "model.safetensors"))) > trained
    # the export is a plain LoRA (the unquantised run's keys and shapes) that records the base it was trained on
    lora, plain = (load_file(str(r / "lora" / "pytorch_lora_weights.safetensors")) for r in (run, runs["none"][0]))
    assert {k: v.shape for k, v in lora.items()} == {k: v.shape for k, v in plain.items()}
    assert json.loads((run / "lora" / "apexctl_lora.json").read_text())["trained_on_quantized_base"] == scheme
    assert "quantize: " + scheme in (run / "recipe.yaml").read_text()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_adapters_off_is_the_quantized_base(runs, scheme):
    """The base reference (adapters off) of the trained run is the freshly quantised base, to the bit; the
    quantised base differs from the unquantised one (the quantisation is real) by about its rounding."""
    from apexctl.lora import adapters_disabled
    from apexctl.models import load_backbone

    _, sess, _ = runs[scheme]
    cond = sess.cache.cond(torch.tensor([_first_prompt(sess.cache)] * 2))
    x = torch.randn(2, *sess.cache.latents.shape[1:], generator=torch.Generator().manual_seed(1))
    t = torch.tensor([1.0, 0.4])
    fresh = quantized_backbone(scheme)
    stored = base_bytes(fresh.transformer)
    plain = load_backbone(TINY, load_text_encoder=False, load_codec=False)
    with torch.no_grad():
        with adapters_disabled(sess.transformer):
            off = sess.backbone.velocity(x, t, cond)
        on = sess.backbone.velocity(x, t, cond)
        fresh.transformer.eval()  # as sample grids run it: bitsandbytes may repack for a CPU kernel in eval mode
        want, unq = fresh.velocity(x, t, cond), plain.velocity(x, t, cond)
    assert torch.equal(off, want)
    assert same_bytes(base_bytes(fresh.transformer), stored)  # an eval-mode forward left the stored bytes as they were
    assert not torch.equal(on, off)  # the adapter trained
    assert 1e-5 < float((want - unq).norm() / unq.norm()) < 0.2


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_bf16_base_computes_in_bf16_from_its_quantized_weights(scheme):
    """The compute dtype is recorded at quantisation (nf4 stores uint8 codes, torchao a tensor subclass): the
    samplers cast to it, and the quantised bf16 base draws what the bf16 base draws, up to its rounding."""
    from apexctl.inference import generate_latents
    from apexctl.models import load_backbone
    from apexctl.models.quantize import quantize_backbone

    bb, plain = (load_backbone(TINY, dtype=torch.bfloat16) for _ in range(2))
    quantize_backbone(bb, scheme)
    assert bb.compute_dtype == plain.compute_dtype == torch.bfloat16
    cond = bb.encode_prompts(["a handwritten digit seven"])
    kw = {"height": 32, "width": 32, "steps": 2, "method": "euler"}
    x, want = (generate_latents(b, cond, [0], **kw) for b in (bb, plain))
    assert 1e-4 < float((x - want).norm() / want.norm()) < 0.2


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if PACKAGES[s] == "torchao"])
def test_a_torchao_layer_keeps_no_weight_copy_for_backward(scheme, monkeypatch):
    """Through a quantised frozen Linear, y = x·Wᵀ + b and ∂L/∂x = g·W with W its dequantised weight, computed a
    block of rows of W at a time (7 here: 14 blocks, the last one short), autograd keeping no copy of W; under
    autocast an fp32 input is cast as autocast casts a linear's (bf16 out). torchao's own linear, called directly,
    keeps the dequantised weight for backward: the bf16 weights again at every step."""
    from torch import nn

    from apexctl.models import quantize
    from apexctl.models.quantize import FrozenQuantizedLinear, quantize_denoiser

    monkeypatch.setattr(quantize, "DEQUANT_CHUNK", 7 * 64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.ModuleList([nn.Linear(64, 96)]))  # the block Linears live in a ModuleList
    quantize_denoiser(model, scheme, torch.bfloat16)
    layer = model[0][0]
    assert type(layer) is FrozenQuantizedLinear and not layer.weight.requires_grad
    assert layer.in_blocks == (scheme == "fp8")
    w, b = layer.weight.dequantize().float(), layer.bias.float()

    def step(forward) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Size]]:
        saved: list[torch.Size] = []
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        g = torch.randn(5, 96, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(2))
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = forward(x)
        y.backward(g)
        return x, y, x.grad, g, saved

    x, y, grad, g, saved = step(layer)
    assert y.dtype == torch.bfloat16 and saved == []
    assert torch.allclose(y.float(), x.detach().bfloat16().float() @ w.T + b, rtol=1e-2, atol=1e-2)
    assert torch.allclose(grad, g.float() @ w, rtol=1e-2, atol=1e-2)  # bf16 matmul rounding
    _, _, own, _, own_saved = step(lambda x: nn.Linear.forward(layer, x.bfloat16()))  # torchao's linear
    assert torch.allclose(own.float(), grad, rtol=2e-2, atol=2e-2)
    assert any(s.numel() == w.numel() for s in own_saved)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_lora_in_the_stock_pipeline_equals_apexctl_sample_and_the_unquantized_run(home, runs, scheme):
    """The exported LoRA loads in the stock QwenImagePipeline and gives the one-step latents ``apexctl sample``
    draws (the LoRA on the unquantised base, what users deploy); those are within ONE_STEP_TOLERANCE of the
    unquantised run's, and within DEPLOY_TOLERANCE of what the quantised run itself computes."""
    from test_lora import _one_step_pipeline, _stock_one_step

    from apexctl.engine.sampler import one_step
    from apexctl.inference import load_trained
    from apexctl.models import resolve_model_path
    from apexctl.models.qwen_image import pack_latents
    from apexctl.recipe import load_recipe

    run, sess, _ = runs[scheme]
    row = _first_prompt(sess.cache)
    z = torch.randn(1, *sess.cache.latents.shape[1:], generator=torch.Generator().manual_seed(0))
    cond = sess.cache.cond(torch.tensor([row]))
    with torch.no_grad():
        ours = load_trained(load_recipe(run / "recipe.yaml"))
        x = one_step(ours, z, ours.encode_prompts([sess.cache.prompts[row]]))
        deployed = one_step(ours, z, cond)
        plain = load_trained(load_recipe(runs["none"][0] / "recipe.yaml"))
        unquantized = one_step(plain, z, cond)
        with sess.ema.swapped():  # the run's export is its EMA
            itself = one_step(sess.backbone, z, cond)
    pipe = _one_step_pipeline(resolve_model_path(TINY))
    stock = _stock_one_step(z, run / "lora", pipe=pipe, prompt=sess.cache.prompts[row])
    torch.testing.assert_close(stock, pack_latents(x), atol=1e-5, rtol=1e-5)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    assert 1e-6 < rel(deployed, unquantized) < ONE_STEP_TOLERANCE[scheme]
    assert 1e-6 < rel(itself, deployed) < DEPLOY_TOLERANCE[scheme]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_resume_rebuilds_the_base_and_is_bit_exact(home, runs, scheme):
    part = _recipe(home, f"part-{scheme}", scheme)
    out = ok(["distill", part, "--until", "6", "-q"])
    assert "checkpointed" in out or (home / f"part-{scheme}" / "checkpoints" / "step-000006").is_dir()
    ok(["distill", part, "--resume", "auto", "-q"])
    full, resumed = runs[scheme][0], home / f"part-{scheme}"
    a, b = (load_file(str(r / "lora" / "pytorch_lora_weights.safetensors")) for r in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(resumed) == _losses(full)
    # `apexctl export` of the last checkpoint (the adapter onto the unquantised base) is the run's own export
    ok(["export", full, "--out", home / f"export-{scheme}"])
    c = load_file(str(home / f"export-{scheme}" / "pytorch_lora_weights.safetensors"))
    assert c.keys() == a.keys() and all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_sample_and_eval_draw_with_the_base_quantized_as_in_training(home, runs, scheme, monkeypatch):
    """``--quantize`` (sample, eval): the run's LoRA on its base quantised again from the model folder gives what
    the quantised run itself computes (the same bytes: quantisation is deterministic); the image folders record
    it (a sample rerun without it redraws, geneval refuses to mix bases), and an unknown scheme or a missing
    library is one line, exit 2, before anything loads."""
    from apexctl.engine.sampler import one_step
    from apexctl.eval.sample_sets import set_folder, student_spec
    from apexctl.inference import load_sampling_model
    from apexctl.recipe import load_recipe

    run, sess, _ = runs[scheme]
    recipe = load_recipe(run / "recipe.yaml")
    row = _first_prompt(sess.cache)
    z = torch.randn(1, *sess.cache.latents.shape[1:], generator=torch.Generator().manual_seed(0))
    cond = sess.cache.cond(torch.tensor([row]))
    loaded = load_sampling_model(recipe, None, quantize=scheme)
    assert loaded.backbone.quantization == scheme and loaded.description.endswith(f"({scheme} base)")
    with torch.no_grad(), sess.ema.swapped():  # the run's export is its EMA
        drawn, itself = one_step(loaded.backbone, z, cond), one_step(sess.backbone, z, cond)
    assert float((drawn - itself).norm() / itself.norm()) < 1e-5

    out = home / f"sample-{scheme}"
    args = ["sample", "a handwritten digit seven", "--recipe", run / "recipe.yaml", "-n", "2", "--out", out, "-q"]
    ok([*args, "--quantize", scheme])
    first = json.loads((out / "samples.json").read_text())
    assert first["model"].endswith(f"({scheme} base)") and first["complete"]
    quantized_png = (out / "000_a-handwritten-digit-seven_seed0.png").read_bytes()
    ok(args)  # the unquantised base: another record, every image drawn again
    assert not json.loads((out / "samples.json").read_text())["model"].endswith("base)")
    assert (out / "000_a-handwritten-digit-seven_seed0.png").read_bytes() != quantized_png

    images = home / f"geneval-{scheme}"
    gen = ["eval", "geneval", "--recipe", run / "recipe.yaml", "--prompts", "0:1", "--per-prompt", "1", "--no-score",
           "--size", "32", "--images", images, "-q"]  # fmt: skip
    ok([*gen, "--quantize", scheme])
    assert json.loads((images / "generation.json").read_text())["quantize"] == scheme
    assert f"quantize='{scheme}'" in fails(gen)

    none, q = student_spec(recipe, 1), student_spec(recipe, 1, scheme)
    assert set_folder(run, none, ["p"], [0]) != set_folder(run, q, ["p"], [0]) and q.label.endswith(f"{scheme} base")
    for bad, needle in (("int4", "expected one of none, int8, fp8, nf4"), (scheme, f"pip install {PACKAGES[scheme]}")):
        if bad == scheme:
            monkeypatch.setitem(sys.modules, PACKAGES[scheme], None)  # as if not installed
        for cmd in ([*args, "--quantize", bad], [*gen, "--quantize", bad]):
            msg = fails(cmd)
            assert len(msg.strip().splitlines()) == 1 and needle in msg and "--quantize" in msg, msg


def test_a_separate_critic_shares_the_quantized_base(home):
    from apexctl.recipe import load_recipe
    from apexctl.training.hardware import make_accelerator
    from apexctl.training.session import setup

    scheme = SCHEMES[-1] if SCHEMES else pytest.skip("no quantisation library installed")
    recipe = load_recipe(_recipe(home, "critic", scheme, method={"reference": "ema", "critic": "separate"}))
    sess = setup(recipe, make_accelerator(recipe))
    frozen = [(n, p) for n, p in sess.transformer.named_parameters() if not p.requires_grad]
    critic = dict(sess.critic.named_parameters())
    assert frozen and all(critic[n] is p for n, p in frozen)
    assert all(not critic[n].requires_grad for n, _ in frozen) and sess.critic_params


@pytest.mark.skipif("int8" not in SCHEMES, reason="torchao is not installed")
def test_ddp_two_processes_with_a_torchao_base(home):
    """torchao's weights are tensor subclasses DDP's start-up broadcast cannot take: the frozen base is left out
    of DDP (it is equal on every rank by construction); save_checkpoint checks that the replicas agree."""
    r = _recipe(home, "ddp", "int8", train={"steps": 2, "micro_batch": 2, "checkpoint_every": 2})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "apexctl", "distill", str(r), "--launch", "2", "-q"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    info = json.loads((home / "ddp" / "checkpoints" / "step-000002" / "COMPLETE").read_text())
    assert info["world_size"] == 2 and len(set(info["param_checksums"])) == 1


def test_quantize_refuses_a_full_fine_tune_fsdp_and_a_missing_library(home, monkeypatch):
    def one_line(args, *needles):
        out = fails(args)
        assert len(out.strip().splitlines()) == 1 and all(n in out for n in needles), out

    one_line(["distill", _recipe(home, "full-q", "int8", model={"lora": None}), "-q"], "model.quantize", "full")
    fsdp = _recipe(home, "fsdp-q", "nf4", hardware={"strategy": "fsdp", "processes": 2})
    one_line(["distill", fsdp, "--dry-run"], "model.quantize = 'nf4'", "fsdp")
    for scheme, package in PACKAGES.items():
        monkeypatch.setitem(sys.modules, package, None)  # as if not installed
        one_line(["distill", _recipe(home, f"missing-{scheme}", scheme), "-q"], f"pip install {package}")
        assert not (home / f"missing-{scheme}").exists()  # refused before the run folder is made
        monkeypatch.delitem(sys.modules, package)


def test_synthesis_with_a_quantized_teacher(home, monkeypatch):
    """``data.synthesize.quantize``: part of the cache identity (absent when none, so older caches keep theirs);
    the teacher's samples differ from the unquantised teacher's by about the quantisation error; a missing
    library is exit 2 before the model loads."""
    from apexctl.data.cache import LatentCache

    scheme = SCHEMES[0] if SCHEMES else pytest.skip("no quantisation library installed")
    prompts = home / "prompts.txt"
    prompts.write_text("a red fox\na blue car\n")
    latents = {}
    for q in ("none", scheme):
        synthesize = {"steps": 3, "guidance": 2.0, "quantize": q}
        data = {"source": "prompts", "path": str(prompts), "limit": None, "cache_dir": str(home / f"cache-{q}")}
        r = _recipe(home, f"synth-{q}", data=data | {"synthesize": synthesize})
        ok(["prepare", r, "-q"])
        manifest = json.loads((home / f"cache-{q}" / "manifest.json").read_text())
        assert manifest["data"]["synthesize"].get("quantize") == (None if q == "none" else q)
        latents[q] = LatentCache.open(home / f"cache-{q}").latents[:]
    rel = float((latents[scheme] - latents["none"]).norm() / latents["none"].norm())
    assert 1e-6 < rel < 5e-3  # int8: measured 1.1e-3 (3 steps, CFG 2, the random tiny teacher)
    monkeypatch.setitem(sys.modules, PACKAGES[scheme], None)
    out = fails(["prepare", r, "-q"])
    assert "data.synthesize.quantize" in out and len(out.strip().splitlines()) == 1
