"""Throughput of ``apexctl prepare`` (items/s) as a ratio to a plain single-item encode loop, same process, same model.

    .venv/bin/python bench/prepare_throughput.py [--repeats 3] [--folder-items 256] [--workers 2]

Two data sets: the embedded digits (tiny:digits, 1400 images with ~4 prompts each) and a folder of 64×64 PNGs with
captions (tiny:test, f4 VAE). ``prepare`` is timed from after the model is loaded to the manifest (caption checks,
prompt encoding, image decoding on DataLoader workers, image encoding, shard writes and checksums); the baseline
loop decodes, fits and encodes one item at a time (its image, then its captions) and writes nothing. Each
repeat runs the loop and then prepare; the table reports medians, the ratio as the median of the per-repeat ratios
(so machine load that changes over time hits both sides of a ratio alike), and the min–max spread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from apexctl.data.buckets import bucket_list, image_preparer  # noqa: E402
from apexctl.data.prepare import prepare  # noqa: E402
from apexctl.data.sources import open_source  # noqa: E402
from apexctl.models import load_for_recipe, resolve_model_path  # noqa: E402
from apexctl.recipe import validate_recipe  # noqa: E402

WORDS = ["red", "blue", "green", "fox", "bird", "tree", "house", "cat", "on", "a", "hill", "at", "night", "small"]


def make_folder(root: Path, n: int, size: int = 64) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        yy, xx = np.mgrid[0:size, 0:size]
        arr = (xx[..., None] * rng.uniform(0, 4, 3) + yy[..., None] * rng.uniform(0, 4, 3)) % 256
        arr = np.clip(arr + rng.normal(0, 10, arr.shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / f"{i:05d}.png")
        caption = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 8))))
        lines.append(json.dumps({"file_name": f"{i:05d}.png", "text": caption}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@torch.no_grad()
def baseline(recipe, backbone, n: int) -> float:
    """items/s of the naive loop over the first ``n`` items."""
    d = recipe.data
    source = open_source(d)
    fit = image_preparer(bucket_list(d.resolution, d.buckets), d.min_image_size, d.resolution)
    t0 = time.perf_counter()
    for item in source.items[:n]:
        _, img = fit(source.load(item.ref))
        backbone.encode_images(img[None])
        backbone.encode_prompts(list(item.captions))
    return n / (time.perf_counter() - t0)


def run_prepare(recipe, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    prepare(recipe.model_copy(update={"data": recipe.data.model_copy(update={"cache_dir": str(out)})}), quiet=True)
    return json.loads((out / "prepare_report.json").read_text())["timing"]["items_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--folder-items", type=int, default=256)
    ap.add_argument("--baseline-items", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="prepare-bench-"))
    try:
        folder = make_folder(tmp / "folder", args.folder_items)
        sets = {
            "digits (tiny:digits, 8×8)": {
                "model": {"path": "tiny:digits"},
                "data": {"source": "digits", "cache_dir": "x"},
            },
            f"folder {args.folder_items}× 64×64 PNG (tiny:test)": {
                "model": {"path": "tiny:test"},
                "data": {"source": "folder", "path": str(folder), "resolution": 64, "cache_dir": "x"},
            },
        }
        rows = []
        for name, tree in sets.items():
            tree["data"]["num_workers"] = args.workers
            recipe = validate_recipe(tree)
            backbone = load_for_recipe(recipe.model, resolve_model_path(recipe.model.path))
            n = len(open_source(recipe.data).items)
            base, prep = [], []
            baseline(recipe, backbone, 8)  # warm-up
            for _ in range(args.repeats):
                base.append(baseline(recipe, backbone, min(args.baseline_items, n)))
                prep.append(run_prepare(recipe, tmp / "cache"))
            ratio = statistics.median(p / b for p, b in zip(prep, base, strict=True))  # pairs run back to back
            rows.append((name, n, statistics.median(prep), statistics.median(base), ratio, prep, base))
        print(
            f"threads {torch.get_num_threads()}, DataLoader workers {args.workers}, median of {args.repeats} runs "
            f"(baseline on the first {args.baseline_items} items)"
        )
        print(f"{'data':<36} {'items':>6} {'prepare items/s':>16} {'1-item loop':>12} {'ratio':>6}")
        for name, n, p, b, ratio, ps, bs in rows:
            print(f"{name:<36} {n:>6} {p:>16.1f} {b:>12.1f} {ratio:>6.1f}")
            print(f"{'':<36} {'':>6} {min(ps):>7.1f}–{max(ps):<8.1f} {min(bs):>5.1f}–{max(bs):<6.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
