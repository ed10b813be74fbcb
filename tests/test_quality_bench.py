"""bench/quality.py: the aggregation arithmetic, the report, and one real (tiny) end-to-end pass."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "quality.py"


@pytest.fixture(scope="module")
def q():
    spec = importlib.util.spec_from_file_location("bench_quality", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def _rec(row: str, seed: int, evals: dict, train_s: float | None = 10.0) -> dict:
    return {"key": f"{row}|{seed}", "row": row, "group": "g", "seed": seed, "train_s": train_s, "evals": evals}


def test_cells_are_medians_with_ranges_and_time_is_a_ratio_to_apex(q):
    rows = [q.Row("apex", "main", steps=(1, 2)), q.Row("other", "main")]
    recs = [
        _rec("apex", 0, {"1": {"align": 0.5, "fd": 3.0}, "2": {"align": 0.9}}, train_s=10.0),
        _rec("apex", 1, {"1": {"align": 0.7, "fd": 1.0}, "2": {"align": 0.8}}, train_s=30.0),
        _rec("apex", 2, {"1": {"align": 0.6, "fd": 2.0}, "2": {"align": 0.7}}, train_s=20.0),
        _rec("other", 0, {"1": {"align": 0.1}}, train_s=50.0),
    ]
    entries = q.aggregate(rows, recs)
    assert [(e["row"], e["steps"]) for e in entries] == [("apex", 1), ("apex", 2), ("other", 1)]
    a1 = entries[0]
    assert a1["n"] == 3 and a1["cells"]["align"].median == pytest.approx(0.6)
    assert a1["cells"]["align"].text(2) == "0.60 (0.50–0.70)"
    assert a1["cells"]["fd"].median == pytest.approx(2.0)
    assert a1["cells"]["coverage"].text(2) == "–"  # never measured
    assert entries[1]["cells"]["align"].median == pytest.approx(0.8)
    assert a1["time_ratio"] == pytest.approx(1.0)
    assert entries[2]["time_ratio"] == pytest.approx(50.0 / 20.0)  # vs the apex median, 20 s
    table = q.markdown_table(entries)
    assert "| apex | 1 | 3 | 0.600 (0.500–0.700) |" in table and "| other | 1 | 1 | 0.100 |" in table


def test_rows_cover_the_issue_grid(q):
    rows = q.build_rows(2.0)
    names = {r.name for r in rows}

    def cells(prefix: str) -> set:
        return {
            (dict(r.sets)["method.shift.a"], dict(r.sets)["method.shift.b"]) for r in rows if r.name.startswith(prefix)
        }

    # projection site: b is an exact no-op there (tests/test_shift_sites.py), so the b = 0 column + the a = −1 row
    assert cells("apex shift a=") == {(-0.5, 0.0), (0.5, 0.0), (-1.0, 0.1), (-1.0, 1.0), (-1.0, 10.0)}
    # embeddings site: the 12-cell grid less the two cells RMSNorm makes equal to others
    emb = cells("apex shift@embeddings")
    assert len(emb) == 10 and (-0.5, 0.0) not in emb and (0.5, 0.0) not in emb and (0.5, 10.0) in emb
    assert {"apex_paper λp:λe=1:0", "apex_paper λp:λe=0:1", "apex without L_fake", "apex separate critic"} <= names
    teacher = next(r for r in rows if r.name == "teacher")
    assert teacher.teacher[0] == (50, "euler", 2.0) and teacher.teacher[-1] == (1, "one", 1.0)
    assert len(names) == len(rows)  # row names are keys


def test_job_keys_change_with_the_configuration(q, tmp_path):
    row = q.Row("apex", "main")

    class A:
        budget, lr, per_prompt, threads = 10, None, 2, 1

    setting = q.SETTINGS["digits"]
    j1 = q.make_jobs(setting, [row], [0, 1], tmp_path, "T", "C", A)
    A.budget = 11
    j2 = q.make_jobs(setting, [row], [0], tmp_path, "T", "C", A)
    assert j1[0].key != j1[1].key and j1[0].key != j2[0].key
    assert "train.steps=10" in j1[0].overrides and "train.seed=1" in j1[1].overrides


def _score_one_step(model: Path, per_prompt: int) -> dict:
    """The digits judge's score of ``model``'s one-step images x = z − F(z, 1, c), computed directly."""
    import torch

    from apexctl.data.digits import eval_prompts, load_split
    from apexctl.engine.sampler import one_step
    from apexctl.eval.toy.digits import DigitsJudge
    from apexctl.inference import seeded_noise
    from apexctl.models import load_backbone

    prompts = eval_prompts()
    texts = [p.prompt for p in prompts for _ in range(per_prompt)]
    unique = sorted(set(texts))  # as apexctl.inference encodes them: each prompt once, then indexed
    bb = load_backbone(str(model))
    with torch.no_grad():
        z = seeded_noise(bb.latent_shape(8, 8), [k % per_prompt for k in range(len(texts))])
        cond = bb.encode_prompts(unique)[torch.tensor([unique.index(t) for t in texts])]
        images = bb.decode_latents(one_step(bb, z, cond)).float()
    judge = DigitsJudge.fit(load_split(), seed=0)
    allowed = [p.allowed for p in prompts for _ in range(per_prompt)]
    return judge.score(images, allowed, [p.kind for p in prompts for _ in range(per_prompt)], texts)


def test_tiny_end_to_end_trains_evaluates_and_resumes(q, tmp_path, monkeypatch):
    """A 5-step teacher and 2-step students: every requested step count is scored, and a rerun reuses the runs."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "w"
    argv = [
        "--rows", "teacher;apex", "--seeds", "0", "--budget", "2", "--per-prompt", "2", "--teacher-steps", "5",
        "--workers", "0", "--work", str(work), "--no-report", "--quiet",
    ]  # fmt: skip
    assert q.main(argv) == 0
    lines = (work / "results.jsonl").read_text().splitlines()
    recs = {json.loads(x)["row"]: json.loads(x) for x in lines}
    assert set(recs) == {"teacher", "apex"}
    assert set(recs["teacher"]["evals"]) == {"50", "4", "1"} and set(recs["apex"]["evals"]) == {"1", "2", "4"}
    # the apex row's 1-step cell is the judge's score of the trained model's one-step images, recomputed here
    # (the eval prompts × 2, image k of a prompt with seed k) with the same batch shapes as the bench, so the same
    # kernels run: equal up to round-off. Its 2- and 4-step cells are other images (FD 2 % and 3 % apart), and so is
    # the teacher's 1-step cell: 2 steps at lr 3e-5 under an EMA of 0.99 move the exported weights very little
    # (measured: FD 1e-5 apart), but far more than round-off
    apex, teacher = recs["apex"]["evals"], recs["teacher"]["evals"]
    want = _score_one_step(work / "runs" / "apex_s0" / "model", per_prompt=2)
    assert apex["1"]["align"] == want["alignment"]["overall"] and apex["1"]["align_multi"] == want["alignment"]["multi"]
    for key, got in (("fd", want["fd"]), ("diversity", want["diversity"]), ("coverage", want["multi_coverage"])):
        assert apex["1"][key] == pytest.approx(got, rel=1e-9, abs=1e-12), key
    for other, gap in ((apex["2"], 5e-3), (apex["4"], 5e-3), (teacher["1"], 1e-7)):
        assert abs(other["fd"] - apex["1"]["fd"]) > gap * apex["1"]["fd"], other
    assert recs["apex"]["train_s"] > 0 and recs["apex"]["state_mb"] > 0
    assert not (work / "runs" / "apex_s0" / "checkpoints").exists()  # only the model is kept
    assert q.main(argv) == 0  # everything is read back: no new lines
    assert (work / "results.jsonl").read_text().splitlines() == lines


def test_series_chart_draws_one_line_per_method_on_a_log_axis():
    from apexctl.eval.report.plots import series_chart

    svg = series_chart({"teacher": ([50, 4, 1], [0.9, 0.95, 0.7]), "apex": ([1, 2, 4], [0.97, 0.96, float("nan")])},
                       "t", "steps", "align", log_x=True)  # fmt: skip
    assert svg.count("<polyline") == 2 and ">teacher<" in svg and ">apex<" in svg
    assert svg.count("<circle") == 5  # the NaN point is dropped
    # log2 x axis: 1, 2, 4 are evenly spaced
    xs = {t: float(svg.split(f'text-anchor="middle">{t}</text>')[0].rsplit('x="', 1)[1].split('"')[0]) for t in "124"}
    assert xs["2"] - xs["1"] == pytest.approx(xs["4"] - xs["2"], abs=0.2)  # coordinates are rounded to 0.1 px
    assert series_chart({"a": ([1], [float("nan")])}, "t", "x") == ""
