"""What a quantised base costs in quality, on the digits (docs/quantization.md, "What it costs in quality").

    python bench/quantize_quality.py [--teacher runs/digits-teacher/model] [--per-prompt 40] [--student-steps 100]

For each ``model.quantize`` scheme this machine has a library for (none first):

- **teacher** (what ``data.synthesize.quantize`` costs): the digits teacher quantised, 50-step Euler with CFG 2 on
  the eval prompts (``--per-prompt`` seeds each, the same seeds for every scheme); relative L2 of its latents
  against the unquantised teacher's, and the digits judge's FD, FD in PCA space, diversity, multi-digit coverage;
- **student**: ``--student-steps`` steps of ``recipes/digits.yaml`` (apex_full) as a LoRA (rank 16, α 16, lr 1e-3,
  EMA 0.9) on the quantised teacher, from the same cache and seed. "deployed": the exported LoRA on the fp32 base
  (what ``apexctl sample`` and the stock pipeline run); "own": the run's quantised base with its adapter. Relative
  L2 of the one-step latents (same noise) — deployed against the unquantised run's, own against deployed — and
  the FD of each.

The teacher is ``--teacher`` (``make demo`` trains one into runs/digits-teacher/model) or, if absent, trained
under ``--work`` as bench/quality.py does. Writes ``quantize_quality.json`` and ``quantize_quality.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
#: the student's LoRA run (the settings of the table in docs/quantization.md)
STUDENT = ["model.lora={rank: 16, alpha: 16.0}", "train.lr=0.001", "train.ema_decay=0.9"]


def _quality():
    """bench/quality.py, the sibling script whose digits evaluator and teacher builder this one shares."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import quality

    return quality


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


def draw(backbone, texts: list[str], seeds: list[int], **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, images) of ``texts`` with ``seeds``."""
    from apexctl.inference.generate import decode_latents, prompt_latents

    lat = prompt_latents(backbone, texts, seeds, **kw)
    return lat, decode_latents(backbone, lat, kw.get("batch", 64))


def scores(ev, images) -> dict:
    s = ev.score(images)
    return {k: s[k] for k in ("fd", "diversity", "coverage", "align")} | {"fd_pca": s.get("fd_pca")}


def main() -> None:
    from apexctl.inference import load_trained
    from apexctl.models import load_for_recipe
    from apexctl.models.quantize import PACKAGES, _installed, quantize_backbone
    from apexctl.recipe import load_recipe
    from apexctl.training.loop import train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, default=ROOT / "runs" / "digits-teacher" / "model")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-quantize")
    ap.add_argument("--out", type=Path, default=BENCH / "results")
    ap.add_argument("--per-prompt", type=int, default=40)
    ap.add_argument("--student-steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--teacher-steps", type=int, default=None, help="a short teacher when one is trained (tests)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    q = _quality()
    schemes = ["none", *(s for s in ("int8", "fp8", "nf4") if _installed(PACKAGES[s]))]
    if (args.teacher / "apexctl_model.json").is_file():
        teacher = str(args.teacher)
        cache = str(ROOT / load_recipe(ROOT / "recipes" / "digits_teacher.yaml").data.cache_dir)  # make demo's
    else:
        setting = q.SETTINGS["digits"]
        teacher, cache, _ = q.ensure_teacher(setting, args.work, args.threads, quiet=True, steps=args.teacher_steps)
    base = [f"model.path={teacher}", f"data.cache_dir={cache}", f"hardware.threads={args.threads}"]
    recipe = load_recipe(ROOT / "recipes" / "digits.yaml", base)
    ev = q.EVALUATORS["digits"](recipe, args.per_prompt)
    seeds = [k % args.per_prompt for k in range(len(ev.texts))]
    size = {"height": ev.size[0], "width": ev.size[1]}
    out: dict = {"teacher_model": teacher, "per_prompt": args.per_prompt, "schemes": schemes, "teacher": {},
                 "student": {}, "student_steps": args.student_steps, "torch": torch.__version__}  # fmt: skip

    ref = None
    for scheme in schemes:  # the teacher, quantised
        t0 = time.perf_counter()
        bb = load_for_recipe(recipe.model, teacher)
        quantize_backbone(bb, scheme)
        lat, images = draw(bb, ev.texts, seeds, steps=50, method="euler", guidance=2.0, batch=200, **size)
        ref = lat if ref is None else ref
        out["teacher"][scheme] = {"rel_l2": rel_l2(lat, ref), **scores(ev, images), "s": time.perf_counter() - t0}
        print(f"teacher {scheme}: {out['teacher'][scheme]}", flush=True)

    ref = None
    for scheme in schemes:  # the one-step student trained on it
        t0 = time.perf_counter()
        run = args.work / f"student-{scheme}"
        r = load_recipe(ROOT / "recipes" / "digits.yaml", [*base, *STUDENT, f"model.quantize={scheme}",
                        f"train.steps={args.student_steps}", f"train.checkpoint_every={args.student_steps}",
                        f"train.warmup_steps={min(10, args.student_steps)}",
                        f"output.dir={run}", "train.sample_every=null"])  # fmt: skip
        train(r, quiet=True)
        losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
        one = {"steps": 1, "method": "one", "batch": 200, **size}
        deployed, images = draw(load_trained(r), ev.texts, seeds, **one)
        own_bb = load_for_recipe(r.model, teacher)
        quantize_backbone(own_bb, scheme)
        own_bb.load_lora(run / "lora")
        own, own_images = draw(own_bb, ev.texts, seeds, **one)
        ref = deployed if ref is None else ref
        out["student"][scheme] = {
            "final_loss": sum(losses[-3:]) / len(losses[-3:]),
            "deployed_vs_unquantized_run": rel_l2(deployed, ref),
            "own_vs_deployed": rel_l2(own, deployed),
            "fd_deployed": scores(ev, images)["fd"],
            "fd_own": scores(ev, own_images)["fd"],
            "s": time.perf_counter() - t0,
        }
        print(f"student {scheme}: {out['student'][scheme]}", flush=True)

    from apexctl.atomic import write_text

    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "quantize_quality.json", json.dumps(out, indent=1) + "\n")
    write_text(args.out / "quantize_quality.md", markdown(out))
    print(markdown(out))


def markdown(out: dict) -> str:
    f = lambda v, d=3: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = [f"# Quality on a quantised base (`bench/quantize_quality.py`, {out['per_prompt']} images per prompt)", "",
             "| teacher | rel. L2 of the latents | FD | FD (PCA) | diversity | multi-digit coverage |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for s, t in out["teacher"].items():
        lines.append(f"| {s} | {f(t['rel_l2'], 4)} | {f(t['fd'], 2)} | {f(t['fd_pca'], 2)} | {f(t['diversity'])} | "
                     f"{f(t['coverage'], 2)} |")  # fmt: skip
    lines += ["", f"| base ({out['student_steps']} LoRA steps) | final loss (last 3 logged) | deployed vs the "
              "unquantised run's LoRA | own vs deployed | FD deployed | FD own |", "|---|---|---|---|---|---|"]  # fmt: skip
    for s, t in out["student"].items():
        lines.append(f"| {s} | {f(t['final_loss'], 4)} | {f(t['deployed_vs_unquantized_run'], 4)} | "
                     f"{f(t['own_vs_deployed'], 4)} | {f(t['fd_deployed'], 2)} | {f(t['fd_own'], 2)} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
