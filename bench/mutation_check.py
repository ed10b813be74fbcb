"""Mutation check: one-line breakages that the test suite must catch (issue 13). Not part of `make test`.

    .venv/bin/python bench/mutation_check.py [--only NAME ...] [--list] [--out bench/results] [--timeout 900]

Each entry of ``MUTATIONS`` is a one-line breakage: a file under ``apexctl/``, the exact text it replaces (which must
occur once in that file, else the entry is reported ``stale``), the new text, and the tests that should catch it.
For each entry, in turn, a fresh scratch copy of the package (a ``tempfile`` folder) gets that one edit, and the
named tests run in a subprocess from a scratch tree that holds the copy and links the rest of the repository, with
``PYTHONPATH`` pointing at it too (subprocesses the tests start, e.g. ``python -m apexctl`` or ``--launch 2``, inherit
both). The result is

- ``caught``: the tests fail (pytest exit 1);
- ``survived``: they all pass (exit 0): the breakage would ship;
- ``error``: anything else (a collection error, a timeout): the entry or its test list needs fixing.

First, an unchanged copy runs every named test once (the baseline: they must pass, else the table says nothing),
and a probe checks that the copy, not the installed tree, is what gets imported. The table (with seconds per
entry) is printed and written to ``OUT/mutation_check.md``. Rows marked "issue 13" are the breakages that passed
the whole suite before issue 13's tests (tests/test_guarantees.py); the others were already caught.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
G = "tests/test_guarantees.py::"


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str  # the breakage, in words
    path: str  # relative to apexctl/
    old: str
    new: str
    tests: tuple[str, ...]
    issue13: bool = False  # one of the rows that passed the whole suite before issue 13
    note: str = ""


MUTATIONS: list[Mutation] = [
    # -- the rows of issue 13's table (each passed the whole suite before tests/test_guarantees.py) ------------
    Mutation(
        "few-step-sign",
        "few-step sampler takes x̂ = x + t·v instead of x − t·v",
        "engine/sampler.py",
        "        x_hat = x - t * v\n",
        "        x_hat = x + t * v\n",
        (
            G + "test_few_step_is_two_endpoint_steps_by_hand",
            G + "test_few_step_returns_the_data_point_of_an_exact_velocity",
        ),
        True,
    ),
    Mutation(
        "metrics-rows-kept",
        "resume no longer drops metrics.jsonl rows past the checkpoint",
        "training/metrics.py",
        'keep = [json.dumps(r) for r in read_rows(self.path) if r.get("step", 0) <= step]',
        "keep = [json.dumps(r) for r in read_rows(self.path)]",
        (G + "test_a_run_killed_after_logging_resumes_with_each_step_logged_once",),
        True,
    ),
    Mutation(
        "keep-last-noop",
        "keep_last pruning does nothing",
        "training/checkpoint.py",
        "    for _, p in complete_checkpoints(run)[:-keep_last]:\n",
        "    for _, p in complete_checkpoints(run)[:0]:\n",
        (G + "test_keep_last_leaves_exactly_the_newest_checkpoints",),
        True,
    ),
    Mutation(
        "grad-checkpointing-off",
        "enable_gradient_checkpointing() never called",
        "training/session.py",
        "        transformer.enable_gradient_checkpointing()\n",
        "        pass\n",
        (G + "test_gradient_checkpointing_is_active",),
        True,
    ),
    Mutation(
        "grid-from-live",
        "sample grids drawn from the live weights instead of the EMA",
        "training/grids.py",
        '    use_ema = sess.ema is not None and tr.export != "live"\n',
        "    use_ema = False\n",
        (G + "test_sample_grid_is_drawn_from_the_ema",),
        True,
    ),
    Mutation(
        "ema-on-skipped-step",
        "the EMA updated on skipped non-finite steps",
        "training/step.py",
        "    if sess.ema is not None and not skipped:\n",
        "    if sess.ema is not None:\n",
        (G + "test_a_skipped_step_leaves_the_ema_unchanged",),
        True,
    ),
    Mutation(
        "resume-oldest",
        "resume picks the oldest complete checkpoint",
        "training/checkpoint.py",
        "    for _, folder in reversed(done):\n",
        "    for _, folder in done:\n",
        (G + "test_resume_auto_takes_the_newest_complete_checkpoint",),
        True,
    ),
    # -- breakages the suite already caught ----------------------------------------------------------------------
    Mutation(
        "apex-fake-target",
        "apex L_fake regresses on x̂ − z2 instead of z2 − x̂",
        "engine/objectives.py",
        "    loss_fake = _mse(f_fake, velocity_target(x_hat, z2))\n",
        "    loss_fake = _mse(f_fake, velocity_target(z2, x_hat))\n",
        ("tests/test_objectives.py::test_apex_loss_and_gradients_by_hand",),
    ),
    Mutation(
        "apex-rectify-sign",
        "apex L_rect moves x̂ by −Δ instead of +Δ",
        "engine/objectives.py",
        "    loss_rect = _mse(f_gen, (f_gen - step).detach())\n",
        "    loss_rect = _mse(f_gen, (f_gen + step).detach())\n",
        ("tests/test_objectives.py::test_apex_loss_and_gradients_by_hand",),
    ),
    Mutation(
        "fm-target-sign",
        "flow matching regresses on x − z instead of z − x",
        "engine/objectives.py",
        "    loss = _mse(net(interpolate(x, z, t), t, cond), velocity_target(x, z))\n",
        "    loss = _mse(net(interpolate(x, z, t), t, cond), velocity_target(z, x))\n",
        ("tests/test_objectives.py::test_flow_matching_by_hand",),
    ),
    Mutation(
        "paper-mix-swapped",
        "apex_paper's L_mix target weighs v_fake by 1 − λ and z − x by λ",
        "engine/objectives.py",
        "    target = (1.0 - cfg.lambda_mix) * velocity_target(x, z) + cfg.lambda_mix * v_fake\n",
        "    target = cfg.lambda_mix * velocity_target(x, z) + (1.0 - cfg.lambda_mix) * v_fake\n",
        ("tests/test_objectives.py::test_apex_paper_by_hand",),
        note="survived this check's first run: the test's λ was ½, where the swap changes nothing; now λ = 0.3",
    ),
    Mutation(
        "interpolation-sign",
        "the path x_t = t·x + (1−t)·z (t = 1 data instead of noise)",
        "engine/flow.py",
        "    return tb * z + (1.0 - tb) * x\n",
        "    return tb * x + (1.0 - tb) * z\n",
        ("tests/test_ema_flow.py::test_path_identities", "tests/test_objectives.py::test_flow_matching_by_hand"),
    ),
    Mutation(
        "shift-mask-inverted",
        "the condition shift applied to the real rows instead of the fake ones",
        "engine/shift.py",
        "        return torch.where(m, shifted, h)\n",
        "        return torch.where(m, h, shifted)\n",
        ("tests/test_shift.py::test_hook_shifts_only_masked_rows_and_is_removed",),
    ),
    Mutation(
        "euler-step-sign",
        "the teacher's Euler step x + (σ_i − σ_{i+1})·v",
        "engine/sampler.py",
        "        x = (x.float() + (s_next - s) * v.float()).to(z.dtype)\n",
        "        x = (x.float() + (s - s_next) * v.float()).to(z.dtype)\n",
        ("tests/test_family_conformance.py::test_euler_equals_the_stock_pipeline[qwen_image-1.0]",),
    ),
    Mutation(
        "data-position-lost",
        "resume restarts the epoch's data order at position 0",
        "data/cache.py",
        '        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])\n',
        '        self.epoch, self.pos = int(state["epoch"]), 0\n',
        ("tests/test_checkpoints.py::test_checkpoint_written_before_the_split_resumes",),
    ),
    Mutation(
        "ema-decay-swapped",
        "the EMA keeps 1 − d of the shadow instead of d",
        "engine/ema.py",
        "            s.lerp_(p.detach().float(), 1.0 - self.decay)\n",
        "            s.lerp_(p.detach().float(), self.decay)\n",
        ("tests/test_ema_flow.py::test_ema_update_and_shadow_forward_leave_live_graph_intact",),
    ),
    Mutation(
        "few-step-zhat-sign",
        "deterministic re-noising takes ẑ = x − (1−t)·v instead of x + (1−t)·v",
        "engine/sampler.py",
        "            eps = x + (1.0 - t) * v\n",
        "            eps = x - (1.0 - t) * v\n",
        (G + "test_few_step_is_two_endpoint_steps_by_hand",),
    ),
    Mutation(
        "one-step-sign",
        "the one-step sampler takes x = z + F(z, 1, c)",
        "engine/sampler.py",
        "    return z - backbone.velocity(z, _t(1.0, z), cond)\n",
        "    return z + backbone.velocity(z, _t(1.0, z), cond)\n",
        ("tests/test_lora.py::test_stock_pipeline_with_the_lora_equals_apexctl_one_step",),
    ),
]


#: top-level entries of the repository the scratch tree does not link (the package is copied, the rest is not needed)
_NOT_LINKED = {"apexctl", "apexctl.egg-info", ".git", ".venv", ".pytest_cache", ".ruff_cache", "runs", "cache"}


def copy_package(dest: Path) -> Path:
    """A scratch tree ``dest``: a copy of ``apexctl/`` and symlinks to the rest of the repository (tests, recipes,
    pyproject.toml, ...), so the tests run from ``dest`` as from the repository root. The tests run with ``dest``
    as their working directory: ``python -m`` puts the working directory first on ``sys.path``, ahead of
    ``PYTHONPATH``, so from the real root the real package would be imported."""
    dest.mkdir(parents=True)
    shutil.copytree(ROOT / "apexctl", dest / "apexctl", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for entry in ROOT.iterdir():
        if entry.name not in _NOT_LINKED:
            (dest / entry.name).symlink_to(entry)
    return dest


def apply(m: Mutation, scratch: Path) -> str | None:
    """Edit the scratch copy; None, or why the entry does not apply (``stale``)."""
    f = scratch / "apexctl" / m.path
    if not f.is_file():
        return f"no file apexctl/{m.path}"
    text = f.read_text(encoding="utf-8")
    n = text.count(m.old)
    if n != 1:
        return f"the old text occurs {n} times in apexctl/{m.path}"
    f.write_text(text.replace(m.old, m.new), encoding="utf-8")
    return None


def env_for(scratch: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(scratch), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.pop("PYTEST_ADDOPTS", None)
    return env


def probe(scratch: Path) -> None:
    """The scratch copy is what ``import apexctl`` finds (not the editable install), from the scratch tree and from
    any other working directory (a test's subprocess in its tmp_path)."""
    for cwd in (scratch, Path(tempfile.gettempdir())):
        out = subprocess.run(
            [sys.executable, "-c", "import apexctl; print(apexctl.__file__)"],
            cwd=cwd,
            env=env_for(scratch),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if not Path(out).is_relative_to(scratch):
            raise SystemExit(f"from {cwd}, apexctl is imported from {out}, not from the scratch copy {scratch}")


def run_tests(tests: tuple[str, ...], scratch: Path, timeout: float) -> tuple[int | None, float, str, list[str]]:
    """(pytest exit code or None on timeout, seconds, the tail of its output, the tests that failed)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=scratch, env=env_for(scratch), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - t0, f"timed out after {timeout:.0f} s", []
    lines = (res.stdout + res.stderr).strip().splitlines()
    failed = [x.split()[1] for x in lines if x.startswith(("FAILED ", "ERROR ")) and len(x.split()) > 1]
    return res.returncode, time.perf_counter() - t0, "\n".join(lines[-15:]), failed


def verdict(code: int | None) -> str:
    return {0: "survived", 1: "caught"}.get(code, "error") if code is not None else "error"


def check(mutations: list[Mutation], timeout: float, verbose: bool) -> tuple[list[dict], dict]:
    results = []
    with tempfile.TemporaryDirectory(prefix="apexctl-mut-") as tmp:
        base = copy_package(Path(tmp) / "baseline")
        probe(base)
        tests = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
        print(f"baseline: {len(tests)} tests on an unchanged copy ...", flush=True)
        code, secs, tail, _ = run_tests(tests, base, timeout)
        baseline = {"code": code, "seconds": secs, "tests": len(tests), "tail": tail}
        print(f"baseline: {'pass' if code == 0 else 'FAIL'} ({secs:.1f} s)", flush=True)
        if code != 0:
            print(tail)
            return results, baseline
        for i, m in enumerate(mutations, 1):
            scratch = copy_package(Path(tmp) / f"m{i:02d}")
            problem = apply(m, scratch)
            if problem:
                row = {"m": m, "result": "stale", "seconds": 0.0, "detail": problem, "failed": []}
            else:
                code, secs, tail, failed = run_tests(m.tests, scratch, timeout)
                row = {"m": m, "result": verdict(code), "seconds": secs, "detail": tail, "failed": failed}
            results.append(row)
            print(f"[{i:2d}/{len(mutations)}] {row['result']:8s} {row['seconds']:6.1f} s  {m.name}", flush=True)
            if verbose or row["result"] in ("error", "stale"):
                print("    " + row["detail"].replace("\n", "\n    "))
            shutil.rmtree(scratch, ignore_errors=True)
    return results, baseline


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "apexctl"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() + (" (apexctl/ has uncommitted changes)" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def report(results: list[dict], baseline: dict, argv: list[str], total: float) -> str:
    from apexctl.machine import cpu_model

    counts = {k: sum(r["result"] == k for r in results) for k in ("caught", "survived", "error", "stale")}
    lines = [
        "# Mutation check",
        "",
        "One-line breakages applied one at a time to a scratch copy of `apexctl/`, each running the tests that "
        "should catch it (`bench/mutation_check.py`; docs/testing.md explains it). **caught**: the tests fail; "
        "**survived**: they pass, so the breakage would ship. Rows marked *issue 13* passed the whole suite before "
        "`tests/test_guarantees.py`.",
        "",
        f"- command: `{shlex.join(['python', 'bench/mutation_check.py', *argv])}`",
        f"- date: {datetime.date.today().isoformat()}, commit {_commit()}",
        f"- machine: {cpu_model()}, {os.cpu_count()} logical CPUs; Python {platform.python_version()}",
        f"- baseline (unchanged copy, {baseline['tests']} tests): "
        f"{'pass' if baseline['code'] == 0 else 'FAIL'}, {baseline['seconds']:.1f} s",
        f"- result: {counts['caught']} caught, {counts['survived']} survived, {counts['error']} errors, "
        f"{counts['stale']} stale, of {len(results)}; {total:.0f} s in all",
        "",
        "| # | breakage | file | result | s | tests (✗: failed with the breakage) |",
        "|---|---|---|---|---:|---|",
    ]
    for i, r in enumerate(results, 1):
        m = r["m"]
        mark = (" *(issue 13)*" if m.issue13 else "") + (f" ({m.note})" if m.note else "")
        tests = "<br>".join(
            f"{'✗ ' if any(f == t or f.startswith(t + '[') for f in r['failed']) else ''}`{t.removeprefix('tests/')}`"
            for t in m.tests
        )
        lines.append(
            f"| {i} | `{m.name}`: {m.what}{mark} | `apexctl/{m.path}` | **{r['result']}** | {r['seconds']:.1f} | "
            f"{tests} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these entries (names from --list)")
    ap.add_argument("--list", action="store_true", help="list the entries and exit")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder for mutation_check.md")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the tail of every pytest run")
    args = ap.parse_args(argv)
    raw = sys.argv[1:] if argv is None else argv

    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:24s} apexctl/{m.path}: {m.what}")
        return 0
    chosen = MUTATIONS
    if args.only:
        unknown = set(args.only) - {m.name for m in MUTATIONS}
        if unknown:
            ap.error(f"unknown entries: {', '.join(sorted(unknown))} (see --list)")
        chosen = [m for m in MUTATIONS if m.name in args.only]

    t0 = time.perf_counter()
    results, baseline = check(chosen, args.timeout, args.verbose)
    if baseline["code"] != 0:
        print("the named tests fail on the unchanged package: fix that first", file=sys.stderr)
        return 1
    text = report(results, baseline, raw, time.perf_counter() - t0)
    print()
    print(text)
    from apexctl.atomic import write_text

    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "mutation_check.md", text)
    print(f"wrote {args.out / 'mutation_check.md'}")
    return 0 if all(r["result"] == "caught" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
