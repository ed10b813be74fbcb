"""Cost of one training step per objective, as a ratio to flow matching measured in the same run.

    .venv/bin/python bench/step_cost.py [--batch 128] [--repeats 7] [--model tiny:digits]

Each objective's step (forward, backward, AdamW) is timed ``--iters`` times after a warm-up; the repeats are
interleaved across objectives so machine noise hits them alike, and the table reports medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from apexctl.engine.objectives import (  # noqa: E402
    ApexConfig,
    ApexPaperConfig,
    FlowMatchingConfig,
    Net,
    apex,
    apex_paper,
    flow_matching,
)
from apexctl.engine.shift import ConditionShift  # noqa: E402
from apexctl.models import load_backbone, resolve_model_path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny:digits")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(0)
    bb = load_backbone(resolve_model_path(args.model))
    shape = bb.latent_shape(8, 8) if args.model.startswith("tiny:digits") else bb.latent_shape(32, 32)
    cond = bb.encode_prompts(["a handwritten digit seven", "an even digit"] * (args.batch // 2))
    x = torch.randn(args.batch, *shape)
    bb.transformer.requires_grad_(True).train()
    opt = torch.optim.AdamW(bb.transformer.parameters(), lr=1e-5)
    net = Net(bb, ConditionShift())
    objectives = {
        "flow_matching": lambda: flow_matching(net, x, cond, FlowMatchingConfig()),
        "apex": lambda: apex(net, x, cond, ApexConfig()),
        "apex_paper": lambda: apex_paper(net, x, cond, ApexPaperConfig()),
    }

    def step(fn) -> None:
        out = fn()
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {k: [] for k in objectives}
    for fn in objectives.values():
        for _ in range(3):
            step(fn)
    for _ in range(args.repeats):
        for name, fn in objectives.items():
            t0 = time.perf_counter()
            for _ in range(args.iters):
                step(fn)
            times[name].append((time.perf_counter() - t0) / args.iters)
    base = statistics.median(times["flow_matching"])
    print(
        f"model {args.model}, batch {args.batch}, threads {torch.get_num_threads()}, median of {args.repeats}×{args.iters} steps"
    )
    print(f"{'objective':<14} {'ms/step':>8} {'× flow_matching':>16} {'spread (min–max ms)':>20}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<14} {med * 1e3:8.1f} {med / base:16.2f} {min(ts) * 1e3:9.1f}–{max(ts) * 1e3:.1f}")


if __name__ == "__main__":
    main()
