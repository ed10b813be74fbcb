"""Features the README promises that no other test exercised: merge-lora's --dtype and --keep-scheduler, the
--dry-run memory figures, bitsandbytes' 8-bit AdamW, a learnable shift's lr_scale and "the newest run under ./runs"
(signals and tensorboard: tests/test_signals.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from data_util import TINY_DIGITS, digits_recipe, fails, ok, save_random_lora, write_recipe
from safetensors.torch import load_file

GIB = 2**30


def _recipe(tmp: Path, name: str, **sections) -> Path:
    train = {"steps": 2, "lr_schedule": "constant", "warmup_steps": 0, "ema_decay": None, "seed": 2}
    return digits_recipe(
        tmp,
        name,
        method={"reference": "self"} | sections.pop("method", {}),
        train=train | sections.pop("train", {}),
        **sections,
    )


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """APEXCTL_HOME (where tiny builds are cached) for the module."""
    tmp = tmp_path_factory.mktemp("untested")
    mp = pytest.MonkeyPatch()
    mp.setenv("APEXCTL_HOME", str(tmp / "home"))
    yield tmp
    mp.undo()


@pytest.fixture(scope="module")
def workdir(home):
    """A prepared digits cache for the tiny digits model."""
    ok(["prepare", str(_recipe(home, "prep")), "-q"])
    return home


def _state_files(ck: Path) -> list:
    return [torch.load(p, weights_only=False) for p in sorted(ck.glob("custom_checkpoint_*.pkl"))]


def _base_weights(model: str) -> dict[str, torch.Tensor]:
    from apexctl.models import resolve_model_path

    return load_file(str(Path(resolve_model_path(model)) / "transformer" / "diffusion_pytorch_model.safetensors"))


# ---- merge-lora --dtype bf16 | fp16, --keep-scheduler -------------------------------------------------------------
@pytest.fixture(scope="module")
def merged(home):
    """A random rank-2 LoRA on the real-VAE tiny Qwen-Image, merged in fp32 (the reference) and in bf16 / fp16."""
    lora = save_random_lora("tiny:test", home / "lora-test")
    outs = {}
    for dtype in ("fp32", "bf16", "fp16"):
        outs[dtype] = home / f"merged-{dtype}"
        ok(["merge-lora", "--lora", lora, "--base", "tiny:test", "--out", outs[dtype], "--dtype", dtype])
    return lora, outs


def _transformer(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_merge_lora_dtype_casts_the_fp32_merge_and_loads_in_the_stock_pipeline(merged, home, dtype):
    """--dtype bf16|fp16: the transformer weights are the fp32 merge cast to that dtype (merged first, cast last);
    the folder loads in the stock pipeline in that dtype and its one step is apexctl's base + adapter up to the
    dtype's rounding (far from the base without the adapter); the parity check still runs (tolerance -1 fails)."""
    from diffusers import QwenImagePipeline

    from apexctl.engine.sampler import one_step
    from apexctl.models import load_backbone
    from apexctl.models.qwen_image import pack_latents

    lora, outs = merged
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    w, ref = _transformer(outs[dtype]), _transformer(outs["fp32"])
    assert w.keys() == ref.keys() and not any("lora_" in k for k in w)
    assert {v.dtype for v in w.values()} == {tdtype}
    for k in w:
        assert torch.equal(w[k], ref[k].to(tdtype)), k
    base = _base_weights("tiny:test")
    assert any(not torch.equal(ref[k], base[k]) for k in ref)  # the adapter was merged in

    bb = load_backbone("tiny:test")
    plain = bb.encode_prompts(["any digit"])
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        without = pack_latents(one_step(bb, z, plain))
        bb.load_lora(lora)
        ours = pack_latents(one_step(bb, z, bb.encode_prompts(["any digit"])))
    pipe = QwenImagePipeline.from_pretrained(str(outs[dtype]), torch_dtype=tdtype)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.dtype == tdtype
    stock = pipe(
        "any digit",
        num_inference_steps=1,
        height=32,
        width=32,
        latents=pack_latents(z).to(tdtype),
        output_type="latent",
        true_cfg_scale=1.0,
    ).images
    assert stock.dtype == tdtype and torch.isfinite(stock).all()
    err, effect = float((stock.float() - ours).abs().max()), float((without - ours).abs().max())
    assert err < 0.05 * float(ours.abs().max()) and effect > 20 * err, (err, effect)

    out = home / f"merged-{dtype}-strict"
    res = fails(
        ["merge-lora", "--lora", lora, "--base", "tiny:test", "--out", out, "--dtype", dtype, "--tolerance", "-1"], 1
    )
    assert "merge parity failed" in res and not out.exists()


def test_merge_lora_drops_shift_terminal_unless_keep_scheduler(merged, home):
    """Qwen-Image's scheduler config has shift_terminal (NaN at one step in diffusers): merged folders get the
    scheduler without it; --keep-scheduler keeps the base's config unchanged."""
    from apexctl.models import resolve_model_path

    lora, outs = merged
    base = json.loads((Path(resolve_model_path("tiny:test")) / "scheduler" / "scheduler_config.json").read_text())
    assert base["shift_terminal"] == 0.02
    kept = home / "merged-kept"
    ok(["merge-lora", "--lora", lora, "--base", "tiny:test", "--out", kept, "--keep-scheduler"])
    for folder, want in ((outs["fp32"], None), (kept, 0.02)):
        cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        assert cfg.get("shift_terminal") == want, folder
        drop = ("shift_terminal", "_diffusers_version")
        assert {k: v for k, v in cfg.items() if k not in drop} == {k: v for k, v in base.items() if k not in drop}
    wk, wf = _transformer(kept), _transformer(outs["fp32"])
    assert wk.keys() == wf.keys() and all(torch.equal(wk[k], wf[k]) for k in wk)


# ---- distill --dry-run: the memory figures, by hand -------------------------------------------------------------
# A Qwen-Image transformer of 80 M parameters: large enough for the GiB figures (2 decimals) to tell the terms
# apart; it is never built with weights (the dry run reads only transformer/config.json).
BIG = {
    "_class_name": "QwenImageTransformer2DModel",
    "attention_head_dim": 128,
    "num_attention_heads": 8,  # hidden 1024
    "num_layers": 2,
    "joint_attention_dim": 1024,
    "in_channels": 64,
    "out_channels": 16,
    "patch_size": 2,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": False,
}
MEMORY = re.compile(
    r"memory     per GPU ≈ (?P<total>[\d.]+) GiB: weights (?P<weights>[\d.]+) \+ grads (?P<grads>[\d.]+) \+ "
    r"(?P<opt>adamw8bit|adamw) states (?P<states>[\d.]+) \+ EMA (?P<ema>[\d.]+)(?P<fsdp> \(FSDP: /\d+\))? \+ "
    r"activations ≈ (?P<acts>[\d.]+) \(rough: (?P<formula>.+)\)$",
    re.M,
)


def _count(config: dict, lora_rank: int = 0, targets: tuple[str, ...] = ()) -> tuple[int, int]:
    """(parameters, LoRA parameters) counted here: the model built on the meta device, and r·(in + out) for each
    Linear whose name ends in a target."""
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, config["_class_name"]).from_config(config)
    total = sum(p.numel() for p in model.parameters())
    adapter = sum(
        lora_rank * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )
    return total, adapter


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


@pytest.mark.parametrize("case", ["full-fp32-ema", "lora-bf16", "fsdp-8bit-checkpointing"])
def test_dry_run_memory_figures_match_the_hand_computed_bytes(tmp_path, case):
    """params = the model's parameter count; weights = frozen × bytes of model.dtype + trained × 4; grads = trained
    × 4; AdamW states = trained × 8 (8-bit: × 2); EMA = trained × 4; FSDP divides these by the process count;
    activations = micro_batch × 2 branches × (image tokens + 256) × hidden × blocks × bytes × (16, or 2 with
    gradient checkpointing)."""
    model = tmp_path / "big"
    (model / "transformer").mkdir(parents=True)
    (model / "transformer" / "config.json").write_text(json.dumps(BIG))
    total, _ = _count(BIG)
    assert 70e6 < total < 90e6
    res, tokens, hidden, blocks = 512, (512 // 16) ** 2 + 256, 1024, 2  # VAE /8 × patch 2
    sections = {
        "model": {"path": str(model)},
        "data": {"resolution": res, "cache_dir": str(tmp_path / "cache")},
        "train": {"micro_batch": 3},
        "hardware": {"device": "cuda"},  # bf16 activations (2 bytes)
    }
    frozen, trained, shards, act_bytes, k, opt = 0, total, 1, 2, 16, 8
    ema = 0
    sections["train"] |= {"ema_decay": None}
    sections["method"] = {"objective": "apex", "reference": "self"}  # its 2 trained branches
    if case == "full-fp32-ema":
        sections["train"]["ema_decay"] = 0.9
        ema = 4 * total
    elif case == "lora-bf16":
        targets = ("to_q", "to_k")
        _, adapter = _count(BIG, 16, targets)
        sections["model"] |= {"dtype": "bf16", "family": "qwen_image", "lora": {"rank": 16, "targets": list(targets)}}
        frozen, trained = total, adapter
    else:
        sections["train"] |= {"optimizer": "adamw8bit"}
        sections["hardware"] = {"device": "cpu", "strategy": "fsdp", "processes": 2, "gradient_checkpointing": True}
        shards, act_bytes, k, opt = 2, 4, 2, 2  # CPU: fp32 activations
    r = write_recipe(tmp_path, "dry", {}, sections)
    out = ok(["distill", str(r), "--dry-run"])

    params = next(x for x in out.splitlines() if x.startswith("params"))
    assert params.startswith(f"params     {frozen + trained:,} denoiser parameters"), params
    assert f"{trained:,} trainable" in params
    m = MEMORY.search(out)
    assert m is not None, out
    weights = (2 * frozen + 4 * trained) / shards
    grads, states, ema = 4 * trained / shards, opt * trained / shards, ema / shards
    acts = 3 * 2 * tokens * hidden * blocks * act_bytes * k
    got = {key: m[key] for key in ("weights", "grads", "states", "ema", "acts", "total")}
    want = {
        "weights": _gib(weights),
        "grads": _gib(grads),
        "states": _gib(states),
        "ema": _gib(ema),
        "acts": _gib(acts),
        "total": _gib(weights + grads + states + ema + acts),
    }
    assert got == want, out
    assert m["formula"] == f"3 × 2 branch(es) × {tokens} tokens × {hidden} × {blocks} blocks × {act_bytes} B × {k}"
    assert bool(m["fsdp"]) == (shards > 1) and m["opt"] == sections["train"].get("optimizer", "adamw")


# ---- train.optimizer: adamw8bit ---------------------------------------------------------------------------------
def test_adamw8bit_is_bitsandbytes_and_trains(workdir):
    """bitsandbytes' 8-bit AdamW (it runs on CPU in bitsandbytes 0.50; the dev extra installs it): the
    checkpointed optimizer state is bnb's (uint8 moments with their quantisation maps, no torch exp_avg), and the
    steps move the weights."""
    pytest.importorskip("bitsandbytes")
    r = _recipe(workdir, "8bit", train={"optimizer": "adamw8bit"})
    ok(["distill", str(r), "-q"])
    ck = workdir / "8bit" / "checkpoints" / "step-000002"
    opt = torch.load(ck / "optimizer.bin", weights_only=False)
    # bitsandbytes >= 0.48 nests its tensors under one key in state_dict(); older versions keep them flat
    states = [s.get("__bnb_optimizer_quant_state__", s) for s in opt["state"].values()]
    assert states and not any("exp_avg" in s for s in states)
    eight = [s for s in states if "state1" in s and s["state1"].dtype == torch.uint8]
    assert eight and all("qmap1" in s and "absmax1" in s and s["state2"].dtype == torch.uint8 for s in eight)
    trained, base = load_file(str(ck / "model.safetensors")), _base_weights(TINY_DIGITS)
    moved = [k for k in base if not torch.equal(trained[k], base[k])]
    assert len(moved) > 0.5 * len(base), (len(moved), len(base))


@pytest.mark.parametrize(
    ("module", "sections", "message"),
    [
        ("bitsandbytes", {"train": {"optimizer": "adamw8bit"}}, "train.optimizer = 'adamw8bit' needs bitsandbytes"),
        ("tensorboard", {"train": {"log_with": "tensorboard"}}, "needs the tensorboard package"),
    ],
)
def test_a_missing_optional_package_exits_2_before_anything_loads(home, monkeypatch, module, sections, message):
    """The dev extra installs both packages; without them (an import that fails) distill exits 2 with one line."""
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError, as when not installed
    r = _recipe(home, f"missing-{module}", data={"cache_dir": str(home / "no-cache")}, **sections)
    out = fails(["distill", str(r), "-q"])
    assert message in out.strip().splitlines()[-1] and "Traceback" not in out, out
    assert not (home / f"missing-{module}").exists()


# ---- method.shift.lr_scale --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shift_runs(workdir):
    """One constant-LR AdamW step with a learnable shift, at lr_scale 1 and 4 (same data, same start)."""
    runs = {}
    for scale in (1.0, 4.0):
        name = f"shift-x{scale:g}"
        shift = {"learnable": True, "lr_scale": scale}
        ok(["distill", str(_recipe(workdir, name, method={"shift": shift}, train={"steps": 1})), "-q"])
        runs[scale] = workdir / name
    return runs


def test_shift_lr_scale_scales_the_shift_group_and_its_update(shift_runs):
    """The shift's parameter group has lr = train.lr × lr_scale (the denoiser's keeps train.lr), and its first
    AdamW update (≈ lr·sign(g) at step 1) scales with it; the denoiser's update does not change."""
    lr = 1e-3
    moves = {}
    for scale, run in shift_runs.items():
        ck = run / "checkpoints" / "step-000001"
        opt = torch.load(ck / "optimizer.bin", weights_only=False)
        groups = opt["param_groups"]
        assert len(groups) == 2 and len(groups[1]["params"]) == 2  # the denoiser; the shift's a and b
        assert groups[0]["lr"] == pytest.approx(lr, rel=1e-12)
        assert groups[1]["lr"] == pytest.approx(lr * scale, rel=1e-12) and groups[1]["weight_decay"] == 0.0
        shift = next(s for s in _state_files(ck) if isinstance(s, dict) and set(s) == {"a", "b"})
        moves[scale] = float(shift["a"]) + 1.0  # from a = -1 (b: no gradient at the projection site on Qwen-Image)
        assert json.loads((run / "shift.json").read_text())["a"] == float(shift["a"])
    assert abs(moves[1.0]) == pytest.approx(lr, rel=1e-2)
    assert moves[4.0] == pytest.approx(4 * moves[1.0], rel=1e-3)
    w1, w4 = (load_file(str(run / "checkpoints" / "step-000001" / "model.safetensors")) for run in shift_runs.values())
    assert all(torch.equal(w1[k], w4[k]) for k in w1)


# ---- apexctl sample without a model: the newest run under ./runs -------------------------------------------------
def _set_mtime(path: Path, t: float) -> None:
    os.utime(path, (t, t))


def test_sample_without_a_model_takes_the_run_trained_last(shift_runs, tmp_path, monkeypatch):
    """`apexctl sample` with neither --model nor --recipe samples the run under ./runs whose model/ (full) or lora/
    (LoRA) was written last: not the run folder touched last, not the newest recipe.yaml, not the last name, and
    never a run still training (no model/ yet)."""
    trained = shift_runs[1.0]
    runs = tmp_path / "runs"
    for name in ("zeta", "alpha"):
        (runs / name).mkdir(parents=True)
        shutil.copy(trained / "recipe.yaml", runs / name / "recipe.yaml")
        shutil.copytree(trained / "model", runs / name / "model")
    lora_run = runs / "beta-lora"
    lora_run.mkdir()
    rec = yaml.safe_load((trained / "recipe.yaml").read_text())
    rec["model"]["lora"] = {"rank": 2, "alpha": 2.0}
    (lora_run / "recipe.yaml").write_text(yaml.safe_dump(rec))
    save_random_lora(TINY_DIGITS, lora_run / "lora")
    training = runs / "omega"  # started last, no model yet
    (training / "checkpoints").mkdir(parents=True)
    shutil.copy(trained / "recipe.yaml", training / "recipe.yaml")

    t0 = 1_700_000_000.0
    _set_mtime(runs / "zeta" / "model", t0)
    _set_mtime(lora_run / "lora", t0 + 100)
    _set_mtime(runs / "alpha" / "model", t0 + 200)  # the newest trained model
    _set_mtime(runs / "alpha" / "recipe.yaml", t0 + 10)
    _set_mtime(runs / "alpha", t0 + 10)
    for p in (runs / "zeta" / "recipe.yaml", runs / "zeta", lora_run / "recipe.yaml", lora_run):
        _set_mtime(p, t0 + 300)  # newer folders and recipes than alpha's
    for p in (training / "recipe.yaml", training / "checkpoints", training):
        _set_mtime(p, t0 + 400)
    monkeypatch.chdir(tmp_path)

    def sample() -> tuple[Path, dict]:
        out = ok(["sample", "a handwritten digit seven", "-n", "1", "-q"])
        folders = [p.parent.parent for p in runs.glob("*/samples/samples.json")]
        assert len(folders) == 1, (folders, out)
        info = json.loads((folders[0] / "samples" / "samples.json").read_text())
        shutil.rmtree(folders[0] / "samples")
        return folders[0], info

    run, info = sample()
    assert run == runs / "alpha" and info["model"] == str(Path("runs") / "alpha" / "model"), info
    # a LoRA run trained later is newer: base + its lora/
    _set_mtime(lora_run / "lora", t0 + 250)
    run, info = sample()
    assert run == lora_run and info["model"].endswith(f"+ LoRA {Path('runs') / 'beta-lora' / 'lora'}"), info
