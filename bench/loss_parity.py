"""Loss parity across a refactor: train the digits model for N steps under each objective and record every loss.

    python bench/loss_parity.py --out /tmp/before.json            # on the old tree (PYTHONPATH=OLD_TREE)
    python bench/loss_parity.py --out /tmp/after.json --compare /tmp/before.json

Each configuration runs ``apexctl prepare`` once (shared digits cache) and ``apexctl distill`` for ``--steps`` steps
with ``log_every: 1`` from the same random tiny digits transformer, in a fresh process. ``--compare`` prints the
largest relative difference per configuration and exits 1 when any exceeds ``--tol`` (same machine: expect 0).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

MODEL = "tiny:digits?num_layers=2&num_attention_heads=2&attention_head_dim=16"

#: name → method / train / model overrides; every objective and the engine options that change the step
CONFIGS: dict[str, dict] = {
    "flow_matching": {"method": {"objective": "flow_matching"}},
    "apex": {"method": {"objective": "apex"}},
    "apex_ema_ref": {"method": {"objective": "apex", "reference": "ema"}, "train": {"ema_decay": 0.9}},
    # no shift: a separate critic reads the real condition (the recipe refuses a shift with it; the baseline's
    # shift a = 1 here was a no-op, never applied)
    "apex_separate": {"method": {"objective": "apex", "critic": "separate"}},
    "apex_gen2": {"method": {"objective": "apex", "generator_steps": 2}},
    "apex_lora_base": {"method": {"objective": "apex", "reference": "base"}, "model": {"lora": {"rank": 4}}},
    "apex_learnable": {"method": {"objective": "apex", "shift": {"learnable": True, "mode": "diag"}}},
    "apex_paper": {"method": {"objective": "apex_paper"}},
}


def _recipe(tmp: Path, name: str, steps: int, extra: dict) -> Path:
    tree = {
        "model": {"path": MODEL, **extra.get("model", {})},
        "data": {"source": "digits", "cache_dir": str(tmp / "cache"), "resolution": 8, "num_workers": 0},
        "method": extra.get("method", {}),
        "train": {"steps": steps, "micro_batch": 32, "lr": 1e-4, "log_every": 1, "checkpoint_every": 10_000, "seed": 3}
        | extra.get("train", {}),
        "hardware": {"device": "cpu", "threads": 1},
        "output": {"dir": str(tmp / f"run-{name}")},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _apexctl(*args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "apexctl", *args, "--quiet"], check=True, env=env)


def run(steps: int, names: list[str]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for i, name in enumerate(names):
            path = _recipe(tmp, name, steps, CONFIGS[name])
            if i == 0:
                _apexctl("prepare", str(path))
            _apexctl("distill", str(path))
            rows = [json.loads(r) for r in (tmp / f"run-{name}" / "metrics.jsonl").read_text().splitlines()]
            out[name] = [
                {k: v for k, v in r.items() if k == "step" or k.startswith("loss") or k == "grad_norm"} for r in rows
            ]
            print(f"{name}: {len(rows)} steps, last loss {rows[-1]['loss']:.6f}", flush=True)
    return out


def compare(new: dict, old: dict, tol: float) -> bool:
    ok = True
    for name, rows in old.items():
        if name not in new:  # not asked for with --only
            continue
        worst = 0.0
        for a, b in zip(new[name], rows, strict=True):
            for k, v in b.items():
                if isinstance(v, float):
                    worst = max(worst, abs(a[k] - v) / max(abs(v), 1e-12))
        print(f"{name}: {len(rows)} steps, max relative difference {worst:.3g}")
        ok &= worst <= tol
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--only", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--compare", type=Path)
    ap.add_argument("--tol", type=float, default=0.0)
    args = ap.parse_args()
    res = run(args.steps, args.only)
    args.out.write_text(json.dumps(res, indent=1))
    if args.compare is not None and not compare(res, json.loads(args.compare.read_text()), args.tol):
        sys.exit(1)


if __name__ == "__main__":
    main()
