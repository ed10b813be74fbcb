"""The paper's claims measured on our own models: one table of teacher, baselines, APEX and its ablations.

    python bench/quality.py --setting digits          # ≤ 45 min on 2 CPU cores (see docs/evidence.md)
    python bench/quality.py --setting scenes          # the harder setting (colour, position, several-mode prompts)
    python bench/quality.py --setting digits --rows "main;few-step" --seeds 0   # a subset

Every trained row starts from the same teacher, trains for the same budget (``--budget`` optimizer steps at the
student recipe's batch; the "length ×3" row triples it) and is repeated for each seed: the seed sets the training
seed and the evaluation noise (image k of a prompt uses noise seed 100000·seed + k), so the spread includes both.
Teacher rows are evaluated once per seed (noise only). Cells are the median over seeds with the (min–max) range.

Columns: alignment (GenEval-style correctness per prompt, all prompts / several-mode prompts), mode coverage of the
several-mode prompts, FD to real held-out images in the judge's feature space, diversity, seed diversity (mean
pairwise RMS distance between the seeds of one single prompt) and FD of the single prompts to their real class
(``seed_diversity`` / ``fd_single`` of the judges), and the training wall time per run (1 thread; ``--workers``
runs share the machine) with its ratio to the default ``apex`` row.
Resumable: finished runs are read back from ``WORK/results.jsonl`` (keyed by their full configuration).

Writes ``bench/results/quality_<setting>.json``, ``bench/results/quality_<setting>_steps.svg`` (alignment against
sampling steps per method) and re-renders ``bench/results/quality.md`` from every setting's JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
NOISE_STRIDE = 100_000


# --------------------------------------------------------------------------------------------------------------
# what to run


@dataclass(frozen=True)
class Row:
    """One table row: recipe overrides on top of the student recipe (or a teacher evaluation)."""

    name: str
    group: str
    sets: tuple[tuple[str, Any], ...] = ()
    steps: tuple[int, ...] = (1,)
    length: int = 1  # × the training budget
    teacher: tuple[tuple[int, str, float], ...] = ()  # teacher rows: (steps, method, guidance) per evaluation
    note: str = ""
    base: str = "student"  # the recipe the overrides apply to: the setting's student recipe, or a named variant

    @property
    def trains(self) -> bool:
        return not self.teacher


def _shift_rows() -> list[Row]:
    """The paper's Table 7 grid a ∈ {−1, −0.5, 0.5} × b ∈ {0, 0.1, 1, 10}, at both shift sites.

    At the default site (the DiT's text projection) every later read of the text stream goes through a LayerNorm,
    which removes any b·1 exactly: b is a no-op there (tests/test_shift_sites.py), so only the b = 0 column and the
    a = −1 row are run. At the ``embeddings`` site (before the text RMSNorm) b matters, but RMSNorm(a·h) =
    sign(a)·RMSNorm(h): with b = 0, a = −0.5 is a = −1 and a = +0.5 is no shift at all, exactly; those two cells are
    not rerun (see the "same as" notes)."""
    rows = []
    for a, b in ((-0.5, 0.0), (0.5, 0.0), (-1.0, 0.1), (-1.0, 1.0), (-1.0, 10.0)):
        rows.append(Row(f"apex shift a={a:g} b={b:g}", "apex ablation", (("method.shift.a", a), ("method.shift.b", b))))
    for a in (-1.0, -0.5, 0.5):
        for b in (0.0, 0.1, 1.0, 10.0):
            if b == 0.0 and a != -1.0:
                continue
            sets = (("method.shift.site", "embeddings"), ("method.shift.a", a), ("method.shift.b", b))
            rows.append(Row(f"apex shift@embeddings a={a:g} b={b:g}", "apex ablation", sets))
    return rows


def _released_rows() -> list[Row]:
    """Issue 14's study: the released objective (the default recipe: target-time input, frozen-teacher real score,
    rectify 0.25) against its stock-module form and the released constants, each stabiliser added to it, the
    separate critic at 1:1 and at 1:5, and TwinFlow's MNIST tutorial setting."""
    sep = (("method.objective", "apex"), ("method.critic", "separate"))
    g = "released objective"
    return [
        Row("apex_full", g, steps=(1, 2, 4), note="the default recipe"),
        Row("apex_full stock module", g, (("method.target_time", "none"),), steps=(1, 2, 4), note="no tt input"),
        Row("apex_full rectify 0.5 (released)", g, (("method.rectify_weight", 0.5),)),
        Row("apex_full reference self (released)", g, (("method.reference", "self"),)),
        Row("apex_full + EMA target (warm-up)", g, (("method.target_reference", "ema"), ("train.ema_warmup", True))),
        Row("apex_full + critic 5:1", g, (("method.critic_updates", 5),), note="two time scales, self-critic"),
        Row("apex_full + enhanced target r=1", g, (("method.enhance_ratio", 1.0), ("method.reference_guidance", 1.0))),
        Row("apex_full full batch", g, (("method.full_batch", True),), note="every group on every row"),
        Row("apex_full order 1", g, (("method.estimate_order", 1),)),
        Row("apex_full l2 rows (no Barron)", g, (("method.loss", "l2"),)),
        Row("apex_full without time weighting", g, (("method.time_weighting", False),)),
        Row("apex_full without RCGM (order 0)", g, (("method.estimate_order", 0),)),
        Row("apex separate critic 1:1", g, sep, base="apex", note="DMD2-style second network"),
        Row("apex separate critic 5:1", g, (*sep, ("method.critic_updates", 5)), base="apex", note="DMD2's ratio"),
        Row("apex normalised Δ", g, (("method.normalize_delta", True),), base="apex", note="DMD2's gradient"),
        Row(
            "TwinFlow MNIST setting",
            g,
            (
                ("method.full_batch", True),
                ("method.loss", "l2"),
                ("method.time_weighting", False),
                ("method.rectify_weight", 1.0),
                ("method.reference", "self"),
                ("method.target_time", "none"),
                ("method.enhance_ratio", 0.5),
                ("method.reference_guidance", 1.0),
                ("method.target_reference", "ema"),
                ("train.ema_decay", 0.99),
                ("train.ema_warmup", True),
                ("train.lr", 2e-4),
                ("train.micro_batch", 128),
            ),
            note="all terms on the full batch, plain L2, lr 2e-4, batch 128, EMA 0.99",
        ),  # fmt: skip
    ]


def build_rows(teacher_guidance: float) -> list[Row]:
    """Every row of the study, in table order (the issue's list; defaults are the student recipe's values)."""
    g = teacher_guidance
    paper = (("method.objective", "apex_paper"),)
    rows = [
        Row("teacher", "main", teacher=((50, "euler", g), (4, "euler", g), (1, "one", 1.0)), steps=(50, 4, 1)),
        Row("flow_matching fine-tune", "main", (("method.objective", "flow_matching"),), note="the no-APEX baseline"),
        Row("apex", "main", steps=(1, 2, 4), note="the previous default (recipes/<setting>_apex.yaml)"),
        Row("apex_paper", "main", paper, steps=(1, 2, 4), note="the paper's equations as written"),
        Row("apex, few-step trained (N=4)", "few-step", (("method.generator_steps", 4),), steps=(1, 2, 4)),
        *_shift_rows(),
        Row("apex learnable shift", "apex ablation", (("method.shift.learnable", True),)),
        Row("apex reference ema", "apex ablation", (("method.reference", "ema"),)),
        Row("apex reference base", "apex ablation", (("method.reference", "base"),), note="frozen teacher"),
        Row("apex rectify μ=0.25", "apex ablation", (("method.rectify_weight", 0.25),)),
        Row("apex rectify μ=1", "apex ablation", (("method.rectify_weight", 1.0),)),
        *[
            Row(f"apex fm_t_max={t:g}", "apex ablation", (("method.fm_t_max", t),))
            for t in (1.0, 0.97, 0.8)  # 0.9 is the default
        ],
        Row("apex length ×3", "apex ablation", length=3),
        Row("apex without L_fake", "apex ablation", (("method.fake_weight", 0.0),), note="critic never trained"),
        Row("apex without shift (a=1, b=0)", "apex ablation", (("method.shift.a", 1.0), ("method.shift.b", 0.0))),
        Row("apex separate critic", "apex ablation", (("method.critic", "separate"),), note="external discriminator"),
        *[
            Row(
                f"apex_paper λp:λe={p:g}:{e:g}",
                "apex_paper ablation",
                (*paper, ("method.fake_weight", p), ("method.mix_weight", e)),
            )
            for p, e in ((1.0, 0.0), (0.0, 1.0), (1.0, 0.5), (1.0, 2.0))
        ],
        Row("apex_paper fake_grad off", "apex_paper ablation", (*paper, ("method.fake_grad", False))),
        *[
            Row(f"apex_paper inner λ={lam:g}", "apex_paper ablation", (*paper, ("method.lambda_mix", lam)))
            for lam in (0.25, 0.75, 1.0)
        ],
        Row("apex_paper uniform weighting", "apex_paper ablation", (*paper, ("method.weighting", "uniform"))),
    ]
    # the rows of the previous default objective start from its recipe (recipes/<setting>_apex.yaml)
    rows = [replace(r, base="apex") if r.name.startswith("apex") else r for r in rows]
    return rows[:4] + _released_rows() + rows[4:]


# --------------------------------------------------------------------------------------------------------------
# settings: the recipes and how a row is scored


@dataclass(frozen=True)
class Setting:
    name: str
    teacher_recipe: str
    student_recipe: str
    per_prompt: int
    budget: int  # default optimizer steps per trained run
    lr: float | None = None  # bench learning rate (None: the student recipe's)
    rows: tuple[str, ...] | None = None  # the rows `--rows default` runs (None: every row) ...
    skip: str | None = None  # ... less those whose name starts with this
    variants: tuple[tuple[str, str], ...] = ()  # Row.base → recipe (e.g. the previous default objective's)

    def recipe_for(self, row: Row) -> str:
        return self.student_recipe if row.base == "student" else dict(self.variants)[row.base]


SETTINGS = {
    # default: the rows (≈ 42 min); `--rows every` adds the Table 7 grid at the embeddings site (≈ 55 min)
    "digits": Setting(
        "digits",
        "recipes/digits_teacher.yaml",
        "recipes/digits.yaml",
        per_prompt=100,
        budget=200,
        skip="apex shift@embeddings",
        variants=(("apex", "recipes/digits_apex.yaml"),),
    ),
    # the rows the acceptance questions need (every row at 3 seeds would take ~2 h here): `--rows every` for all
    "scenes": Setting(
        "scenes",
        "recipes/scenes_teacher.yaml",
        "recipes/scenes.yaml",
        per_prompt=60,
        budget=200,
        variants=(("apex", "recipes/scenes_apex.yaml"),),
        rows=(
            "main",
            "few-step",
            "apex shift a=-0.5 b=0",
            "apex shift a=0.5 b=0",
            "apex shift@embeddings a=-0.5 b=1",  # the paper's best cell
            "apex shift@embeddings a=0.5 b=1",  # our best on the digits
            "apex without L_fake",
            "apex without shift (a=1, b=0)",
            "apex separate critic",
            "apex_paper λp:λe=1:0",
            "apex_paper λp:λe=0:1",
        ),
    ),
}


@dataclass
class Evaluator:
    """Prompts (with what counts as correct) and a judge: ``score(images) -> flat metrics``."""

    texts: list[str]
    score: Callable[[Any], dict[str, float | None]]
    size: tuple[int, int]


def _evaluator(judge, prompts, per_prompt: int, resolution: int) -> Evaluator:
    """Both settings' judges share ``score(images, allowed, kinds, prompts)`` and its result keys."""
    texts = [p.prompt for p in prompts for _ in range(per_prompt)]
    allowed = [p.allowed for p in prompts for _ in range(per_prompt)]
    kinds = [p.kind for p in prompts for _ in range(per_prompt)]

    def score(images) -> dict[str, float | None]:
        s = judge.score(images, allowed, kinds, texts)
        a = s["alignment"]
        return {
            "align": a["overall"],
            "align_single": a["single"],
            "align_multi": a["multi"],
            "coverage": s["multi_coverage"],
            "fd": s["fd"],
            "fd_pca": s.get("fd_pca"),
            "diversity": s["diversity"],
            # one-step seed collapse: mean pairwise RMS between a single prompt's seeds, FD to the prompt's class
            "seed_diversity": s.get("seed_diversity"),
            "fd_single": s.get("fd_single"),
        }

    return Evaluator(texts, score, (resolution, resolution))


def _digits_evaluator(recipe, per_prompt: int) -> Evaluator:
    from apexctl.data.digits import eval_prompts, load_split
    from apexctl.eval.toy.digits import DigitsJudge

    split = load_split(holdout=recipe.data.holdout, seed=recipe.data.seed)
    return _evaluator(DigitsJudge.fit(split, seed=0), eval_prompts(), per_prompt, recipe.data.resolution)


def _scenes_evaluator(recipe, per_prompt: int) -> Evaluator:
    from apexctl.data.digits import load_split
    from apexctl.data.scenes import eval_prompts
    from apexctl.eval.toy.scenes import SceneJudge

    split = load_split(holdout=recipe.data.holdout, seed=recipe.data.seed)
    prompts = eval_prompts()
    return _evaluator(SceneJudge.fit(split, prompts, seed=0), prompts, per_prompt, recipe.data.resolution)


EVALUATORS: dict[str, Callable[[Any, int], Evaluator]] = {"digits": _digits_evaluator, "scenes": _scenes_evaluator}


# --------------------------------------------------------------------------------------------------------------
# one job (runs in a fresh process so its peak memory is its own)


@dataclass(frozen=True)
class Job:
    setting: str
    row: Row
    seed: int
    overrides: tuple[str, ...]  # KEY=VALUE for load_recipe, the row's last
    work: str
    per_prompt: int
    threads: int
    rescore: dict | None = None  # the run's earlier record: sample and score its saved model again, no training

    @property
    def key(self) -> str:
        blob = json.dumps([self.setting, asdict(self.row), self.seed, self.overrides, self.per_prompt], default=str)
        return f"{self.row.name}|seed={self.seed}|{hashlib.sha1(blob.encode()).hexdigest()[:10]}"

    @property
    def run_dir(self) -> Path:
        return run_dir_for(self.work, self.row.name, self.seed)


def run_dir_for(work: str | Path, row_name: str, seed: int) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in row_name)
    return Path(work) / "runs" / f"{safe}_s{seed}"


def _trainable_state_mb(recipe, model_dir: str) -> float:
    """Training state a run holds: weights + grad + AdamW m, v of the trained parameters (16 B each in fp32), ×2
    with a separate critic, + 4 B per parameter for an EMA or a frozen base reference copy."""
    from safetensors import safe_open

    n = 0
    for f in Path(model_dir, "transformer").glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            n += sum(_numel(h, k) for k in h.keys())
    m = recipe.method
    copies = 16 * (2 if getattr(m, "critic", "shifted") == "separate" else 1)
    copies += 4 if (recipe.train.ema_decay is not None or m.reference == "ema") else 0
    copies += 4 if m.reference == "base" and recipe.model.lora is None else 0
    return n * copies / 2**20


def _numel(handle, key: str) -> int:
    n = 1
    for d in handle.get_slice(key).get_shape():
        n *= int(d)
    return n


def run_job(job: Job) -> dict[str, Any]:
    """Train (unless a teacher row), generate each row's step counts, score; returns one JSON-able record."""
    import resource

    import torch

    torch.set_num_threads(job.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from apexctl.inference import ModelInfo, generate_images, is_distilled, load_trained, resolve_sample_settings
    from apexctl.models import load_for_recipe, resolve_model_path
    from apexctl.recipe import load_recipe
    from apexctl.training.loop import train

    setting = SETTINGS[job.setting]
    recipe = load_recipe(ROOT / setting.recipe_for(job.row), list(job.overrides))
    ev = EVALUATORS[job.setting](recipe, job.per_prompt)
    record: dict[str, Any] = {"key": job.key, "row": job.row.name, "group": job.row.group, "seed": job.seed}
    t0 = time.perf_counter()
    if job.row.trains:
        if job.rescore is None:
            shutil.rmtree(job.run_dir, ignore_errors=True)
            train(recipe, quiet=True)
            record["train_s"] = time.perf_counter() - t0
            shutil.rmtree(job.run_dir / "checkpoints", ignore_errors=True)  # only model/ and metrics.jsonl are kept
            record["state_mb"] = _trainable_state_mb(recipe, resolve_model_path(recipe.model.path))
        else:  # the training columns are the first run's
            record.update({k: job.rescore.get(k) for k in ("train_s", "state_mb", "peak_rss_mb")})
        model = load_trained(recipe)
        plan = [(k, None, None) for k in job.row.steps]  # the recipe's sample settings (auto: one / few-step)
    else:
        model = load_for_recipe(recipe.model, resolve_model_path(recipe.model.path))
        plan = list(job.row.teacher)
    seeds = [NOISE_STRIDE * job.seed + k % job.per_prompt for k in range(len(ev.texts))]
    record["evals"] = {}
    info = ModelInfo(distilled=job.row.trains and is_distilled(recipe))
    for steps, method, guidance in plan:
        s = resolve_sample_settings(recipe, info, steps=steps, method=method, guidance=guidance, batch=256)
        t1 = time.perf_counter()
        images = generate_images(model, ev.texts, seeds, quiet=True, **s.sampler_kwargs())
        metrics = ev.score(images)
        metrics["sample_s"] = time.perf_counter() - t1
        record["evals"][str(steps)] = metrics
    if job.rescore is None:
        record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return record


# --------------------------------------------------------------------------------------------------------------
# orchestration


def _fmt_value(v: Any) -> str:
    return json.dumps(v)  # YAML reads JSON scalars


def ensure_teacher(
    setting: Setting, work: Path, threads: int, quiet: bool, steps: int | None = None
) -> tuple[str, str, float | None]:
    """(teacher model dir, cache dir, seconds spent training it now or None if it was there)."""
    from apexctl.data.prepare import prepare
    from apexctl.recipe import load_recipe
    from apexctl.training.loop import train

    cache = work / "cache"
    out = work / "teacher"
    sets = [f"data.cache_dir={cache}", f"output.dir={out}", f"hardware.threads={threads}"]
    if steps is not None:  # trial runs and tests only: a short teacher
        sets += [f"train.steps={steps}", f"train.warmup_steps={min(steps, 100)}", f"train.checkpoint_every={steps}"]
    recipe = load_recipe(ROOT / setting.teacher_recipe, sets)
    if not (cache / "manifest.json").is_file():
        prepare(recipe, quiet=quiet)
    seconds = None
    if not (out / "model" / "apexctl_model.json").is_file():
        t0 = time.perf_counter()
        train(recipe, quiet=quiet)
        seconds = time.perf_counter() - t0
    return str(out / "model"), str(cache), seconds


def make_jobs(
    setting: Setting, rows: list[Row], seeds: list[int], work: Path, teacher: str, cache: str, args
) -> list[Job]:
    from apexctl.recipe import load_recipe

    budget = args.budget or setting.budget
    per_prompt = args.per_prompt or setting.per_prompt
    jobs = []
    for row in rows:
        for seed in seeds:
            base = {
                "model.path": teacher,
                "data.cache_dir": cache,
                "train.seed": seed,
                "train.steps": budget * row.length,
                "train.checkpoint_every": budget * row.length,
                "train.log_every": 10,
                "hardware.threads": args.threads,
                "output.dir": str(run_dir_for(work, row.name, seed)),
            }
            if args.lr or setting.lr:
                base["train.lr"] = args.lr or setting.lr
            sets = {**base, **dict(row.sets)}
            overrides = tuple(f"{k}={_fmt_value(v)}" for k, v in sets.items())
            load_recipe(ROOT / setting.recipe_for(row), list(overrides))  # a bad row fails now, not after an hour
            jobs.append(Job(setting.name, row, seed, overrides, str(work), per_prompt, args.threads))
    return jobs


def run_all(jobs: list[Job], results_path: Path, workers: int, quiet: bool) -> list[dict]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    done: dict[str, dict] = {}
    if results_path.is_file():
        for line in results_path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                done[rec["key"]] = rec
    todo = [j for j in jobs if j.key not in done]
    # longest first (×3 runs, then trained rows), so the last minutes are not one long run on one core
    todo.sort(key=lambda j: (-j.row.length, not j.row.trains))
    records = [done[j.key] for j in jobs if j.key in done]
    failed: list[str] = []

    def keep(rec: dict) -> None:
        records.append(rec)
        with results_path.open("a") as fh:  # one line per finished run: an interrupted bench resumes here
            fh.write(json.dumps(rec) + "\n")

    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*cols, disable=quiet) as bar:
        task = bar.add_task("runs", total=len(jobs), completed=len(jobs) - len(todo))
        if workers <= 0:  # in this process (tests, debugging): peak memory is then the process's, not the run's
            for j in todo:
                keep(run_job(j))
                bar.advance(task)
            return records
        ctx = get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, max_tasks_per_child=1) as pool:
            pending = {pool.submit(run_job, j): j for j in todo}
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    job = pending.pop(fut)
                    try:
                        keep(fut.result())
                    except Exception as exc:  # one broken row must not cost the other runs; a rerun retries it
                        failed.append(f"{job.row.name} seed {job.seed}: {type(exc).__name__}: {exc}")
                    bar.update(task, advance=1, description=f"runs (last: {job.row.name}, seed {job.seed})")
    for line in failed:
        print(f"FAILED {line}", file=sys.stderr)
    return records


# --------------------------------------------------------------------------------------------------------------
# aggregation and reporting

COLUMNS = (
    ("align", "align", 3),
    ("align_multi", "align multi", 3),
    ("coverage", "coverage", 2),
    ("fd", "FD", 2),
    ("diversity", "diversity", 3),
    ("seed_diversity", "seed div", 3),
    ("fd_single", "FD single", 2),
)


@dataclass
class Cell:
    values: list[float] = field(default_factory=list)

    def add(self, v: float | None) -> None:
        if v is not None:
            self.values.append(float(v))

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    def text(self, nd: int) -> str:
        if not self.values:
            return "–"
        m = f"{self.median:.{nd}f}"
        if len(self.values) == 1:
            return m
        return f"{m} ({min(self.values):.{nd}f}–{max(self.values):.{nd}f})"


def aggregate(rows: list[Row], records: list[dict]) -> list[dict]:
    """One entry per (row, sampling steps): medians and ranges over seeds."""
    by_row: dict[str, list[dict]] = {}
    for r in records:
        by_row.setdefault(r["row"], []).append(r)
    apex_time = Cell()
    for r in by_row.get("apex", []):
        apex_time.add(r.get("train_s"))
    out = []
    for row in rows:
        recs = by_row.get(row.name, [])
        if not recs:
            continue
        train_s, mem, state = Cell(), Cell(), Cell()
        for r in recs:
            train_s.add(r.get("train_s"))
            mem.add(r.get("peak_rss_mb"))
            state.add(r.get("state_mb"))
        for steps in row.steps:
            cells = {k: Cell() for k, _, _ in COLUMNS}
            for r in recs:
                ev = r["evals"].get(str(steps))
                if ev:
                    for k in cells:
                        cells[k].add(ev.get(k))
            ratio = (
                train_s.median / apex_time.median if train_s.values and apex_time.values and apex_time.median else None
            )
            out.append(
                {
                    "row": row.name,
                    "group": row.group,
                    "steps": steps,
                    "n": len(recs),
                    "cells": cells,
                    "train_s": train_s,
                    "time_ratio": ratio,
                    "peak_rss_mb": mem,
                    "state_mb": state,
                    "note": row.note,
                }
            )
    return out


def markdown_table(entries: list[dict]) -> str:
    head = "| row | steps | n | " + " | ".join(h for _, h, _ in COLUMNS) + " | train s | × apex time |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    group = None
    for e in entries:
        if e["group"] != group:
            group = e["group"]
            lines.append(f"| **{group}** |" + " |" * (head.count("|") - 2))
        cells = " | ".join(e["cells"][k].text(nd) for k, _, nd in COLUMNS)
        ratio = f"{e['time_ratio']:.2f}" if e["time_ratio"] is not None else "–"
        name = e["row"] + (f" <sub>{e['note']}</sub>" if e["note"] and e["steps"] == min(1, e["steps"]) else "")
        lines.append(f"| {name} | {e['steps']} | {e['n']} | {cells} | {e['train_s'].text(0)} | {ratio} |")
    return "\n".join(lines)


def _median_of(entries: list[dict], row: str, steps: int, key: str) -> float | None:
    for e in entries:
        if e["row"] == row and e["steps"] == steps:
            return e["cells"][key].median
    return None


def questions(entries: list[dict]) -> str:
    """The acceptance questions, answered by the numbers of the table (no judgement is hard-coded)."""

    def m(row: str, steps: int = 1, key: str = "align") -> str:
        v = _median_of(entries, row, steps, key)
        return "–" if v is None else f"{v:.3f}" if key not in ("fd", "fd_single") else f"{v:.2f}"

    def pair(row: str, steps: int = 1) -> str:
        return (
            f"align {m(row, steps)}, multi {m(row, steps, 'align_multi')}, coverage {m(row, steps, 'coverage')}, "
            f"FD {m(row, steps, 'fd')}, seed div {m(row, steps, 'seed_diversity')}, "
            f"FD single {m(row, steps, 'fd_single')}"
        )

    out = [
        f"- **1-step APEX vs the 50-step teacher**: apex 1 step: {pair('apex')}; teacher 50 steps: {pair('teacher', 50)}; "
        f"teacher 1 step: {pair('teacher', 1)}; flow-matching fine-tune 1 step: {pair('flow_matching fine-tune')}.",
        f"- **Both terms (apex_paper λp:λe)**: 1:1 {pair('apex_paper')}; 1:0 {pair('apex_paper λp:λe=1:0')}; "
        f"0:1 {pair('apex_paper λp:λe=0:1')}.",
        f"- **Shift sign (apex, b=0)**: a=−1 {pair('apex')}; a=−0.5 {pair('apex shift a=-0.5 b=0')}; "
        f"a=+0.5 {pair('apex shift a=0.5 b=0')}.",
        f"- **No shift → no critic**: a=1, b=0 {pair('apex without shift (a=1, b=0)')}; without L_fake "
        f"{pair('apex without L_fake')}.",
        f"- **apex vs apex_paper at 1 step**: apex {pair('apex')}; apex_paper {pair('apex_paper')}.",
        f"- **Few steps**: apex 1/2/4 steps align {m('apex', 1)}/{m('apex', 2)}/{m('apex', 4)}, FD "
        f"{m('apex', 1, 'fd')}/{m('apex', 2, 'fd')}/{m('apex', 4, 'fd')}; few-step trained (N=4) align "
        f"{m('apex, few-step trained (N=4)', 1)}/{m('apex, few-step trained (N=4)', 2)}/{m('apex, few-step trained (N=4)', 4)}, FD "
        f"{m('apex, few-step trained (N=4)', 1, 'fd')}/{m('apex, few-step trained (N=4)', 2, 'fd')}/"
        f"{m('apex, few-step trained (N=4)', 4, 'fd')}.",
    ]
    for e in entries:
        if e["row"] in ("apex", "apex separate critic", "apex_paper") and e["steps"] == 1:
            out.append(
                f"- cost, {e['row']}: {e['train_s'].text(0)} s per run ({e['time_ratio'] or 0:.2f}× apex), peak RSS "
                f"{e['peak_rss_mb'].text(0)} MiB, training state {e['state_mb'].text(2)} MiB"
            )
    return "\n".join(out)


#: the paper's Table 7 (GenEval, A = a·I, b = b·1), for the side-by-side grid
PAPER_TABLE7 = {
    -1.0: (0.76, 0.73, 0.74, 0.74),
    -0.5: (0.75, 0.79, 0.81, 0.70),
    0.5: (0.29, 0.37, 0.30, 0.73),
}
GRID_B = (0.0, 0.1, 1.0, 10.0)


def shift_grid(entries: list[dict], key: str = "coverage") -> str:
    """Our 1-step ``key`` over the Table 7 grid at both shift sites, beside the paper's GenEval. Cells that are
    exactly equal by construction (tests/test_shift_sites.py) are filled from the run they equal, marked ≡."""

    def cell(row: str) -> float | None:
        return _median_of(entries, row, 1, key)

    def ours(site: str, a: float, b: float) -> str:
        if site == "projection":
            base = cell("apex") if a == -1.0 else cell(f"apex shift a={a:g} b=0")
            measured = cell(f"apex shift a={a:g} b={b:g}") if b != 0.0 else base
            # LayerNorm removes b: an unmeasured cell equals the b = 0 cell of the same a
            return _f(measured) if measured is not None else "≡ " + _f(base)
        if b == 0.0 and a == -0.5:  # RMSNorm keeps only sign(a)
            return "≡ " + _f(cell("apex shift@embeddings a=-1 b=0"))
        if b == 0.0 and a == 0.5:
            return "≡ " + _f(cell("apex without shift (a=1, b=0)"))
        return _f(cell(f"apex shift@embeddings a={a:g} b={b:g}"))

    head = "| a \\ b | " + " | ".join(f"{b:g}" for b in GRID_B)
    lines = [
        head + " | " + " | ".join(f"{b:g}" for b in GRID_B) + " | " + " | ".join(f"{b:g}" for b in GRID_B) + " |",
        "|---|" + "---|" * 12,
    ]
    for a, paper in PAPER_TABLE7.items():
        proj = " | ".join(ours("projection", a, b) for b in GRID_B)
        emb = " | ".join(ours("embeddings", a, b) for b in GRID_B)
        lines.append(f"| {a:g} | {proj} | {emb} | " + " | ".join(f"{v:.2f}" for v in paper) + " |")
    return (
        f"1-step {key}: our projection site (columns 1–4), our embeddings site (5–8), the paper's GenEval (9–12)\n\n"
        + "\n".join(lines)
    )


def _f(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def steps_chart(entries: list[dict], setting: str, key: str = "align") -> str:
    """``key`` (median over seeds) against sampling steps, one line per method."""
    from apexctl.eval.report.plots import series_chart

    label = {"align": "alignment", "fd": "FD (lower is better)", "coverage": "multi-mode coverage"}[key]
    series: dict[str, tuple[list[float], list[float]]] = {}
    for e in entries:
        if e["row"] in ("teacher", "apex", "apex_paper", "apex, few-step trained (N=4)", "flow_matching fine-tune"):
            med = e["cells"][key].median
            if med is not None:
                xs, ys = series.setdefault(e["row"], ([], []))
                xs.append(e["steps"])
                ys.append(med)
    return series_chart(
        series, f"{setting}: {label} vs sampling steps", "sampling steps (log scale)", label, log_x=True
    )


def render_markdown() -> str:
    from apexctl.atomic import write_text

    parts = [
        "# Quality evidence (bench/quality.py)",
        "",
        "Generated by `bench/quality.py`; the numbers are medians over seeds with the (min–max) range. See docs/evidence.md",
        "for what the rows mean and what we conclude from them.",
    ]
    for name in SETTINGS:
        p = RESULTS / f"quality_{name}.json"
        if not p.is_file():
            continue
        data = json.loads(p.read_text())
        rows = [
            Row(
                **{
                    **r,
                    "sets": tuple(map(tuple, r["sets"])),
                    "steps": tuple(r["steps"]),
                    "teacher": tuple(map(tuple, r["teacher"])),
                }
            )
            for r in data["rows"]
        ]
        entries = aggregate(rows, data["records"])
        meta = data["meta"]
        parts += [
            "",
            f"## Setting: {name}",
            "",
            f"Command: `{meta['command']}`  ",
            f"Machine: {meta['machine']}; {meta['workers']} runs in parallel, {meta['threads']} thread each; "
            f"wall time {meta['wall_min']:.1f} min (teacher training {meta['teacher_train_s'] or 0:.0f} s of it) for "
            f"{meta.get('runs', '?')} runs, {meta.get('runs_read_back', 0)} of them read back from an earlier "
            f"invocation; training + sampling time summed over all runs {meta.get('run_minutes', 0):.0f} min; "
            f"{meta['date']}.  ",
            f"Budget: {meta['budget']} optimizer steps per run at batch {meta['micro_batch']}, lr {meta['lr']}; "
            f"seeds {meta['seeds']}; {meta['per_prompt']} images per prompt.",
            "",
            f"![alignment vs steps](quality_{name}_steps.svg) ![FD vs steps](quality_{name}_fd.svg)",
            "",
            markdown_table(entries),
            "",
            "### The questions, in numbers",
            "",
            questions(entries),
            "",
            "### The shift grid (Table 7)",
            "",
            shift_grid(entries, "align"),
            "",
            shift_grid(entries, "fd"),
        ]
        write_text(RESULTS / f"quality_{name}_steps.svg", steps_chart(entries, name, "align"))
        write_text(RESULTS / f"quality_{name}_fd.svg", steps_chart(entries, name, "fd"))
    text = "\n".join(parts) + "\n"
    write_text(RESULTS / "quality.md", text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="digits")
    ap.add_argument(
        "--rows",
        default="default",
        help="';'-separated groups (main, few-step, apex ablation, apex_paper ablation) or row names; "
        "'default' (the setting's rows) or 'every'",
    )
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--budget", type=int, default=None, help="optimizer steps per run (default: the setting's)")
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default: the setting's)")
    ap.add_argument("--per-prompt", type=int, default=None, help="images per evaluation prompt")
    ap.add_argument("--workers", type=int, default=2, help="runs in parallel (0: in this process)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--teacher-steps", type=int, default=None, help="train the teacher this long (trials, tests)")
    ap.add_argument("--work", default=None, help="work folder (default runs/bench-quality/SETTING)")
    ap.add_argument(
        "--rescore",
        action="store_true",
        help="sample and score every finished run's saved model again (after a judge change); no training",
    )
    ap.add_argument("--no-report", action="store_true", help="do not write bench/results (tests, trial runs)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from apexctl.atomic import write_text
    from apexctl.machine import cpu_model
    from apexctl.recipe import load_recipe

    setting = SETTINGS[args.setting]
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    work = Path(args.work or ROOT / "runs" / "bench-quality" / setting.name)
    work.mkdir(parents=True, exist_ok=True)
    guidance = load_recipe(ROOT / setting.teacher_recipe).sample.guidance
    rows = build_rows(guidance)
    choice = args.rows if args.rows != "default" else ";".join(setting.rows or ("every",))
    if choice != "every":
        wanted = {w.strip() for w in choice.split(";")}
        rows = [r for r in rows if r.group in wanted or r.name in wanted]
        unknown = wanted - {r.group for r in rows} - {r.name for r in rows}
        if unknown or not rows:
            print(f"--rows: unknown {sorted(unknown)}; groups: main, few-step, apex ablation, apex_paper ablation")
            return 2
    if args.rows == "default" and setting.skip:
        rows = [r for r in rows if not r.name.startswith(setting.skip)]
    t0 = time.perf_counter()
    teacher, cache, teacher_s = ensure_teacher(
        setting, work, threads=max(2, args.threads), quiet=args.quiet, steps=args.teacher_steps
    )
    jobs = make_jobs(setting, rows, seeds, work, teacher, cache, args)
    before = work / "results.jsonl"
    known = {json.loads(x)["key"] for x in before.read_text().splitlines() if x.strip()} if before.is_file() else set()
    if args.rescore and before.is_file():
        old = {json.loads(x)["key"]: json.loads(x) for x in before.read_text().splitlines() if x.strip()}
        jobs = [replace(j, rescore=old[j.key]) for j in jobs if j.key in old]
        shutil.copyfile(before, before.with_name("results.before-rescore.jsonl"))
        write_text(before, "")  # the fresh scores replace the old ones (kept in results.before-rescore.jsonl)
        known = set()
    records = run_all(jobs, before, args.workers, args.quiet)
    wall = time.perf_counter() - t0
    entries = aggregate(rows, records)
    print(markdown_table(entries))
    print()
    print(questions(entries))
    if args.no_report:
        return 0
    student = load_recipe(ROOT / setting.student_recipe)
    meta = {
        "command": "python bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, torch {__import__('torch').__version__}",
        "workers": args.workers,
        "threads": args.threads,
        "wall_min": wall / 60,
        "runs": len(jobs),
        "runs_read_back": sum(j.key in known for j in jobs),  # finished by an earlier, interrupted invocation
        "run_minutes": sum(
            (r.get("train_s") or 0) + sum(e.get("sample_s", 0) for e in r["evals"].values()) for r in records
        )
        / 60,
        "teacher_train_s": teacher_s,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "budget": args.budget or setting.budget,
        "micro_batch": student.train.micro_batch,
        "lr": args.lr or setting.lr or student.train.lr,
        "seeds": seeds,
        "per_prompt": args.per_prompt or setting.per_prompt,
    }
    payload = {"meta": meta, "rows": [asdict(r) for r in rows], "records": records}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text(RESULTS / f"quality_{setting.name}.json", json.dumps(payload, indent=1, default=str))
    render_markdown()
    print(f"wrote {RESULTS / 'quality.md'} ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
