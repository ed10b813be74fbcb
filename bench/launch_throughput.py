"""Throughput of the stages around training on 1 vs 2 processes (``--launch 2``), as ratios in the same run.

    .venv/bin/python bench/launch_throughput.py [--repeats 3] [--images-per-prompt 32] [--prompts 256]

Two workloads on the tiny digits architecture (tiny:digits, random weights: speed only), both the costly kind:

- ``prepare`` with teacher synthesis (``data.source: prompts``): the 35 digits prompts × ``--images-per-prompt``
  images, 50 Euler steps at CFG 2, in shards of 70 items (an even split over 2 ranks);
- ``eval geneval --no-score``: ``--prompts`` GenEval prompts × 4 images, 20 Euler steps at CFG 2, batches of 32.

Three configurations, processes × cores per process: 1 × 1 and 2 × 1 (the CPU analogue of one GPU vs two: twice
the hardware), and 1 × 2 (the same two cores used by one process). Each repeat runs the three back to back; the
table gives medians and the median of the per-repeat ratios. Wall time counts the whole command (start-up, model load, the launcher); ``prepare`` also
reports its own time from after the model load (``prepare_report.json``). Writes
bench/results/launch_throughput.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list, threads: int, home: Path) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "APEXCTL_HOME": str(home), "OMP_NUM_THREADS": str(threads)}
    env["MKL_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "apexctl", *map(str, args)], cwd=ROOT, env=env, check=True,
                   capture_output=True)  # fmt: skip
    return time.perf_counter() - t0


def _prepare_recipe(tmp: Path, n: int, threads: int, images_per_prompt: int) -> Path:
    tree = {
        "model": {"path": "tiny:digits"},
        "data": {
            "source": "prompts",
            "path": str(ROOT / "recipes" / "digits_prompts.txt"),
            "cache_dir": str(tmp / "cache"),
            "resolution": 8,
            "cache_dtype": "fp32",
            "shard_size": 70,
            "synthesize": {"steps": 50, "guidance": 2.0, "images_per_prompt": images_per_prompt, "batch": 70},
        },
        "hardware": {"device": "cpu", "threads": threads},
        "output": {"dir": str(tmp / "unused")},
    }
    path = tmp / f"prepare{n}x{threads}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


CONFIGS = {"1×1": (1, 1), "2×1": (2, 1), "1×2": (1, 2)}  # processes × threads per process


def measure(tmp: Path, repeats: int, images_per_prompt: int, prompts: int) -> dict:
    home = tmp / "home"
    items = 35 * images_per_prompt
    rows: dict[str, dict[str, list[float]]] = {"prepare": {c: [] for c in CONFIGS}, "geneval": {c: [] for c in CONFIGS}}
    inner: dict[str, list[float]] = {c: [] for c in CONFIGS}
    geneval = ["eval", "geneval", "--model", "tiny:digits", "--size", 8, "--steps", 20, "--method", "euler",
               "--guidance", 2.0, "--prompts", f"0:{prompts}", "--per-prompt", 4, "--batch", 32, "--no-score", "-q"]  # fmt: skip
    _run(["sample", "x", "--model", "tiny:digits", "-n", 1, "--out", tmp / "warm", "-q"], 2, home)  # builds the model
    for rep in range(repeats):
        for name, (n, threads) in CONFIGS.items():
            recipe = _prepare_recipe(tmp, n, threads, images_per_prompt)
            shutil.rmtree(tmp / "cache", ignore_errors=True)
            launch = ["--launch", n] if n > 1 else []
            rows["prepare"][name].append(_run(["prepare", recipe, "-q", *launch], threads, home))
            report = json.loads((tmp / "cache" / "prepare_report.json").read_text())
            inner[name].append(report["timing"]["seconds"])
            shutil.rmtree(tmp / "gen", ignore_errors=True)
            rows["geneval"][name].append(_run([*geneval, "--images", tmp / "gen", *launch], threads, home))
            print(f"repeat {rep + 1}: {name} prepare {rows['prepare'][name][-1]:.1f} s "
                  f"geneval {rows['geneval'][name][-1]:.1f} s", flush=True)  # fmt: skip
    out = {
        "machine": _machine(),
        "repeats": repeats,
        "workloads": {
            "prepare": f"teacher synthesis, {items} images (35 prompts × {images_per_prompt}), 50 Euler steps, CFG 2",
            "geneval": f"{prompts * 4} images ({prompts} GenEval prompts × 4), 20 Euler steps, CFG 2",
        },
        "configs": "processes × threads (cores) per process",
        "rows": {},
    }
    counts = {"prepare": items, "geneval": prompts * 4}
    for stage, by in {**rows, "prepare (after the model load)": inner}.items():
        n_images = counts[stage.split()[0]]
        out["rows"][stage] = {
            "seconds": {c: statistics.median(v) for c, v in by.items()},
            "images_per_s": {c: n_images / statistics.median(v) for c, v in by.items()},
            # per repeat, so load that changes over time hits both sides of a ratio alike
            "speedup_2x1_vs_1x1": statistics.median(a / b for a, b in zip(by["1×1"], by["2×1"], strict=True)),
            "speedup_2x1_vs_1x2": statistics.median(a / b for a, b in zip(by["1×2"], by["2×1"], strict=True)),
        }
    return out


def _machine() -> str:
    from apexctl.machine import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} cores"


def write_tables(res: dict, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "launch_throughput.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [
        f"# Stages on 1 vs 2 processes ({res['machine']}; median of {res['repeats']})",
        "",
        "Processes × cores (threads) per process; `--launch 2` on gloo. Wall time of the whole command (start-up,",
        "model load, the launcher), and for prepare also its own time from after the model load.",
        "",
        "| stage | work | 1 × 1 | 2 × 1 | 1 × 2 | 2 × 1 vs 1 × 1 | 2 × 1 vs 1 × 2 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in res["rows"].items():
        t = r["seconds"]
        work = res["workloads"][name.split()[0]]
        lines.append(
            f"| {name} | {work} | {t['1×1']:.1f} s | {t['2×1']:.1f} s | {t['1×2']:.1f} s | "
            f"{r['speedup_2x1_vs_1x1']:.2f}× | {r['speedup_2x1_vs_1x2']:.2f}× |"
        )
    (dest / "launch_throughput.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images-per-prompt", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="launch-bench-"))
    try:
        res = measure(tmp, args.repeats, args.images_per_prompt, args.prompts)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_tables(res, args.out)
    print((args.out / "launch_throughput.md").read_text())


if __name__ == "__main__":
    main()
