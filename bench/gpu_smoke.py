"""GPU smoke check: the real Qwen-Image transformer (published config, random bf16 weights, no download), the
LoRA of recipes/qwen_lora.yaml (r=64 on the released code's targets), training steps of ``apex`` vs
``flow_matching`` at 512², micro-batch 4, gradient checkpointing on.

    python bench/gpu_smoke.py                 # on a GPU: < 8 min on one H100 (model build included)
    python bench/gpu_smoke.py --tiny --steps 2   # the same code path on CPU with a 2-layer config (tests)
    python bench/gpu_smoke.py --quantize int8,nf4  # then the apex step on an int8 and an nf4 base (model.quantize)

Prints s/step, samples/s and peak memory per objective and the apex / flow_matching ratios; ``--out FILE``
writes them as JSON. The objectives, shift, LoRA and optimiser are the ones ``apexctl distill`` builds from the
recipe; only accelerate's wrapping and the data cache are left out (inputs are random latents and embeddings of
the real shapes: 16×64×64 latents, ``--text-tokens`` × 3584 prompt embeddings).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from importlib import resources
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent


def published_config() -> dict:
    return json.loads(resources.files("apexctl.models").joinpath("configs/qwen_image.json").read_text())


def _memory():
    """bench/memory.py, the sibling script whose builder and architecture table every bench shares."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import memory

    return memory


def build_backbone(tiny: bool, device: torch.device, dtype: torch.dtype):
    """QwenImageBackbone around a randomly initialised transformer built directly on ``device`` in ``dtype``."""
    cfg = published_config()
    tcfg = {k: v for k, v in cfg["transformer"].items() if not k.startswith("_")}
    if tiny:  # same module names and shapes per head, 2 layers and 2 heads: a CPU-sized model
        tcfg.update(num_layers=2, num_attention_heads=2, attention_head_dim=32, joint_attention_dim=64)
        tcfg["axes_dims_rope"] = [8, 12, 12]
    full = {"_class_name": cfg["transformer"]["_class_name"], **tcfg}
    return _memory().build_backbone("qwen_image", full, cfg["vae"], device, dtype), tcfg


def step_times(bb, net, recipe_path: str, objectives: list[str], trainable, x, c, uncond, args) -> dict[str, dict]:
    """Median s/step, samples/s, peak memory and transformer forwards per step of each objective's training step
    (objective → backward → clip → AdamW), ``args.warmup`` steps untimed."""
    from apexctl.recipe import load_recipe
    from apexctl.training.objectives import build_objective

    cuda = x.device.type == "cuda"
    results: dict[str, dict] = {}
    for objective in objectives:
        r = load_recipe(recipe_path, [f"method.objective={objective}"])
        fn = build_objective(r)
        extra = {"uncond": uncond} if objective == "apex" and r.method.reference_guidance > 1 else {}
        opt = torch.optim.AdamW(trainable, lr=r.train.lr, betas=r.train.betas)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        calls = [0]
        hook = bb.transformer.register_forward_hook(lambda *_, n=calls: n.__setitem__(0, n[0] + 1))
        for i in range(args.warmup + args.steps):
            t = time.perf_counter()
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cuda):
                out = fn(net, x, c, **extra)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if not torch.isfinite(out.loss):
                raise SystemExit(f"{objective}: non-finite loss at step {i}")
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
        hook.remove()
        step_s = statistics.median(times)
        results[objective] = {
            "s_per_step": step_s,
            "samples_per_s": x.shape[0] / step_s,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
            "forwards_per_step": calls[0] / (args.warmup + args.steps),
        }
        del opt
    return results


def run_base(scheme: str, objectives: list[str], args, device: torch.device, dtype: torch.dtype) -> dict:
    """Build the model, quantise its frozen base with ``scheme`` (``model.quantize``; none: as loaded), attach the
    recipe's LoRA and time ``objectives``; returns the sizes, the build seconds and the results."""
    from apexctl.engine.objectives import Net
    from apexctl.engine.shift import ConditionShift
    from apexctl.lora import make_trainable
    from apexctl.models.base import Cond
    from apexctl.models.quantize import quantize_backbone, tensor_bytes
    from apexctl.recipe import load_recipe

    t0 = time.perf_counter()
    torch.manual_seed(0)
    bb, tcfg = build_backbone(args.tiny, device, dtype)
    quantized = quantize_backbone(bb, scheme, key="--quantize")  # before the adapter, as apexctl distill does
    recipe = load_recipe(args.recipe)
    lora = recipe.model.lora
    make_trainable(bb, lora)
    bb.transformer.enable_gradient_checkpointing()
    bb.transformer.train()
    trainable = [p for p in bb.transformer.parameters() if p.requires_grad]
    n_total = sum(p.numel() for p in bb.transformer.parameters())
    n_train = sum(p.numel() for p in trainable)
    weights = sum(tensor_bytes(p) for p in bb.transformer.parameters())
    build_s = time.perf_counter() - t0
    print(f"[{scheme}] built {n_total / 1e6:,.1f} M parameters ({n_train / 1e6:,.1f} M trainable, LoRA r="
          f"{lora.rank}; {weights / 2**30:.2f} GiB of weights) in {build_s:.0f} s")  # fmt: skip
    if quantized is not None:
        print(f"[{scheme}] {quantized.describe()}")

    s = recipe.method.shift
    net = Net(bb, ConditionShift(a=s.a, b=s.b, site=s.site).to(device))
    mb, text_dim = args.micro_batch, tcfg["joint_attention_dim"]
    gen = torch.Generator(device).manual_seed(1)
    x = torch.randn(mb, *bb.latent_shape(args.resolution, args.resolution), generator=gen, device=device)

    def cond() -> Cond:
        e = torch.randn(mb, args.text_tokens, text_dim, generator=gen, device=device, dtype=dtype)
        return Cond(e, torch.ones(mb, args.text_tokens, dtype=torch.long, device=device))

    c, uncond = cond(), cond()
    results = step_times(bb, net, args.recipe, objectives, trainable, x, c, uncond, args)
    return {"parameters": n_total, "trainable": n_train, "weight_gib": weights / 2**30, "build_s": build_s,
            "results": results}  # fmt: skip


def main() -> None:
    from apexctl.errors import BadInput
    from apexctl.models.quantize import SCHEMES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "qwen_lora.yaml"))
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--text-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per objective (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quantize", default="", help="comma-separated model.quantize schemes (int8, fp8, nf4): "
                    "after the bf16 base, the apex step on each quantised base (the model rebuilt for each)")  # fmt: skip
    ap.add_argument("--tiny", action="store_true", help="a 2-layer config (CPU check of this script)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    schemes = [q.strip() for q in args.quantize.split(",") if q.strip()]
    for q in schemes:
        if q not in SCHEMES[1:]:
            raise SystemExit(f"--quantize: unknown {q!r} (allowed: {', '.join(SCHEMES[1:])})")

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}")
    base = run_base("none", ["flow_matching", "apex"], args, device, dtype)
    results = base["results"]
    quantized: dict[str, dict] = {}
    for q in schemes:
        if cuda:
            torch.cuda.empty_cache()  # the previous model is gone: each base's peak is its own
        try:
            quantized[q] = run_base(q, ["apex"], args, device, dtype)
        except BadInput as exc:  # a library this machine lacks: recorded, the other schemes still run
            quantized[q] = {"error": str(exc)}
            print(f"[{q}] {exc}")
    fm, ax = results["flow_matching"], results["apex"]
    ratios = {"step_time": ax["s_per_step"] / fm["s_per_step"], "peak_mem": ax["peak_mem_gib"] / fm["peak_mem_gib"]}
    print(f"{'base':<6} {'objective':<14} {'s/step':>8} {'samples/s':>10} {'peak GiB':>9} {'forwards':>9}")
    rows = [("bf16", k, v) for k, v in results.items()]
    rows += [(q, k, v) for q, r in quantized.items() for k, v in r.get("results", {}).items()]
    for name, k, v in rows:
        print(f"{name:<6} {k:<14} {v['s_per_step']:>8.3f} {v['samples_per_s']:>10.2f} {v['peak_mem_gib']:>9.1f} "
              f"{v['forwards_per_step']:>9.0f}")  # fmt: skip
    print(f"apex / flow_matching: step time {ratios['step_time']:.2f}x, peak memory {ratios['peak_mem']:.2f}x")
    for q, r in quantized.items():
        if "results" in r:
            a = r["results"]["apex"]
            r["vs_bf16"] = {"step_time": a["s_per_step"] / ax["s_per_step"],
                            "peak_mem": a["peak_mem_gib"] / ax["peak_mem_gib"]}  # fmt: skip
            print(f"apex on {q} / bf16: step time {r['vs_bf16']['step_time']:.2f}x, peak memory "
                  f"{r['vs_bf16']['peak_mem']:.2f}x")  # fmt: skip
    if args.out:
        summary = {
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "tiny": args.tiny,
            "parameters": base["parameters"],
            "trainable": base["trainable"],
            "weight_gib": base["weight_gib"],
            "build_s": base["build_s"],
            "micro_batch": args.micro_batch,
            "resolution": args.resolution,
            "text_tokens": args.text_tokens,
            "results": results,
            "ratios": ratios,
            "quantized": quantized,
        }
        args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
