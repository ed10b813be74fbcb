"""Sampling speed: the 1-step student against the multi-step teacher with CFG, as ratios measured in the same run.

    .venv/bin/python bench/sample_speed.py [--config digits|large|both] [--reps 5] [--threads 2] [--out bench/results]

The APEX paper reports a 15.33× inference speed-up of its 1-step student over the 50-step teacher with classifier-free
guidance. The rows here, per config:

- ``teacher``: Euler on the family's sigmas (``engine.sampler.euler``) at the teacher's default steps and guidance,
  the conditional and unconditional rows batched into one forward per step (2·N forwards' worth of rows);
- ``student 1-step``: x = z − F(z, 1, c), one forward, no guidance (``engine.sampler.one_step``);
- ``student 2-step`` / ``4-step``: ``engine.sampler.few_step`` (stochastic re-noising).

Configs (random weights: speed does not depend on them, and no trained run is needed):

- ``digits``: ``tiny:digits`` (the embedded default's architecture: 3 layers, 4 heads × 16, pixel codec, 8×8), the
  teacher at ``recipes/digits_teacher.yaml``'s ``sample`` section (50 steps, guidance 2);
- ``large``: a Qwen-Image-architecture build with ``tiny:test``'s f4 ``AutoencoderKLQwenImage`` (z = 4) and a
  4-layer transformer, 4 heads × 64 = 256 wide, text hidden 64; 128×128 images → 4×32×32 latents (256 image
  tokens); the teacher at Qwen-Image's defaults (50 steps, true CFG 4, norm-rescaled).

Each row is timed two ways: ``end-to-end`` (prompt text → text encoder (+ the negative prompt for CFG) → noise →
sampler → decode to pixels) and ``transformer`` (the sampler loop only: embeddings and noise precomputed, no decode),
at batch 1 (latency) and batch 8 (throughput). Every (row, mode, batch) runs once as a warm-up, then ``--reps``
repetitions interleaved across rows so machine noise hits them alike; the tables give medians with the
interquartile range (min and max in the .json), and the speed-up column is teacher time / row time for the same
mode and batch. ``torch.inference_mode``, ``--threads`` intra-op threads, fixed seeds. Results go to
``OUT/sample_speed.md`` and ``OUT/sample_speed.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from apexctl.atomic import write_text  # noqa: E402
from apexctl.engine import sampler  # noqa: E402
from apexctl.inference import ModelInfo, image_generators, resolve_sample_settings, seeded_noise  # noqa: E402
from apexctl.machine import cpu_model  # noqa: E402
from apexctl.models import load_backbone  # noqa: E402
from apexctl.models.base import Backbone, Cond  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 8)
MODES = ("end-to-end", "transformer")
STUDENT_STEPS = (1, 2, 4)

DIGIT_PROMPTS = [
    "a handwritten digit seven",
    "an even digit",
    "a handwritten digit three",
    "the digit zero",
    "a handwritten digit one",
    "an odd digit",
    "a handwritten digit eight",
    "the digit five",
]
PICTURE_PROMPTS = [
    "a red cube on a blue sphere",
    "a photo of a cat sitting on a wooden chair",
    "a watercolor painting of a lighthouse at dusk",
    "two bicycles leaning against a brick wall",
    "a bowl of ramen with a soft-boiled egg, studio lighting",
    "a snowy mountain village at night",
    "a close-up of a green parrot",
    "an astronaut reading a newspaper on the moon",
]


def digits_teacher_defaults() -> tuple[int, float]:
    """(steps, guidance) of recipes/digits_teacher.yaml's ``sample`` section, resolved as ``apexctl sample`` does."""
    from apexctl.recipe import load_recipe

    s = resolve_sample_settings(load_recipe(ROOT / "recipes" / "digits_teacher.yaml"), ModelInfo())
    return s.steps, s.guidance


def configs(quick: bool) -> dict[str, dict]:
    """name → model spec, image size, teacher (steps, guidance), prompts, description."""
    d_steps, d_guidance = digits_teacher_defaults()
    large_spec = "tiny:test?num_layers=4&num_attention_heads=4&attention_head_dim=64&text_hidden=64&text_layers=2"
    large_desc = "Qwen-Image arch., 4 layers × 256 wide (4 heads × 64), f4 VAE, 128×128 px → 4×32×32 latents"
    large_size = 128
    if quick:  # the test preset's own sizes (2 layers × 32 wide) at 16×16 px → 4×4×4 latents
        large_spec, large_size = "tiny:test", 16
        large_desc = "Qwen-Image arch., tiny:test (2 layers × 32 wide), f4 VAE, 16×16 px → 4×4×4 latents"
    return {
        "digits": {
            "model": "tiny:digits",
            "size": 8,
            "teacher": (d_steps, d_guidance),
            "prompts": DIGIT_PROMPTS,
            "desc": "tiny:digits, 3 layers × 64 wide (4 heads × 16), pixel codec, 8×8 px → 1×8×8 latents",
        },
        "large": {
            "model": large_spec,
            "size": large_size,
            "teacher": (50, 4.0),  # Qwen-Image's defaults: 50 steps, true_cfg_scale 4
            "prompts": PICTURE_PROMPTS,
            "desc": large_desc,
        },
    }


def make_rows(teacher: tuple[int, float]) -> list[dict]:
    steps, guidance = teacher
    rows = [{"name": f"teacher {steps}-step, CFG {guidance:g}", "kind": "teacher", "steps": steps,
             "guidance": guidance, "nfe": 2 * steps if guidance > 1.0 else steps}]  # fmt: skip
    for n in STUDENT_STEPS:
        rows.append({"name": f"student {n}-step", "kind": "student", "steps": n, "guidance": 1.0, "nfe": n})
    return rows


def make_runner(bb: Backbone, row: dict, mode: str, batch: int, prompts: list[str], size: int, warm: bool) -> Callable:
    """A no-argument callable that produces ``batch`` images (or latents, for ``transformer``) for ``row``.

    ``warm`` gives the warm-up version: the same shapes and code path, the teacher with 2 steps instead of N.
    """
    shape = bb.latent_shape(size, size)
    seeds = list(range(batch))
    texts = [prompts[i % len(prompts)] for i in range(batch)]
    guided = row["guidance"] > 1.0
    steps = 2 if warm and row["kind"] == "teacher" else row["steps"]

    def sample(z: torch.Tensor, cond: Cond, uncond: Cond | None) -> torch.Tensor:
        if row["kind"] == "teacher":
            return sampler.euler(bb, z, cond, steps, uncond=uncond, guidance_scale=row["guidance"])
        if steps == 1:
            return sampler.one_step(bb, z, cond)
        return sampler.few_step(bb, z, cond, steps, "stochastic", image_generators(seeds))  # one per image

    if mode == "transformer":
        cond = bb.encode_prompts(texts)
        uncond = bb.encode_prompts([""]).expand(batch) if guided else None
        z = seeded_noise(shape, seeds)
        return lambda: sample(z, cond, uncond)

    def end_to_end() -> torch.Tensor:
        cond = bb.encode_prompts(texts)
        uncond = bb.encode_prompts([""]).expand(batch) if guided else None
        z = seeded_noise(shape, seeds)
        return bb.decode_latents(sample(z, cond, uncond))

    return end_to_end


def measure(name: str, cfg: dict, reps: int) -> dict:
    """Time every (row, mode, batch) of one config; returns the config's JSON record."""
    torch.manual_seed(0)
    bb = load_backbone(cfg["model"]).eval()
    params = sum(p.numel() for p in bb.transformer.parameters())
    rows = make_rows(cfg["teacher"])
    keys = [(r["name"], m, b) for r in rows for m in MODES for b in BATCHES]
    by_name = {r["name"]: r for r in rows}
    times: dict[tuple, list[float]] = {k: [] for k in keys}
    with torch.inference_mode():
        runners = {}
        for k in keys:
            row, mode, batch = by_name[k[0]], k[1], k[2]
            make_runner(bb, row, mode, batch, cfg["prompts"], cfg["size"], warm=True)()  # warm-up
            runners[k] = make_runner(bb, row, mode, batch, cfg["prompts"], cfg["size"], warm=False)
        out_shape = {m: tuple(runners[(rows[1]["name"], m, 1)]().shape[1:]) for m in MODES}
        for _ in range(reps):
            for k in keys:
                t0 = time.perf_counter()
                runners[k]()
                times[k].append(time.perf_counter() - t0)
    results = []
    for row in rows:
        for mode in MODES:
            rec = {**{k: row[k] for k in ("name", "kind", "steps", "guidance", "nfe")}, "mode": mode}
            for b in BATCHES:
                ts = sorted(t / b for t in times[(row["name"], mode, b)])
                teacher = statistics.median(times[(rows[0]["name"], mode, b)]) / b
                med = statistics.median(ts)
                q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else [med, med, med]
                rec[f"batch{b}"] = {
                    "ms_per_image": med * 1e3,
                    "ms_min": ts[0] * 1e3,
                    "ms_max": ts[-1] * 1e3,
                    "ms_q1": q[0] * 1e3,
                    "ms_q3": q[2] * 1e3,
                    "images_per_s": 1.0 / med,
                    "speedup_vs_teacher": teacher / med,
                    "reps_ms_per_image": [t * 1e3 for t in ts],
                }
            results.append(rec)
    return {
        "model": cfg["model"],
        "description": cfg["desc"],
        "image_size": cfg["size"],
        "latent_shape": list(bb.latent_shape(cfg["size"], cfg["size"])),
        "output_shape": {m: list(s) for m, s in out_shape.items()},
        "transformer_parameters": params,
        "teacher": {"steps": cfg["teacher"][0], "guidance": cfg["teacher"][1]},
        "weights": "random (a fresh tiny build; speed does not depend on the weights)",
        "rows": results,
    }


def _ms(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def markdown(meta: dict, results: dict) -> str:
    lines = [
        "# Sampling speed (`bench/sample_speed.py`)",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}",
        f"- torch {meta['torch']}, Python {meta['python']}",
        f"- CPU: {meta['cpu']} ({meta['cpu_count']} logical CPUs), {meta['threads']} torch threads",
        f"- wall time {meta['wall_s']} s (builds, loads, warm-ups and timed runs)",
        f"- {meta['reps']} timed repetition(s) after one warm-up per row (interleaved across rows); medians, "
        "spread = IQR (min/max in the .json)",
        "- speed-up = teacher ms/image ÷ row ms/image, same mode and batch, same run",
        "",
    ]
    for name, res in results.items():
        t = res["teacher"]
        lines += [
            f"## {name}: {res['description']}",
            "",
            f"Teacher: Euler, {t['steps']} steps, CFG {t['guidance']:g} ([c; ∅] batched, {2 * t['steps']} NFE). "
            f"Transformer {res['transformer_parameters'] / 1e6:.2f} M parameters; {res['weights']}.",
            "",
            "| sampler | NFE | mode | batch 1 ms/image (IQR) | × teacher (b1) | batch 8 ms/image (IQR) "
            "| batch 8 images/s | × teacher (b8) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in res["rows"]:
            b1, b8 = r["batch1"], r["batch8"]
            lines.append(
                f"| {r['name']} | {r['nfe']} | {r['mode']} "
                f"| {_ms(b1['ms_per_image'])} ({_ms(b1['ms_q1'])}–{_ms(b1['ms_q3'])}) "
                f"| {b1['speedup_vs_teacher']:.2f}× "
                f"| {_ms(b8['ms_per_image'])} ({_ms(b8['ms_q1'])}–{_ms(b8['ms_q3'])}) "
                f"| {b8['images_per_s']:.1f} | {b8['speedup_vs_teacher']:.2f}× |"
            )
        lines.append("")
    return "\n".join(lines)


def print_table(name: str, res: dict) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is optional: a plain table
        print(f"\n{name}: {res['description']}")
        print(f"{'sampler':<26} {'NFE':>4} {'mode':<12} {'b1 ms/img':>10} {'×T b1':>7} {'b8 ms/img':>10} "
              f"{'b8 img/s':>9} {'×T b8':>7}")  # fmt: skip
        for r in res["rows"]:
            b1, b8 = r["batch1"], r["batch8"]
            print(f"{r['name']:<26} {r['nfe']:>4} {r['mode']:<12} {_ms(b1['ms_per_image']):>10} "
                  f"{b1['speedup_vs_teacher']:>6.2f}× {_ms(b8['ms_per_image']):>10} {b8['images_per_s']:>9.1f} "
                  f"{b8['speedup_vs_teacher']:>6.2f}×")  # fmt: skip
        return
    table = Table(title=f"{name}: {res['description']}")
    for col in ("sampler", "NFE", "mode", "b1 ms/img", "b1 IQR", "× teacher b1", "b8 ms/img", "b8 img/s",
                "× teacher b8"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("sampler", "mode") else "right")
    for r in res["rows"]:
        b1, b8 = r["batch1"], r["batch8"]
        b1_iqr, b8_ips = f"{_ms(b1['ms_q1'])}–{_ms(b1['ms_q3'])}", f"{b8['images_per_s']:.1f}"
        table.add_row(r["name"], str(r["nfe"]), r["mode"], _ms(b1["ms_per_image"]), b1_iqr,
                      f"{b1['speedup_vs_teacher']:.2f}×", _ms(b8["ms_per_image"]), b8_ips,
                      f"{b8['speedup_vs_teacher']:.2f}×")  # fmt: skip
    Console(width=max(Console().width, 132)).print(table)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["digits", "large", "both"], default="both")
    ap.add_argument(
        "--reps", type=int, default=None, help="timed repetitions per row after the warm-up (default 5; 1 with --quick)"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder for the .md and .json")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and (unless --reps is given) 1 repetition")
    args = ap.parse_args(argv)
    reps = args.reps if args.reps is not None else 1 if args.quick else 5
    if reps < 1:
        ap.error("--reps must be >= 1")
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (e.g. a second run in one process)
        pass
    cfgs = configs(args.quick)
    names = list(cfgs) if args.config == "both" else [args.config]
    t0 = time.perf_counter()
    results = {}
    for name in names:
        results[name] = measure(name, cfgs[name], reps)
        print_table(name, results[name])
    cmd = shlex.join(["python", "bench/sample_speed.py", *(sys.argv[1:] if argv is None else argv)])
    meta = {
        "command": cmd,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "reps": reps,
        "quick": args.quick,
        "wall_s": round(time.perf_counter() - t0, 1),  # model builds/loads, warm-ups and timed runs
    }
    summary = {"meta": meta, "configs": results}
    write_text(args.out / "sample_speed.json", json.dumps(summary, indent=2) + "\n")
    write_text(args.out / "sample_speed.md", markdown(meta, results))
    print(f"\nwrote {args.out / 'sample_speed.md'} and {args.out / 'sample_speed.json'} ({meta['wall_s']} s)")
    return summary


if __name__ == "__main__":
    main()
