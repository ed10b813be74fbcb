"""``apexctl eval report RUN``: one self-contained HTML page of a run (``RUN/report/report.html``).

Sections: the run (recipe essentials, last logged step), training curves from ``metrics.jsonl`` (inline SVG, one
chart per metric: loss, every ``loss/<term>``, grad norm, lr, learnable shift, step time, peak memory), sample grids
of the trained model at 1/2/4 steps (PNG, embedded as base64; drawn once into ``RUN/report/`` with fixed seeds and
reused), and every evaluation summary found under ``RUN/eval/`` as a table: ``fid.json``, ``clip_score.json``,
digits / scenes ``results.json`` (with per-prompt seed diversity and single-prompt FD), GenEval ``summary.json``;
any other JSON summary as key/value rows.
"""

from __future__ import annotations

import base64
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path
from typing import Any

from apexctl.atomic import write_text
from apexctl.errors import BadInput
from apexctl.eval.report.plots import line_chart
from apexctl.recipe import Recipe

GENERIC_PROMPTS = [
    "a red fox in the snow",
    "a photo of a cat",
    "an astronaut riding a horse",
    "a blue bird on a branch",
]
CURVE_ORDER = ("loss", "loss/", "grad_norm", "lr", "shift/", "step_time", "peak_mem_mb")
SKIP_DIRS = {"samples"}  # image sets drawn by eval fid / clip-score: their meta.json is not a summary
# settings files beside images (sample sets, GenEval's generation.json / NNNNN/seeds.json), not summaries
SKIP_NAMES = {"meta.json", "seeds.json", "generation.json"}

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;max-width:1400px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.charts{display:flex;flex-wrap:wrap;gap:8px}.grids{display:flex;flex-wrap:wrap;gap:16px}
figure{margin:0}figcaption{font-size:13px;color:#555}img{image-rendering:pixelated;border:1px solid #ccc}
.note{color:#555;font-size:13px}
"""


# ---------------------------------------------------------------------------------------------- small HTML helpers
def _cell(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return f"<td>{'–' if v is None else escape(str(v))}</td>"
    if isinstance(v, float):
        return f'<td class="num">{"–" if not math.isfinite(v) else f"{v:.4g}"}</td>'
    if isinstance(v, int):
        return f'<td class="num">{v}</td>'
    return f"<td>{escape(str(v))}</td>"


def html_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


# ---------------------------------------------------------------------------------------------- training curves
def read_metrics(run: Path) -> list[dict[str, Any]]:
    """The rows of ``RUN/metrics.jsonl`` (a torn last line from a killed run is skipped)."""
    from apexctl.training.metrics import read_rows

    return read_rows(Path(run) / "metrics.jsonl")


def curve_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The numeric metrics worth a chart, in CURVE_ORDER (loss first, then its terms, …)."""
    keys = {k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def rank(k: str) -> tuple[int, str]:
        for i, prefix in enumerate(CURVE_ORDER):
            if k == prefix or (prefix.endswith("/") and k.startswith(prefix)) or k.startswith(prefix + "/"):
                return i, k
        return len(CURVE_ORDER), k

    return sorted((k for k in keys if rank(k)[0] < len(CURVE_ORDER)), key=rank)


def curves_html(rows: Sequence[dict[str, Any]]) -> str:
    charts = []
    for key in curve_keys(rows):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
        svg = line_chart([p[0] for p in pts], [p[1] for p in pts], key)
        if svg:
            charts.append(svg)
    if not charts:
        return '<p class="note">no metrics.jsonl rows in this run</p>'
    return '<div class="charts">' + "".join(charts) + "</div>"


# ---------------------------------------------------------------------------------------------- sample grids
def default_prompts(recipe: Recipe) -> list[str]:
    """Grid prompts: ``train.sample_prompts``, else 4 digit prompts for the digits source, else 4 generic ones."""
    given = getattr(recipe.train, "sample_prompts", None)
    if given:
        return list(given)[:4]
    if recipe.data.source == "digits":
        from apexctl.data.digits import eval_prompts

        return [e.prompt for e in eval_prompts()][:4]
    return GENERIC_PROMPTS


def sample_grids(
    recipe: Recipe,
    folder: Path,
    steps: Sequence[int],
    prompts: list[str],
    *,
    per_prompt: int = 4,
    seed: int = 0,
    quiet: bool = False,
) -> list[tuple[int, Path]]:
    """``folder/samples-<k>step.png`` for each k (one row per prompt, seeds seed..seed+per_prompt−1); existing
    grids are kept, the model is loaded only when one is missing."""
    from apexctl.images import save_grid
    from apexctl.inference import (
        ModelInfo,
        generate_images,
        is_distilled,
        load_trained,
        resolve_sample_settings,
    )

    paths = [(k, Path(folder) / f"samples-{k}step.png") for k in steps]
    missing = [(k, p) for k, p in paths if not p.is_file()]
    if missing:
        from apexctl.ranks import job_ranks

        model = load_trained(recipe).to(job_ranks().device)
        info = ModelInfo(distilled=is_distilled(recipe))
        texts = [p for p in prompts for _ in range(per_prompt)]
        seeds = [seed + j for _ in prompts for j in range(per_prompt)]
        for k, path in missing:
            s = resolve_sample_settings(recipe, info, steps=k, seed=seed)
            label = f"report grid {k} step{'s' if k > 1 else ''}"
            images = generate_images(model, texts, seeds, quiet=quiet, label=label, **s.sampler_kwargs())
            size = min(s.height, s.width)
            save_grid(images, path, nrow=per_prompt, upscale=max(1, 64 // size), labels=prompts)
    return paths


def grids_html(paths: Sequence[tuple[int, Path]]) -> str:
    figs = [
        f'<figure><img src="{png_data_uri(p)}" alt="samples {k} step"><figcaption>{k} step{"s" if k > 1 else ""}'
        "</figcaption></figure>"
        for k, p in paths
        if p.is_file()
    ]
    return '<div class="grids">' + "".join(figs) + "</div>" if figs else '<p class="note">no sample grids</p>'


# ---------------------------------------------------------------------------------------------- eval summaries
def _fid_table(s: dict[str, Any]) -> str:
    g, r = s.get("generated", {}), s.get("reference", {})
    return html_table(
        ["generated", "reference", "n gen", "n ref", "FID ↓"],
        [[g.get("label", g.get("path")), r.get("label", r.get("path")), g.get("n"), r.get("n"), s.get("fid")]],
    )


def _clip_table(s: dict[str, Any]) -> str:
    rows = [[name, r.get("n"), r.get("clip_score")] for name, r in s.get("rows", {}).items()]
    return html_table(["images", "n", "CLIP score ↑"], rows) + f'<p class="note">{escape(str(s.get("clip")))}</p>'


def _digits_table(s: dict[str, Any]) -> str:
    """The toy judges' ``results.json`` (digits and scenes): one row per evaluated row (the columns of
    :func:`apexctl.eval.toy.digits.format_table`), then the single prompts' seed diversity and FD per prompt."""
    rows = []
    results = s.get("rows", {})
    for name, r in results.items():
        a = r.get("alignment", {})
        rows.append(
            [
                name,
                a.get("single"),
                a.get("multi"),
                r.get("multi_coverage"),
                r.get("fd"),
                r.get("diversity"),
                r.get("seed_diversity"),
                r.get("fd_single"),
                r.get("n"),
            ]
        )
    header = ["row", "align single ↑", "align multi ↑", "cover multi ↑", "FD ↓", "diversity ≈real"]
    header += ["seed div ≈real", "FD single ↓", "n"]
    out = html_table(header, rows)
    for key, title in (("seed_diversity", "seed diversity ≈real"), ("fd_single", "FD to the prompt's class ↓")):
        out += _per_prompt_table(results, key + "_per_prompt", title)
    return out


def _per_prompt_table(results: dict[str, Any], key: str, title: str) -> str:
    """Single prompt × evaluated row of ``results[row][key]`` (a prompt → value dict); empty if no row has it."""
    per = {name: r[key] for name, r in results.items() if isinstance(r, dict) and isinstance(r.get(key), dict)}
    prompts = list(dict.fromkeys(p for d in per.values() for p in d))
    if not prompts:
        return ""
    rows = [[p, *(per[name].get(p) for name in per)] for p in prompts]
    return f'<p class="note">per single prompt: {escape(title)}</p>' + html_table(["prompt", *per], rows)


def _geneval_table(s: dict[str, Any]) -> str:
    rows = [[t, v.get("accuracy"), v.get("correct"), v.get("total")] for t, v in s.get("tasks", {}).items()]
    rows.append(["overall (mean of tasks)", s.get("overall"), None, None])
    note = "" if s.get("complete", False) else '<p class="note">PARTIAL: not comparable to published numbers</p>'
    return html_table(["task", "accuracy ↑", "correct", "images"], rows) + note


def _generic_table(s: dict[str, Any]) -> str:
    rows = [[k, v] for k, v in s.items() if isinstance(v, (int, float, str, bool)) or v is None]
    return html_table(["key", "value"], rows)


def summary_kind(s: Any) -> str:
    """Which table renders a summary JSON: fid | clip_score | digits | geneval | generic."""
    if not isinstance(s, dict):
        return "generic"
    if s.get("metric") in ("fid", "clip_score"):
        return s["metric"]
    if "judge_test_accuracy" in s and "rows" in s:
        return "digits"
    if isinstance(s.get("tasks"), dict) and "overall" in s:
        return "geneval"
    return "generic"


RENDER = {
    "fid": ("FID", _fid_table),
    "clip_score": ("CLIP score", _clip_table),
    "digits": ("Digits", _digits_table),
    "geneval": ("GenEval", _geneval_table),
    "generic": ("Summary", _generic_table),
}


def find_summaries(run: Path) -> list[tuple[Path, str, dict[str, Any]]]:
    """``(path, kind, summary)`` for every JSON summary in ``RUN/eval`` or one folder below it (``eval/fid.json``,
    ``eval/digits/results.json``, ``eval/geneval/summary.json``); image sets and settings files are skipped."""
    root = Path(run) / "eval"
    found = []
    for path in sorted(root.rglob("*.json")) if root.is_dir() else []:
        rel = path.relative_to(root).parts
        if len(rel) > 2 or rel[0] in SKIP_DIRS or path.name in SKIP_NAMES or any(p.startswith(".") for p in rel):
            continue
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        found.append((path, summary_kind(data), data))
    return found


def summaries_html(run: Path) -> str:
    parts = []
    for path, kind, data in find_summaries(run):
        title, render = RENDER[kind]
        parts.append(f"<h3>{escape(title)} <small>({escape(str(path.relative_to(run)))})</small></h3>{render(data)}")
    return "".join(parts) or '<p class="note">no evaluation summaries under eval/ yet</p>'


# ---------------------------------------------------------------------------------------------- page
def _run_table(run: Path, recipe: Recipe, rows: Sequence[dict[str, Any]]) -> str:
    last = rows[-1] if rows else {}
    lora = recipe.model.lora
    items = [
        ("run", str(run)),
        ("model", recipe.model.path),
        ("trained", f"LoRA rank {lora.rank}" if lora is not None else "full model"),
        ("objective", recipe.method.objective),
        ("steps (recipe)", recipe.train.steps),
        ("last logged step", last.get("step")),
        ("last loss", last.get("loss")),
        *_time_rows(run, rows),
    ]
    return html_table(["", ""], items)


def _time_rows(run: Path, rows: Sequence[dict[str, Any]]) -> list[tuple[str, Any]]:
    """The run's wall time from ``RUN/run.json`` (summed over resumed segments: loading, steps, checkpoints,
    grids, export) and the median logged step time. The logged steps' sum is no training time: with
    ``log_every: N`` it counts one step in N, and it leaves out everything around the steps."""
    from apexctl.training.metrics import RUN_INFO

    try:
        info = json.loads((Path(run) / RUN_INFO).read_text())
    except (OSError, ValueError):
        info = {}
    wall = info.get("wall_time_s") if isinstance(info, dict) else None
    if isinstance(wall, (int, float)):
        lower = "" if info.get("wall_time_known", True) else "≥ "  # resumed from a checkpoint without the record
        parts = info.get("segments", 1)
        when = "finished" if info.get("finished") else f"at step {info.get('step')}"
        wall_cell: Any = f"{lower}{wall:.1f} s ({_duration(wall)}; {when}, {parts} segment{'s' * (parts != 1)})"
    else:
        wall_cell = "unknown (no run.json: the run is still going, or an older apexctl wrote it)"
    times = [r["step_time"] for r in rows if isinstance(r.get("step_time"), (int, float))]
    return [
        ("wall time", wall_cell),
        ("median step time (s, logged steps)", statistics.median(times) if times else None),
    ]


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"


def write_report(
    run: Path,
    *,
    out: Path | None = None,
    samples: bool = True,
    steps: Sequence[int] = (1, 2, 4),
    prompts: list[str] | None = None,
    per_prompt: int = 4,
    seed: int = 0,
    quiet: bool = False,
) -> Path:
    """Render the report of ``run`` (see the module docstring); returns the HTML path."""
    from apexctl.eval.sample_sets import load_run

    run = Path(run)
    recipe = load_run(run)
    if samples and not ((run / "model").is_dir() or (run / "lora").is_dir()):
        raise BadInput(f"{run}: no trained model/ or lora/ to draw samples from; pass --no-samples")
    folder = (out.parent if out is not None else run / "report").resolve()
    rows = read_metrics(run)
    grids = (
        sample_grids(
            recipe, folder, steps, prompts or default_prompts(recipe), per_prompt=per_prompt, seed=seed, quiet=quiet
        )
        if samples
        else []
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>apexctl report: {escape(run.name)}</title>"
        f"<style>{CSS}</style></head><body><h1>apexctl report: {escape(run.name)}</h1>"
        f"{_run_table(run, recipe, rows)}"
        f"<h2>Training curves</h2>{curves_html(rows)}"
        + (f"<h2>Samples (seeds {seed}–{seed + per_prompt - 1})</h2>{grids_html(grids)}" if samples else "")
        + f"<h2>Evaluations</h2>{summaries_html(run)}</body></html>\n"
    )
    dest = out or folder / "report.html"
    write_text(dest, page)
    return dest
