"""One-seed screening of method variants at the demo's budget: train, sample 1/2/4 steps, score (digits or scenes).

    .venv/bin/python bench/screen.py NAME STEPS [KEY=VALUE ...]        # e.g. base_tt 2000 method.target_time=embed
    .venv/bin/python bench/screen.py teacher 1                         # the teacher rows (50 steps CFG 2, 1 step)

Each run starts from ``recipes/SETTING.yaml`` (or ``--recipe``) with the ``--set``-style overrides, trains
``STEPS`` steps (2 threads), then samples 60 seeds of each of the eval prompts (image k of every prompt: noise
seed k, the same for every run) at 1, 2 and 4 steps (``2p``/``4p``: the few-step grid with
``sample.grid_power: 2``; ``2d``/``4d`` in older records: re-noising with the model's own ẑ, ``sample.renoise:
deterministic``) and scores them with the setting's judge: FD, multi-mode coverage, alignment (single / multi
prompts) and the seed diversity of the single-mode prompts. One line per run is appended to ``--out`` (default
``bench/results/screen_SETTING.jsonl``); a name already there is skipped; ``--table [--medians]`` renders it
(runs named ``NAME_sK``: train.seed K, grouped). Needs the setting's teacher (``runs/SETTING-teacher/model``:
``make demo`` trains the digits one) and its cache (``cache/SETTING``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
PER_PROMPT = 60


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", nargs="?", help="run name (omit with --table)")
    ap.add_argument("steps", type=int, nargs="?", default=2000)
    ap.add_argument("sets", nargs="*", help="recipe overrides KEY=VALUE")
    ap.add_argument("--setting", choices=("digits", "scenes"), default="digits")
    ap.add_argument("--recipe", help="the recipe the overrides apply to (default: recipes/SETTING.yaml)")
    ap.add_argument("--out", help="default: bench/results/screen_SETTING.jsonl")
    ap.add_argument("--work", default=str(ROOT / "runs" / "screen"))
    ap.add_argument("--table", action="store_true", help="print --out as a markdown table and exit")
    ap.add_argument("--medians", action="store_true", help="with --table: runs NAME_sK grouped, medians over K")
    args = ap.parse_args(argv)
    out = Path(args.out or ROOT / "bench" / "results" / f"screen_{args.setting}.jsonl")
    if args.table:
        records = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
        print(table(medians(records) if args.medians else records))
        return 0
    if args.name is None:
        ap.error("NAME is required (or --table)")
    if out.is_file() and any(json.loads(x)["name"] == args.name for x in out.read_text().splitlines() if x.strip()):
        print(f"{args.name}: already in {out}")
        return 0

    import torch
    from quality import EVALUATORS  # bench/quality.py: the same prompts, judge and metrics as the full study

    from apexctl.inference import ModelInfo, generate_images, load_trained, resolve_sample_settings
    from apexctl.models import load_for_recipe, resolve_model_path
    from apexctl.recipe import load_recipe
    from apexctl.training.loop import train

    torch.set_num_threads(2)
    run = Path(args.work) / args.setting / args.name
    st = args.setting
    recipe = load_recipe(
        Path(args.recipe) if args.recipe else ROOT / "recipes" / f"{st}.yaml",
        [f"output.dir={run}", f"train.steps={args.steps}", f"model.path={ROOT / f'runs/{st}-teacher/model'}",
         f"data.cache_dir={ROOT / f'cache/{st}'}", "train.checkpoint_every=100000", *args.sets],
    )  # fmt: skip
    ev = EVALUATORS[st](recipe, PER_PROMPT)
    seeds = [k % PER_PROMPT for k in range(len(ev.texts))]  # image k of every prompt: noise seed k
    t0 = time.perf_counter()
    if args.name.startswith("teacher"):
        model, info = load_for_recipe(recipe.model, resolve_model_path(recipe.model.path)), ModelInfo()
        plan = [(50, "euler", 2.0), (1, "one", 1.0)]
    else:
        shutil.rmtree(run, ignore_errors=True)
        train(recipe, quiet=True)
        model, info = load_trained(recipe), ModelInfo(distilled=True)
        plan = [(1, None, None), (2, None, None), (4, None, None), ("2p", None, None), ("4p", None, None)]
    res: dict = {
        "name": args.name,
        "recipe": Path(args.recipe).name if args.recipe else f"{st}.yaml",
        "steps": args.steps,
        "sets": args.sets,
        "train_s": round(time.perf_counter() - t0, 1),
    }
    for key, method, guidance in plan:
        k = int(str(key).rstrip("p"))
        s = resolve_sample_settings(recipe, info, steps=k, method=method, guidance=guidance, batch=256)
        s = replace(s, grid_power=2.0 if str(key).endswith("p") else 1.0)  # rows 2, 4: the uniform grid, always
        sc = ev.score(generate_images(model, ev.texts, seeds, quiet=True, **s.sampler_kwargs()))
        res[str(key)] = {
            "fd": round(sc["fd"], 2),
            "cov": round(sc["coverage"], 3),
            "a_s": round(sc["align_single"], 3),
            "a_m": round(sc["align_multi"], 3),
            "sdiv": round(sc["seed_diversity"], 3),
            "fd_single": round(sc["fd_single"], 2),
        }
    print(json.dumps(res))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(res) + "\n")
    return 0


METRICS = ("fd", "cov", "a_s", "a_m", "sdiv")


def medians(records: list[dict]) -> list[dict]:
    """Runs named ``NAME_sK`` (train.seed K) grouped under ``NAME (n seeds)``, each score the median over the
    group; other runs as they are."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(re.sub(r"_s\d+$", "", r["name"]), []).append(r)
    out = []
    for name, rs in groups.items():
        if len(rs) == 1 and rs[0]["name"] == name:
            out.append(rs[0])
            continue
        row = {
            "name": f"{name} ({len(rs)} seed{'s' if len(rs) > 1 else ''})",
            "sets": [x for x in rs[0]["sets"] if not x.startswith("train.seed")],
        }
        row["train_s"] = statistics.median(r["train_s"] for r in rs)
        for k in ("50", "1", "2", "4", "2p", "4p", "2d", "4d"):
            if all(k in r for r in rs):
                row[k] = {m: statistics.median(r[k][m] for r in rs) for m in METRICS}
        out.append(row)
    return out


def table(records: list[dict]) -> str:
    """One markdown row per (run, sampling steps): the run's overrides, then the scores."""
    lines = [
        "| run | overrides | steps | FD ↓ | coverage ↑ | align single | align multi | seed diversity ↑ | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        sets = " ".join(x.removeprefix("method.") for x in r["sets"] if x != "method.objective=apex_full") or "–"
        for k in ("50", "1", "2", "4", "2p", "4p", "2d", "4d"):
            if k in r:
                e = r[k]
                lines.append(
                    f"| {r['name']} | {sets} | {k} | {e['fd']:.2f} | {e['cov']:.2f} | {e['a_s']:.3f} | {e['a_m']:.3f} "
                    f"| {e['sdiv']:.3f} | {r['train_s']:.0f} |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
