"""Cost of one training step per objective, as a ratio to flow matching measured in the same run.

    .venv/bin/python bench/step_cost.py [--config tiny|small|both] [--repeats 5] [--iters 5]

Each objective's step (forward, backward, AdamW) is timed ``--iters`` times after a warm-up; the repeats are
interleaved across objectives so machine noise hits them alike, and the table reports medians with the spread.
Memory is the activation memory autograd keeps for the backward pass (the bytes of every distinct tensor saved
through ``torch.autograd.graph.saved_tensors_hooks``): deterministic on CPU, and the part of peak memory that
grows with the objective (weights, gradients and optimizer state are the same for all three).

The floors set by the passes each method needs (docs/design.md §5): ``apex`` = three branches with gradient (generator +
flow-matching rows, shifted critic) and one without (reference) ≈ 3.3×; ``apex_paper`` = two with, one without
≈ 2.3×; with ``reference_guidance > 1`` the reference runs on twice the rows. ``apex_full`` (groups 1:1:1:1 of B
rows, estimate order 2): one forward with gradient on B rows, and without gradient the adv rows' one-step samples
(B/4), the RCGM rollouts of the e2e and any rows and of the mul rows whose gap exceeds dt (2 × ≈ B/2) and the
rectify pair on the e2e rows (2 × B/4): ≈ 1 + 1.75/3 ≈ 1.6× flow matching's passes; ``full_batch`` multiplies
every row count by 4 (≈ 6.3×); the enhanced target adds 2 × B/2 rows. The GAN term (``gan_weight``) adds two
critic forwards with gradient: 2 × B real + fake rows and B generator rows for ``apex`` (+3 passes), 3 × B/4 for
``apex_full``'s e2e rows (+0.75). The regression warm start is one forward on B rows, like flow matching.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from apexctl.engine.apex_full import apex_full  # noqa: E402
from apexctl.engine.config import ApexFullConfig  # noqa: E402
from apexctl.engine.gan import Gan, GanHead  # noqa: E402
from apexctl.engine.objectives import (  # noqa: E402
    ApexConfig,
    ApexPaperConfig,
    FlowMatchingConfig,
    Net,
    apex,
    apex_paper,
    flow_matching,
    regression,  # noqa: E402
)
from apexctl.engine.shift import ConditionShift  # noqa: E402
from apexctl.engine.target_time import TargetTimeEmbedding  # noqa: E402
from apexctl.models import load_backbone, resolve_model_path  # noqa: E402
from apexctl.training.closures import make_gan_features  # noqa: E402

#: name → (model, image size, batch)
CONFIGS = {
    "tiny": ("tiny:digits", 8, 128),  # the digits recipe's model: 16 tokens per image
    "small": ("tiny:digits?num_layers=4&num_attention_heads=4&attention_head_dim=32", 32, 16),  # 256 tokens
}


def saved_activation_bytes(fn) -> tuple[int, object]:
    """Run ``fn`` and return (bytes of distinct tensors autograd saved for backward, fn's result)."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def measure(config: str, iters: int, repeats: int) -> dict[str, dict[str, float]]:
    model, size, batch = CONFIGS[config]
    torch.manual_seed(0)
    bb = load_backbone(resolve_model_path(model))
    cond = bb.encode_prompts(["a handwritten digit seven", "an even digit"] * (batch // 2))
    uncond = bb.encode_prompts([""] * batch)
    x = torch.randn(batch, *bb.latent_shape(size, size))
    bb.transformer.requires_grad_(True).train()
    opt = torch.optim.AdamW(bb.transformer.parameters(), lr=1e-5)
    net = Net(bb, ConditionShift())
    tt_net = Net(bb, ConditionShift(), TargetTimeEmbedding(bb.time_embedding_dim()))
    full = ApexFullConfig()
    gan = Gan(make_gan_features(bb, bb.transformer, bb.transformer, net), GanHead(bb.feature_dim()))
    opt.add_param_group({"params": list(gan.head.parameters())})
    z = torch.randn_like(x)
    objectives = {
        "flow_matching": lambda: flow_matching(net, x, cond, FlowMatchingConfig()),
        "apex": lambda: apex(net, x, cond, ApexConfig()),
        "apex (guided ref)": lambda: apex(net, x, cond, ApexConfig(reference_guidance=2.0), uncond=uncond),
        "apex_paper": lambda: apex_paper(net, x, cond, ApexPaperConfig()),
        "apex_full": lambda: apex_full(net, x, cond, full),
        "apex_full (tt embed)": lambda: apex_full(tt_net, x, cond, full),
        "apex_full (enhanced)": lambda: apex_full(net, x, cond, ApexFullConfig(enhance_ratio=1.0), uncond=uncond),
        "apex_full (full batch)": lambda: apex_full(net, x, cond, ApexFullConfig(full_batch=True)),
        "apex_full (GAN)": lambda: apex_full(net, x, cond, ApexFullConfig(gan_weight=0.1), gan=gan),
        "apex (GAN)": lambda: apex(net, x, cond, ApexConfig(gan_weight=0.1), gan=gan),
        "regression (warm start)": lambda: regression(net, x, z, cond),
    }

    def step(fn) -> None:
        out = fn()
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    mem = {}
    for name, fn in objectives.items():
        for _ in range(2):
            step(fn)
        mem[name], out = saved_activation_bytes(fn)
        out.loss.backward()
        opt.zero_grad(set_to_none=True)
    times: dict[str, list[float]] = {k: [] for k in objectives}
    for _ in range(repeats):
        for name, fn in objectives.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                step(fn)
            times[name].append((time.perf_counter() - t0) / iters)
    base_t, base_m = statistics.median(times["flow_matching"]), mem["flow_matching"]
    print(f"\n{config}: model {model}, {size}×{size}, batch {batch}, threads {torch.get_num_threads()}, "
          f"median of {repeats}×{iters} steps")  # fmt: skip
    print(f"{'objective':<24} {'ms/step':>8} {'× FM':>6} {'spread ms':>13} {'act. MiB':>9} {'× FM':>6}")
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rows[name] = {"ms": med * 1e3, "time_ratio": med / base_t, "act_mib": mem[name] / 2**20,
                      "mem_ratio": mem[name] / base_m}  # fmt: skip
        spread = f"{min(ts) * 1e3:.0f}–{max(ts) * 1e3:.0f}"
        print(f"{name:<24} {med * 1e3:8.1f} {med / base_t:6.2f} {spread:>13} {mem[name] / 2**20:9.1f} "
              f"{mem[name] / base_m:6.2f}")  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=[*CONFIGS, "both"], default="both")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    for config in CONFIGS if args.config == "both" else [args.config]:
        measure(config, args.iters, args.repeats)


if __name__ == "__main__":
    main()
