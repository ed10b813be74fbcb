"""Issue 15: the published configs, bench/memory.py's measuring functions and fit, and the dry run's measured
activations (apexctl/models/configs/activations.json)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from apexctl.memory_plan import (
    activation_table,
    architecture_name,
    memory_lines,
    pixels_per_token,
    published_config_name,
    shipped_configs,
)
from apexctl.models.quantize import PACKAGES
from apexctl.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
#: the quantisation schemes whose library this machine has
INSTALLED = [s for s in ("int8", "fp8", "nf4") if importlib.util.find_spec(PACKAGES[s]) is not None]


def _bench(name: str):
    """bench/<name>.py as a module (bench/ is scripts, not a package)."""
    key = f"apexctl_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "bench" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


# ---- the published configs ------------------------------------------------------------------------------------
#: published sizes: Qwen-Image 20.4 B, FLUX.1-dev 12 B (11.9 B), SD3.5 Medium 2.5 B (its weights: the parameters
#: and the 384² positional-embedding table, a buffer in diffusers), SANA 1.6 B / 0.6 B, Z-Image 6 B (6.15 B of
#: weights in the hub's transformer files)
PUBLISHED = {
    "qwen_image": 20.4e9,
    "flux_dev": 11.9e9,
    "sd3.5_medium": 2.5e9,
    "sana_1600m": 1.6e9,
    "sana_600m": 0.6e9,
    "z_image": 6.15e9,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_config_builds_on_meta_at_the_published_size(name):
    import diffusers
    from accelerate import init_empty_weights

    cfg = shipped_configs()[name]
    assert name == "qwen_image" or "diffusers" in cfg["_source"]  # where the values came from
    with init_empty_weights(include_buffers=True):
        model = getattr(diffusers, cfg["transformer"]["_class_name"]).from_config(cfg["transformer"])
    params = dict(model.named_parameters())
    weights = sum(t.numel() for k, t in model.state_dict().items() if k in params or "pos_embed" in k)
    assert weights == pytest.approx(PUBLISHED[name], rel=0.02), weights


def test_each_family_and_hub_id_finds_its_config_and_token_geometry():
    """Family → file (flux → flux_dev.json, …), a hub id listed in a file wins (the SANA sizes), a local folder's
    config equal to a published one is recognised; pixels per token = codec factor × patch (FLUX packs 2×2)."""
    assert published_config_name("flux", "x/unknown") == "flux_dev"
    assert published_config_name("sana", "Efficient-Large-Model/Sana_600M_512px_diffusers") == "sana_600m"
    assert published_config_name("sana", "Efficient-Large-Model/Sana_1600M_512px_diffusers") == "sana_1600m"
    for name, cfg in shipped_configs().items():
        local = {**cfg["transformer"], "_diffusers_version": "0.42.1", "sample_size": 99}
        assert architecture_name(local) == name
    assert architecture_name({**shipped_configs()["qwen_image"]["transformer"], "num_layers": 2}) is None
    px = {n: pixels_per_token(c["transformer"], c["vae"]) for n, c in shipped_configs().items()}
    assert px == {"qwen_image": 16, "flux_dev": 16, "sd3.5_medium": 16, "sana_1600m": 32, "sana_600m": 32,
                  "z_image": 16}  # fmt: skip


# ---- the measuring functions on a tiny config ------------------------------------------------------------------
#: Qwen-Image's architecture at CPU size (the module names of the real one, so the recipe's LoRA targets apply)
TINY = {
    **shipped_configs()["qwen_image"]["transformer"],
    "num_layers": 4,
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "joint_attention_dim": 64,
    "axes_dims_rope": [8, 12, 12],
}


def _tiny_step(
    objective: str, resolution: int, gc: bool, rank: int = 4, quantize: str = "none"
) -> tuple[dict, dict, dict, object]:
    """One measured training step of the tiny model: (step figures, state bytes, the base's parameters and Linear
    layers before the adapter, the step's parts)."""
    from apexctl.models.quantize import quantize_backbone

    m = _bench("memory")
    recipe = load_recipe(
        ROOT / "recipes" / "qwen_lora.yaml",
        [f"method.objective={objective}", f"model.lora.rank={rank}", f"model.lora.alpha={rank}"],
    )
    torch.manual_seed(0)
    bb = m.build_backbone("qwen_image", TINY, shipped_configs()["qwen_image"]["vae"], "cpu", torch.bfloat16)
    base = {n: (p.numel(), p.dtype) for n, p in bb.transformer.named_parameters()}
    linears = {n: (mod.in_features, mod.out_features) for n, mod in bb.transformer.named_modules()
               if isinstance(mod, torch.nn.Linear)}  # fmt: skip
    quantize_backbone(bb, quantize)
    if gc:
        bb.transformer.enable_gradient_checkpointing()
    x = torch.randn(1, *bb.latent_shape(resolution, resolution))
    cond, uncond = (m.synthetic_cond(bb, 1, 8, "cpu", torch.bfloat16) for _ in range(2))
    parts = m.training_parts(recipe, bb, uncond)
    opt = torch.optim.AdamW(parts.trained, lr=1e-4)
    step = m.measure_step(bb, parts, x, cond, opt)
    return step, m.state_bytes(bb.transformer, parts, opt), {"params": base, "linears": linears}, parts


def test_state_bytes_are_the_hand_computed_ones():
    """LoRA r=4 on the recipe's targets: the frozen base in bf16 (2 B), the adapter r·(in + out) per targeted
    Linear in fp32 (4 B), fp32 gradients, AdamW's two fp32 moments + a 4-byte step counter per tensor, the EMA."""
    step, state, before, parts = _tiny_step("flow_matching", 64, gc=False)
    assert step["loss_finite"]
    targets = load_recipe(ROOT / "recipes" / "qwen_lora.yaml").model.lora.targets
    hit = [io for name, io in before["linears"].items() if any(name == t or name.endswith("." + t) for t in targets)]
    adapter = sum(4 * (i + o) for i, o in hit)  # r = 4: A is r × in, B is out × r
    tensors = 2 * len(hit)
    base = before["params"]
    assert all(dtype == torch.bfloat16 for _, dtype in base.values())
    assert state["frozen"] == 2 * sum(n for n, _ in base.values())
    assert state["trained"] == 4 * adapter == state["grads"] == state["ema"]
    assert state["optimizer"] == 8 * adapter + 4 * tensors
    assert state["base_copy"] == 0 and len(parts.trained) == tensors


@pytest.mark.parametrize("scheme", [s for s in ("int8", "nf4") if s in INSTALLED])
def test_quantized_base_state_is_its_stored_bytes_and_its_weights_are_not_activations(scheme):
    """With a quantised base (bench/memory.py --quantize): the block Linears' weights count at their stored bytes
    (int8: 1 B per weight + a scale and zero point per output row; nf4: ½ B + an absmax per 64 weights + a code
    book per layer; the rest of the model stays bf16), the adapter state is the bf16 base's, and the quantised
    weights autograd saves for backward are state, not activations: the saved bytes are the bf16 base's ± 5%."""
    from apexctl.models.quantize import block_linears

    m = _bench("memory")
    bb = m.build_backbone("qwen_image", TINY, shipped_configs()["qwen_image"]["vae"], "cpu", torch.bfloat16)
    layers = [layer for *_, layer in block_linears(bb.transformer)]
    n, rows = sum(x.weight.numel() for x in layers), sum(x.out_features for x in layers)
    rest = 2 * (sum(p.numel() for p in bb.transformer.parameters()) - n)
    codes, overhead = (n, 8 * rows) if scheme == "int8" else (n / 2, 4 * n / 64 + 2048 * len(layers))
    ref, ref_state, _, _ = _tiny_step("apex", 64, gc=True)
    step, state, _, _ = _tiny_step("apex", 64, gc=True, quantize=scheme)
    assert step["loss_finite"] and step["peak"] > 0
    assert codes < state["frozen"] - rest <= codes + overhead
    assert state["frozen"] < 0.75 * ref_state["frozen"]
    assert {k: state[k] for k in ("trained", "grads", "optimizer", "ema")} == {
        k: ref_state[k] for k in ("trained", "grads", "optimizer", "ema")
    }
    assert step["saved"] == pytest.approx(ref["saved"], rel=0.05)


def test_activation_bytes_grow_with_tokens_and_drop_with_checkpointing():
    peaks = {(res, gc): _tiny_step("apex", res, gc)[0] for res in (64, 128) for gc in (False, True)}
    for (res, gc), s in peaks.items():
        assert s["peak"] > 0 and s["after_forward"] > 0 and s["saved"] > 0, (res, gc, s)
        assert s["peak"] >= s["after_forward"]
    for gc in (False, True):
        assert peaks[(128, gc)]["peak"] > peaks[(64, gc)]["peak"]
        assert peaks[(128, gc)]["saved"] > peaks[(64, gc)]["saved"]
    for res in (64, 128):  # 4 blocks: their inputs + one recomputed block instead of all four blocks' internals
        assert peaks[(res, True)]["after_forward"] < peaks[(res, False)]["after_forward"]
        assert peaks[(res, True)]["saved"] < peaks[(res, False)]["saved"]


def test_peak_meter_counts_what_is_live_at_the_peak():
    """CPU: 4 MB then 12 MB more with the first freed in between: peak 12 MB above the start, 8 MB live at the mark."""
    m = _bench("memory")
    keep = torch.ones(10)  # allocated before: not counted
    meter = m.PeakMeter(torch.device("cpu"))
    with meter.measuring():
        a = torch.empty(1_000_000, dtype=torch.float32)
        b = torch.empty(2_000_000, dtype=torch.float32)
        meter.mark("both")
        del a
        c = torch.empty(1_000_000, dtype=torch.float32)
        del b, c
    assert meter.peak == 12_000_000 and meter.marks["both"] == 12_000_000 and keep.numel() == 10


def test_fit_recovers_a_known_line_and_checks_it():
    """Rows made from bytes = fixed + rows·N·per_token per block (kept when backward starts) and for the rest
    (the transient the peak adds once): the fit gives back both parts of the block and the rest, and every check
    (extrapolation, batch, depth) is exact."""
    m = _bench("memory")
    arch = m.ARCHS["qwen_image"]
    fb, ab, fr, ar, transient = 5e6, 1000.0, 7e6, 300.0, 2e6
    rows = []
    for label, (res, text) in m.points(arch).items():
        n = m.tokens(arch, res, text)
        for batch in (1, 4) if label == "low" else (1,):
            for variant, k in (("a", 1), ("b", 2), ("d", 3)):
                kept = fr - transient + batch * ar * n + k * (fb + batch * ab * n)
                rows.append({"arch": arch.name, "variant": variant, "resolution": res, "text_tokens": text,
                             "objective": "flow_matching", "gc": True, "batch": batch, "after_forward": kept,
                             "peak": kept + transient, "recipe": "recipes/qwen_lora.yaml",
                             "trained": "lora"})  # fmt: skip
    fit = m.fit(rows)["qwen_image"]["objectives"]["flow_matching"]["checkpointing"]
    assert fit["blocks"] == 60
    assert fit["per_block"]["bytes_per_row_token"] == pytest.approx(ab)
    assert fit["per_block"]["fixed_bytes"] == pytest.approx(fb)
    assert fit["rest"]["bytes_per_row_token"] == pytest.approx(ar)
    assert fit["rest"]["fixed_bytes"] == pytest.approx(fr)
    assert set(fit["checks"]) == {"extrapolation", "batch", "depth"}
    assert all(abs(c["error"]) < 1e-9 for c in fit["checks"].values())
    n = m.tokens(arch, 1024, 256)
    assert m.predict(fit, 3, n) == pytest.approx(60 * (fb + 3 * ab * n) + fr + 3 * ar * n)


# ---- the dry run ----------------------------------------------------------------------------------------------
def _acts(lines: list[str]) -> tuple[float, str]:
    m = re.search(r"activations ≈ (?P<gib>[\d.]+) \((?P<how>.+)\)$", next(x for x in lines if x.startswith("memory")))
    assert m is not None, lines
    return float(m["gib"]), m["how"]


def test_qwen_lora_dry_run_uses_the_measured_table():
    """recipes/qwen_lora.yaml (apex_full, gradient checkpointing, micro-batch 4, 512²): blocks × (fixed + rows ×
    tokens × per token) + the rest, from activations.json's qwen_image entry, named in the line."""
    table = activation_table()
    assert {"qwen_image", "flux_dev", "sd3.5_medium", "sana_1600m", "sana_600m", "z_image"} <= set(table)
    assert "machine" in table["_provenance"] and "command" in table["_provenance"]
    r = load_recipe(ROOT / "recipes" / "qwen_lora.yaml")
    fit = table["qwen_image"]["objectives"]["apex_full"]["checkpointing"]
    n = (512 // 16) ** 2 + table["qwen_image"]["text_tokens"]
    pb, rest = fit["per_block"], fit["rest"]
    want = 60 * (pb["fixed_bytes"] + 4 * n * pb["bytes_per_row_token"]) + rest["fixed_bytes"]
    want += 4 * n * rest["bytes_per_row_token"]
    gib, how = _acts(memory_lines(r))
    assert how.startswith("measured: 60 blocks") and "qwen_image lora apex_full" in how and "activations.json" in how
    assert f"4 row(s) × {n} tokens" in how
    assert gib == pytest.approx(want / GIB, abs=0.005)


@pytest.mark.parametrize(
    ("recipe", "overrides", "why"),
    [
        ("qwen_full.yaml", [], "full fine-tune under FSDP: not measured"),
        ("qwen_lora.yaml", ["method.objective=apex_paper"], "no entry for apex_paper"),
        ("qwen_lora.yaml", ["model.path=tiny:test", "model.family=auto"], "an architecture without an entry"),
    ],
)
def test_dry_run_falls_back_to_the_rough_formula_where_the_table_has_no_entry(recipe, overrides, why):
    r = load_recipe(ROOT / "recipes" / recipe, overrides)
    _, how = _acts(memory_lines(r))
    assert how.startswith("rough: "), why


def test_a_family_without_a_table_entry_falls_back(monkeypatch):
    """FLUX measured: 'measured'; the same recipe with the flux_dev entry taken out of the table: 'rough'."""
    import apexctl.memory_plan as mp

    r = load_recipe(ROOT / "recipes" / "flux_dev_lora.yaml")
    assert _acts(memory_lines(r))[1].startswith("measured: 57 blocks")
    table = {k: v for k, v in activation_table().items() if k != "flux_dev"}
    monkeypatch.setattr(mp, "activation_table", lambda: table)
    gib, how = _acts(memory_lines(r))
    tokens = (1024 // 16) ** 2 + 256
    assert how == f"rough: 4 × 1 branch(es) × {tokens} tokens × 3072 × 57 blocks × 2 B × 2"
    assert gib == pytest.approx(4 * tokens * 3072 * 57 * 2 * 2 / GIB, abs=0.005)


def test_full_batch_multiplies_the_rows_by_the_active_groups():
    base = load_recipe(ROOT / "recipes" / "qwen_lora.yaml")
    full = load_recipe(ROOT / "recipes" / "qwen_lora.yaml", ["method.full_batch=true"])
    (g1, h1), (g4, h4) = _acts(memory_lines(base)), _acts(memory_lines(full))
    assert "4 row(s)" in h1
    assert "4 × 4 groups (full_batch) row(s)" in h4 and g4 > g1


def test_shipped_table_is_what_the_bench_fits_from_its_results():
    """activations.json holds bench/memory.py's fit of bench/results/memory.jsonl (same numbers), the quantised
    bases' own fits included."""
    m = _bench("memory")
    rows = [r for r in m.read_rows(ROOT / "bench" / "results" / "memory.jsonl") if r["device"] == "cpu"]
    fitted = json.loads(json.dumps(m.with_quantized(m.fit(rows), rows)))
    shipped = {k: v for k, v in activation_table().items() if not k.startswith("_")}
    assert fitted == shipped
    assert set(shipped["qwen_image"]["quantized"]) == {"int8", "fp8", "nf4"}


def test_dry_run_takes_a_quantized_bases_activations_from_its_own_measured_steps():
    """qwen_lora.yaml at 512²: int8 / fp8 fitted from their own steps (one layer's dequantised weight at the peak:
    more than bf16's, by less than 5 %), nf4 as bf16; a family measured without a quantised base says so."""
    acts = {}
    for q in ("none", "int8", "fp8", "nf4"):
        line = memory_lines(load_recipe(ROOT / "recipes" / "qwen_lora.yaml", [f"model.quantize={q}"]))[1]
        acts[q] = float(re.search(r"activations ≈ (?P<a>[\d.]+)", line)["a"])
        assert (f"{q} base, activations.json" in line) == (q != "none")
    assert acts["none"] < acts["int8"] == acts["fp8"] < acts["none"] * 1.05
    assert acts["nf4"] == pytest.approx(acts["none"], abs=0.01)
    line = memory_lines(load_recipe(ROOT / "recipes" / "flux_dev_lora.yaml", ["model.quantize=int8"]))[1]
    assert "bf16 base's fit, int8 not measured" in line


def test_flops_of_the_whole_model_are_blocks_times_per_block_plus_rest():
    """bench/flops.py on Qwen-Image at 512² (meta device): per block = 2 × 113.2 M multiply-adds per token × 1,280
    tokens + attention's two products (4 × 1,280² × 3,072) + the two streams' modulation of the time embedding
    (3,072 → 6 × 3,072, once per sample); the composed whole equals the whole model counted."""
    a = _bench("flops").arch_flops("qwen_image")
    n = 1024 + 256
    per_token = 2 * (4 * 3072 * 3072 + 2 * 3072 * 12288)  # q, k, v, out + the 4× MLP, per stream
    modulation = 2 * 2 * 3072 * 6 * 3072
    assert a["per_block_flops"]["block"] == per_token * n + 4 * n * n * 3072 + modulation
    assert (
        a["forward_flops"] == a["forward_flops_counted_whole"] == 60 * a["per_block_flops"]["block"] + a["rest_flops"]
    )


@pytest.mark.parametrize("scheme, per_weight", [("int8", 1.002), ("fp8", 1.001), ("nf4", 0.516)])
def test_quantized_base_shrinks_the_weight_term_by_the_schemes_bytes(scheme, per_weight):
    """model.quantize on qwen_lora.yaml: the block Linears (all but 0.23 % of the base) in the scheme's bytes per
    weight, the rest in bf16, the adapter in fp32 — int8 about half the bf16 base's term, nf4 about a quarter."""
    r = load_recipe(ROOT / "recipes" / "qwen_lora.yaml")
    q = load_recipe(ROOT / "recipes" / "qwen_lora.yaml", [f"model.quantize={scheme}"])

    def weights(lines: list[str]) -> float:
        return float(re.search(r"weights (?P<w>[\d.]+) \+", lines[1])["w"])

    base, adapter = 20_430_401_088, 425_279_488
    stored = 20_384_317_440  # the 60 blocks' Linear weights (quantize.block_linears), counted on meta
    lines = memory_lines(q)
    assert f"{stored:,} base weights stored {scheme}" in lines[0]
    want = ((base - stored) * 2 + stored * per_weight + adapter * 4) / GIB
    assert weights(lines) == pytest.approx(want, abs=0.006)
    bf16_base = weights(memory_lines(r)) - adapter * 4 / GIB
    assert (weights(lines) - adapter * 4 / GIB) / bf16_base == pytest.approx(per_weight / 2, abs=0.002)


def test_offload_keys_move_their_terms_to_cpu_memory():
    """hardware.ema_on_cpu moves the EMA term, offload_base all but two blocks' frozen weights (Qwen-Image: 60 equal
    blocks, so 58/60 of the block weights), offload_activations all but one block's share of the activations."""
    from apexctl.memory_plan import block_weights_on_meta, shipped_configs

    base = load_recipe(ROOT / "recipes" / "qwen_lora.yaml")
    off = load_recipe(
        ROOT / "recipes" / "qwen_lora.yaml",
        ["hardware.offload_activations=true", "hardware.ema_on_cpu=true", "hardware.offload_base=true"],
    )
    plain, moved = memory_lines(base), memory_lines(off)
    assert not any(x.startswith("offload") for x in plain) and moved[-1].startswith("offload")

    def host(name: str) -> float:
        return float(re.search(re.escape(name) + r" (?P<v>[\d.]+)", moved[-1])["v"])

    ema = float(re.search(r"EMA (?P<e>[\d.]+)", plain[1])["e"])
    assert host("EMA (ema_on_cpu)") == pytest.approx(ema, abs=0.01) and "EMA 0.00" in moved[1]
    in_blocks, largest = block_weights_on_meta(shipped_configs()["qwen_image"]["transformer"])
    assert in_blocks == 60 * largest and in_blocks / 20_430_401_088 > 0.99  # 60 equal blocks hold the base
    assert host("base blocks (offload_base)") == pytest.approx(58 * largest * 2 / GIB, abs=0.01)
    acts = _acts(plain)[0]
    assert host("activations (offload_activations)") == pytest.approx(acts * 59 / 60, abs=0.01)
    assert _acts(moved)[0] == pytest.approx(acts / 60, abs=0.01)
