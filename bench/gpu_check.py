"""Every check that needs a GPU, in one run under 10 minutes on one H100/H200, written to one JSON.

    python bench/gpu_check.py --out gpu_check.json          # (bench/gpu_check.sh installs what is missing first)
    python bench/gpu_check.py --dry-run                      # print the stages and their commands, run nothing

Stages (each a subprocess with its own time limit, 570 s in all; a failure or a timeout is recorded and the next
stage runs):

1. ``smoke``: bench/gpu_smoke.py — the real Qwen-Image transformer (60 blocks, random bf16 weights), LoRA r=64, apex
   vs flow_matching steps at 512², micro-batch 4: s/step, peak memory, the ratio; then the apex step on an int8
   and an nf4 base (``model.quantize``, the model rebuilt for each).
2. ``sample_few``: ``apexctl sample --steps 4`` (few-step, stochastic re-noising) on CUDA from a tiny model: the
   path whose CPU generators once could not drive CUDA tensors.
3. ``prepare_cuda``: ``apexctl prepare --launch 1`` of the digits teacher pairs (teacher synthesis, 50 Euler steps
   at CFG 2) on CUDA, after a short digits teacher run: items/s from prepare_report.json.
4. ``digits_bf16``: the digits teacher and the default student in bf16 (shortened: ``--teacher-steps`` /
   ``--student-steps``), then ``apexctl eval digits``: FD, coverage, alignment, seed diversity.
5. ``memory``: bench/memory.py --quick for full-width Qwen-Image blocks on the GPU (torch.cuda peaks), bf16 and
   int8 / nf4 bases, to set beside the CPU-measured table shipped in apexctl/models/configs/activations.json.

The JSON holds, per stage: the command, exit status, seconds, the tail of its output and the numbers it produced;
it is rewritten after every stage, so a run cut short still reports what finished.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _apexctl(*args: object) -> list[str]:
    return [sys.executable, "-m", "apexctl", *map(str, args)]


def stages(work: Path, teacher_steps: int, student_steps: int) -> list[dict]:
    """The stages: name, time limit (s), commands, and how to read their numbers."""
    teacher = work / "teacher.yaml"
    student = work / "student.yaml"
    pairs = work / "pairs.yaml"
    return [
        {
            "name": "smoke",
            "limit": 250,
            "commands": [
                [
                    sys.executable,
                    "bench/gpu_smoke.py",
                    "--steps",
                    "4",
                    "--warmup",
                    "1",
                    "--quantize",
                    "int8,nf4",
                    "--out",
                    work / "smoke.json",
                ]  # fmt: skip
            ],
            "result": work / "smoke.json",
        },
        {
            "name": "sample_few",
            "limit": 40,
            "commands": [
                _apexctl(
                    "sample",
                    "a red fox",
                    "--model",
                    "tiny:test",
                    "--steps",
                    "4",
                    "--method",
                    "few",
                    "-n",
                    "4",
                    "--size",
                    "32",
                    "--out",
                    work / "few",
                    "-q",
                ),  # fmt: skip
            ],
            "result": work / "few" / "samples.json",
        },
        {
            "name": "digits_bf16",
            "limit": 170,
            "setup": lambda: _digits_recipes(work, teacher, student, pairs, teacher_steps, student_steps),
            "commands": [
                _apexctl("prepare", teacher, "-q"),
                _apexctl("distill", teacher, "-q"),
                _apexctl("distill", student, "-q"),
                _apexctl("eval", "digits", "--recipe", student, "--out", work / "digits-eval", "-q"),
            ],
            "result": work / "digits-eval",
        },
        {
            "name": "prepare_cuda",
            "limit": 40,
            "commands": [_apexctl("prepare", pairs, "--launch", "1", "-q")],
            "result": work / "cache-pairs" / "prepare_report.json",
        },
        {
            "name": "memory",
            "limit": 70,
            "commands": [
                [
                    sys.executable,
                    "bench/memory.py",
                    "--families",
                    "qwen_image",
                    "--quick",
                    "--quantize",
                    "int8,nf4",
                    "--out",
                    work / "memory",
                ]  # fmt: skip
            ],
            "result": work / "memory" / "memory.jsonl",
        },
    ]


def _digits_recipes(
    work: Path, teacher: Path, student: Path, pairs: Path, teacher_steps: int, student_steps: int
) -> None:
    """The shipped digits recipes with bf16 on the GPU, shorter runs and every folder under ``work``."""
    import yaml

    def write(src: str, dest: Path, **sections: dict) -> None:
        tree = yaml.safe_load((ROOT / "recipes" / src).read_text())
        for key, values in sections.items():
            tree.setdefault(key, {}).update(values)
        dest.write_text(yaml.safe_dump(tree))

    cuda = {"device": "cuda", "precision": "bf16"}
    write("digits_teacher.yaml", teacher, hardware=cuda, train={"steps": teacher_steps},
          data={"cache_dir": str(work / "cache-digits")}, output={"dir": str(work / "teacher")})  # fmt: skip
    write("digits.yaml", student, hardware=cuda, train={"steps": student_steps},
          model={"path": str(work / "teacher" / "model")}, data={"cache_dir": str(work / "cache-digits")},
          output={"dir": str(work / "student")})  # fmt: skip
    write("digits_pairs.yaml", pairs, hardware={"device": "cuda"}, model={"path": str(work / "teacher" / "model")},
          data={"cache_dir": str(work / "cache-pairs")})  # fmt: skip


def _numbers(result: Path | None) -> object:
    """What a stage wrote: a JSON file, the rows of a JSONL, or the summary JSON files of a folder."""
    if result is None or not result.exists():
        return None
    if result.is_dir():
        return {p.name: json.loads(p.read_text()) for p in sorted(result.glob("*.json"))}
    if result.suffix == ".jsonl":
        return [json.loads(x) for x in result.read_text().splitlines() if x.strip()]
    return json.loads(result.read_text())


def run_stage(stage: dict, env: dict) -> dict:
    out = {"name": stage["name"], "limit_s": stage["limit"], "commands": [], "ok": True}
    t0 = time.perf_counter()
    if "setup" in stage:
        stage["setup"]()
    for cmd in stage["commands"]:
        left = stage["limit"] - (time.perf_counter() - t0)
        rec = {"command": " ".join(map(str, cmd))}
        try:
            p = subprocess.run(list(map(str, cmd)), cwd=ROOT, env=env, capture_output=True, text=True, timeout=left)
            rec.update(rc=p.returncode, tail=(p.stdout + p.stderr)[-3000:])
        except subprocess.TimeoutExpired as e:
            rec.update(rc="timeout", tail=str(e.stdout or "")[-3000:])
        out["commands"].append(rec)
        if rec["rc"] != 0:
            out["ok"] = False
            break
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["numbers"] = _numbers(stage.get("result"))
    return out


def device_info() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(name=p.name, memory_gib=round(p.total_memory / 2**30, 1), count=torch.cuda.device_count())
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a fresh one next to --out)")
    ap.add_argument("--only", nargs="*", default=None, help="stage names to run (default: all)")
    ap.add_argument("--teacher-steps", type=int, default=1000, help="digits teacher steps (the recipe: 3000)")
    ap.add_argument("--student-steps", type=int, default=600, help="digits student steps (the recipe: 2000)")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    work = args.work or args.out.parent / "gpu_check_work"
    todo = [s for s in stages(work, args.teacher_steps, args.student_steps) if not args.only or s["name"] in args.only]
    if args.dry_run:
        for s in todo:
            print(f"{s['name']} (≤ {s['limit']} s):", *(" ".join(map(str, c)) for c in s["commands"]), sep="\n  ")
        return
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # the repo first, then what was there (gpu_check.sh's --target folder of carried wheels)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "APEXCTL_HOME": str(work / "home"), "PYTHONPATH": path}
    report = {"device": device_info(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "stages": []}
    for stage in todo:
        report["stages"].append(run_stage(stage, env))
        args.out.write_text(json.dumps(report, indent=1, default=str))
        s = report["stages"][-1]
        print(f"{s['name']}: {'ok' if s['ok'] else 'FAILED'} in {s['seconds']} s", flush=True)
    report["seconds"] = round(sum(s["seconds"] for s in report["stages"]), 1)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out} ({report['seconds']} s)")


if __name__ == "__main__":
    main()
