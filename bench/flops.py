"""Forward FLOPs of the real architectures and the synthesis cost of the data-free recipes (issue 15).

    .venv/bin/python bench/flops.py [--out bench/results/flops.json] [--mfu 0.4]

Each shipped published config is built on the meta device (no memory, no weights) at full width with its blocks cut
as in ``bench/memory.py`` (1 and 2 blocks; FLUX double/single, SD3.5 joint/dual, Z-Image main/refiner layers apart),
and ``torch.utils.flop_counter.FlopCounterMode`` counts one forward (the family's ``velocity``) at the recipe's
resolution, batch 1, with the text tokens of ``bench/memory.py``: per block = (2 blocks − 1 block), rest = the
1-block count minus its blocks, whole transformer = rest + Σ blocks × per block, checked against the full model
counted directly on the meta device. The counter counts matrix products and convolutions (2 FLOP per
multiply-add) and attention's two products; norms, activations and softmax are not counted.

Synthesis cost of a recipe whose ``data.source`` is ``prompts`` (the teacher draws every training image):
images × ``synthesize.steps`` × forwards per step (2 with CFG: guidance > 1, else 1) × forward FLOPs, with
images = train.steps × global batch (one new image per training sample). Text encoding and the VAE decode are
left out. GPU-hours = FLOPs / (peak bf16 dense × MFU) / 3600 at the assumed MFU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
#: peak dense bf16 tensor throughput per GPU (TFLOP/s, vendor data sheets, without sparsity)
GPUS = {"H100/H200 SXM": 989.0, "A100": 312.0, "L40S": 362.0}
#: the recipes of the paper (the others are apexctl's own settings for families the paper did not train)
PAPER = {"qwen_lora.yaml", "qwen_lora_r32.yaml", "qwen_full.yaml", "sana_0.6b.yaml", "sana_1.6b.yaml"}


def _memory():
    """bench/memory.py, the sibling script whose builder and architecture table every bench shares."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import memory

    return memory


def forward_flops(arch, tcfg: dict, resolution: int, text_tokens: int) -> int:
    """FLOPs of one forward of ``tcfg`` (built on the meta device) at ``resolution``², batch 1."""
    from torch.utils.flop_counter import FlopCounterMode

    from apexctl.engine.cond import Cond

    m = _memory()
    bb = m.build_backbone(arch.family, tcfg, m.published(arch.name)["vae"], "meta", torch.bfloat16)
    x = torch.randn(1, *bb.latent_shape(resolution, resolution), device="meta")
    c = m.synthetic_cond(bb, 1, text_tokens, "meta", torch.bfloat16)
    # the masked families' adapters read the mask's values (all ones here): without it they take every token
    c = Cond(c.embeds, None if arch.family in ("qwen_image", "z_image") else c.mask, c.pooled)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        bb.velocity(x, torch.ones(1, device="meta"), c)
    return int(counter.get_total_flops())


def arch_flops(name: str) -> dict:
    """Per block kind, rest, composed whole and directly counted whole, at the recipe's resolution."""
    m = _memory()
    arch = m.ARCHS[name]
    recipe = m._home(arch)
    res, text = recipe.data.resolution, arch.text_tokens
    counts = {v: forward_flops(arch, m.reduced_config(arch, v), res, text) for v in arch.measured}
    per = {k: counts[w] - counts[wo] for k, (w, wo, _) in arch.kinds.items()}
    rest = counts[arch.base] - sum(n * per[k] for k, n in arch.blocks_in[arch.base].items())
    blocks = {k: n for k, (_, _, n) in arch.kinds.items()}
    whole = rest + sum(blocks[k] * per[k] for k in per)
    direct = forward_flops(arch, m.published(name)["transformer"], res, text)
    return {
        "recipe": f"recipes/{arch.recipe}",
        "resolution": res,
        "text_tokens": text,
        "image_tokens": m.tokens(arch, res, 0),
        "per_block_flops": per,
        "blocks": blocks,
        "rest_flops": rest,
        "forward_flops": whole,
        "forward_flops_counted_whole": direct,
    }


def synthesis(recipe_file: str, forward: int, mfu: float) -> dict:
    """The teacher's cost of drawing one image per training sample of the recipe."""
    from apexctl.recipe import load_recipe

    r = load_recipe(ROOT / "recipes" / recipe_file)
    s, t = r.data.synthesize, r.train
    images = t.steps * t.micro_batch * t.grad_accum * r.hardware.processes
    per_step = 2 if s.guidance > 1.0 else 1
    flop = images * s.steps * per_step * forward
    return {
        "paper": recipe_file in PAPER,
        "images": images,
        "steps": s.steps,
        "forwards_per_step": per_step,
        "flop_per_image": s.steps * per_step * forward,
        "flop": flop,
        "gpu_hours": {g: flop / (peak * 1e12 * mfu) / 3600 for g, peak in GPUS.items()},
    }


def recipes_by_arch() -> dict[str, list[str]]:
    """The prompt-source recipes of each shipped architecture (a recipe names its config by hub id or family)."""
    from apexctl.memory_plan import published_config_name
    from apexctl.recipe import load_recipe

    out: dict[str, list[str]] = {}
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        try:
            r = load_recipe(path)
        except Exception:  # a recipe that needs --set to load is not a shipped data-free one
            continue
        if r.data.source != "prompts" or r.model.family == "auto":
            continue
        name = published_config_name(r.model.family, r.model.path)
        if name is not None:
            out.setdefault(name, []).append(path.name)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "flops.json")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOP utilisation of the teacher's sampling")
    args = ap.parse_args(argv)
    import diffusers

    m = _memory()
    archs = {name: arch_flops(name) for name in m.ARCHS}
    recipes = recipes_by_arch()
    result = {
        "_provenance": {
            "date": datetime.date.today().isoformat(),
            "command": "python bench/flops.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "counter": "torch.utils.flop_counter.FlopCounterMode on the meta device, batch 1",
        },
        "assumptions": {"mfu": args.mfu, "peak_bf16_dense_tflops": GPUS, "images": "train.steps × global batch"},
        "archs": archs,
        "synthesis": {
            f: {"arch": name, **synthesis(f, archs[name]["forward_flops"], args.mfu)}
            for name, files in recipes.items()
            for f in files
        },
    }
    from apexctl.atomic import write_text

    write_text(args.out, json.dumps(result, indent=1) + "\n")
    for name, a in archs.items():
        print(f"{name:<14} {a['resolution']}²: forward {a['forward_flops'] / 1e12:8.2f} TFLOP "
              f"(counted whole {a['forward_flops_counted_whole'] / 1e12:.2f})")  # fmt: skip
    for f, s in result["synthesis"].items():
        hours = ", ".join(f"{g} {h:,.0f}" for g, h in s["gpu_hours"].items())
        print(f"{f:<24} {s['images']:>9,} images × {s['steps']} × {s['forwards_per_step']}: {s['flop']:.3g} FLOP; "
              f"GPU-hours {hours}")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
