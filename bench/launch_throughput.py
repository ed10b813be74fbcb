"""Throughput of the stages around training on 1 vs 2 processes (``--launch 2``), as ratios in the same run.

    .venv/bin/python bench/launch_throughput.py [--repeats 3] [--images-per-prompt 32] [--prompts 256]

Two workloads on the tiny digits architecture (tiny:digits, random weights: speed only), both the costly kind:

- ``prepare`` with teacher synthesis (``data.source: prompts``): the 35 digits prompts × ``--images-per-prompt``
  images, 50 Euler steps at CFG 2, in shards of 70 items (an even split over 2 ranks);
- ``eval geneval --no-score``: ``--prompts`` GenEval prompts × 4 images, 20 Euler steps at CFG 2, batches of 32.

One process gets both cores (2 threads); two processes get 1 thread each, so a ratio compares the same machine
used two ways. Each repeat runs 1 then 2 processes back to back; the table gives medians and the median of the
per-repeat ratios. Wall time counts the whole command (start-up, model load, the launcher); ``prepare`` also
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


def _prepare_recipe(tmp: Path, n: int, images_per_prompt: int) -> Path:
    tree = {
        "model": {"path": "tiny:digits"},
        "data": {
            "source": "prompts",
            "path": str(ROOT / "recipes" / "digits_prompts.txt"),
            "cache_dir": str(tmp / f"cache{n}"),
            "resolution": 8,
            "cache_dtype": "fp32",
            "shard_size": 70,
            "synthesize": {"steps": 50, "guidance": 2.0, "images_per_prompt": images_per_prompt, "batch": 70},
        },
        "hardware": {"device": "cpu", "threads": 2 // n},
        "output": {"dir": str(tmp / "unused")},
    }
    path = tmp / f"prepare{n}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def measure(tmp: Path, repeats: int, images_per_prompt: int, prompts: int) -> dict:
    home = tmp / "home"
    items = 35 * images_per_prompt
    rows: dict[str, dict[int, list[float]]] = {"prepare": {1: [], 2: []}, "geneval": {1: [], 2: []}}
    inner: dict[int, list[float]] = {1: [], 2: []}
    geneval = ["eval", "geneval", "--model", "tiny:digits", "--size", 8, "--steps", 20, "--method", "euler",
               "--guidance", 2.0, "--prompts", f"0:{prompts}", "--per-prompt", 4, "--batch", 32, "--no-score", "-q"]  # fmt: skip
    _run(["sample", "x", "--model", "tiny:digits", "-n", 1, "--out", tmp / "warm", "-q"], 2, home)  # builds the model
    for rep in range(repeats):
        for n in (1, 2):
            recipe = _prepare_recipe(tmp, n, images_per_prompt)
            shutil.rmtree(tmp / f"cache{n}", ignore_errors=True)
            launch = ["--launch", 2] if n == 2 else []
            rows["prepare"][n].append(_run(["prepare", recipe, "-q", *launch], 2 // n, home))
            report = json.loads((tmp / f"cache{n}" / "prepare_report.json").read_text())
            inner[n].append(report["timing"]["seconds"])
            shutil.rmtree(tmp / f"gen{n}", ignore_errors=True)
            rows["geneval"][n].append(_run([*geneval, "--images", tmp / f"gen{n}", *launch], 2 // n, home))
            print(f"repeat {rep + 1}: {n} process(es) prepare {rows['prepare'][n][-1]:.1f} s "
                  f"geneval {rows['geneval'][n][-1]:.1f} s", flush=True)  # fmt: skip
    out = {
        "machine": _machine(),
        "repeats": repeats,
        "workloads": {
            "prepare": f"teacher synthesis, {items} images (35 prompts × {images_per_prompt}), 50 Euler steps, CFG 2",
            "geneval": f"{prompts * 4} images ({prompts} GenEval prompts × 4), 20 Euler steps, CFG 2",
        },
        "threads": {"1 process": 2, "2 processes": "1 each"},
        "rows": {},
    }
    counts = {"prepare": items, "geneval": prompts * 4}
    for name, by_n in rows.items():
        ratios = [a / b for a, b in zip(by_n[1], by_n[2], strict=True)]
        out["rows"][name] = {
            "wall_s": {str(n): statistics.median(v) for n, v in by_n.items()},
            "images_per_s": {str(n): counts[name] / statistics.median(v) for n, v in by_n.items()},
            "speedup": statistics.median(ratios),
            "speedup_range": [min(ratios), max(ratios)],
        }
    ratios = [a / b for a, b in zip(inner[1], inner[2], strict=True)]
    out["rows"]["prepare"]["after_load_s"] = {str(n): statistics.median(v) for n, v in inner.items()}
    out["rows"]["prepare"]["after_load_speedup"] = statistics.median(ratios)
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
        "1 process: 2 threads; 2 processes (`--launch 2`, gloo): 1 thread each. Wall time of the whole command.",
        "",
        "| stage | work | 1 process | 2 processes | speed-up (range) |",
        "|---|---|---|---|---|",
    ]
    for name, r in res["rows"].items():
        w, ips = r["wall_s"], r["images_per_s"]
        lines.append(
            f"| {name} | {res['workloads'][name]} | {w['1']:.1f} s ({ips['1']:.0f} img/s) | {w['2']:.1f} s "
            f"({ips['2']:.0f} img/s) | {r['speedup']:.2f}× ({r['speedup_range'][0]:.2f}–{r['speedup_range'][1]:.2f}) |"
        )
    p = res["rows"]["prepare"]
    lines += [
        "",
        f"prepare after the model load (its own timing): {p['after_load_s']['1']:.1f} s vs "
        f"{p['after_load_s']['2']:.1f} s, {p['after_load_speedup']:.2f}×.",
    ]
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
