"""``train.log_with`` through accelerate's trackers, offline: a 3-step tiny-digits run per tracker (a sample grid
at step 3), then the shared eval loop with a stub judge, and what each tracker stored read back with its own
reader: tensorboard's events, wandb's offline ``.wandb`` file, mlflow's client on the run folder's SQLite store,
trackio's local database. Then a resume that must continue the same tracker run without repeating a step, and the
missing-package errors.

wandb, mlflow and trackio are optional: their tests skip when the package is not installed (the dev extra installs
wandb and mlflow; trackio pins pillow < 13, so it is not in the dev extra).
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
from data_util import digits_recipe, fails, metrics, ok
from test_signals import _scalars

EVAL_ROWS = {"real data (held-out)", "teacher 2 steps", "teacher 1 step", "student 1 step"}


class StubJudge:
    """Fixed scores (the number of images aside): what the eval logs to the tracker is known by hand."""

    test_accuracy = 0.75

    def score(self, images, allowed, kinds, prompts) -> dict:
        return {
            "n": len(images),
            "alignment": {"single": 0.5, "multi": 0.25},
            "fd": 2.0,
            "class_histogram": [1, 2],
            "seed_diversity_per_prompt": {"a": 0.1},
        }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A prepared digits cache; the trackers kept offline and inside tmp."""
    tmp = tmp_path_factory.mktemp("trackers")
    mp = pytest.MonkeyPatch()
    env = {
        "APEXCTL_HOME": tmp / "home",
        "WANDB_MODE": "offline",  # what a user sets for wandb without an account (apexctl never sets it)
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": tmp / "wandb-config",
        "WANDB_CACHE_DIR": tmp / "wandb-cache",
        "WANDB_DATA_DIR": tmp / "wandb-data",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TRACKIO_DIR": tmp / "trackio",  # read when trackio is imported: before any test imports it
    }
    for k, v in env.items():
        mp.setenv(k, str(v))
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT", "WANDB_RUN_ID"):
        mp.delenv(k, raising=False)
    ok(["prepare", str(_recipe(tmp, "prep", "none")), "-q"])
    yield tmp
    mp.undo()


def _recipe(tmp: Path, name: str, kind: str, **train) -> Path:
    train = {"steps": 3, "log_with": kind, "sample_every": 3, "sample_images": 1, "checkpoint_every": 2} | train
    return digits_recipe(tmp, name, train=train)


def _eval(recipe_path: Path) -> dict:
    from apexctl.data.digits import eval_prompts
    from apexctl.eval.toy.run import EvalSetting, run_eval
    from apexctl.recipe import load_recipe

    ref = {"n": 0, "alignment": {"single": 1.0, "multi": 1.0}, "fd": 0.0}
    setting = EvalSetting("digits", eval_prompts()[:2], StubJudge(), ref, "real data (held-out)", sorted)
    return run_eval(load_recipe(recipe_path), setting, per_prompt=2, teacher_steps=2, quiet=True)


_RUNS: dict[str, Path] = {}


def _trained(workdir: Path, kind: str) -> Path:
    """The run folder of a 3-step run logged to ``kind``, followed by an eval (once per module)."""
    if kind not in _RUNS:
        pytest.importorskip(kind)
        r = _recipe(workdir, f"run-{kind}", kind)
        ok(["distill", str(r), "-q"])
        summary = _eval(r)
        assert set(summary["rows"]) == EVAL_ROWS
        _RUNS[kind] = workdir / f"run-{kind}"
    return _RUNS[kind]


def _numeric(run: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as ``{key: [(step, value)]}`` (what every tracker must hold)."""
    out: dict[str, list] = {}
    for row in metrics(run):
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                out.setdefault(k, []).append((row["step"], v))
    return out


def _state(run: Path, kind: str) -> dict:
    return json.loads((run / "tracker.json").read_text())[kind]


# ---- tensorboard -------------------------------------------------------------------------------------------------
def test_tensorboard_holds_the_scalars_the_config_the_grid_and_the_eval(workdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _trained(workdir, "tensorboard")
    want, got = _numeric(run), _scalars(run)
    assert {"loss", "loss/fake", "grad_norm", "lr"} <= set(want)
    for k, pts in want.items():
        assert [s for s, _ in got[k]] == [s for s, _ in pts] == [1, 2, 3], k
        assert [v for _, v in got[k]] == pytest.approx([v for _, v in pts], rel=1e-6, abs=1e-12), k
    # the eval: scalars eval/digits/<row>/<column> at the last step, the table as markdown text
    assert got["eval/digits/student 1 step/fd"] == [(3, 2.0)]
    assert got["eval/digits/real data held-out/alignment/multi"] == [(3, 1.0)]
    assert got["eval/digits/teacher 2 steps/n"] == [(3, 2 * 2)]  # 2 prompts × per_prompt 2
    assert not any("per_prompt" in k or "class_histogram" in k for k in got)
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    [img] = acc.Images("samples")
    png = (run / "samples" / "step-000003.png").read_bytes()
    w, h = struct.unpack(">II", png[16:24])
    assert img.step == 3 and (img.width, img.height) == (w, h)
    [text] = acc.Tensors("eval/digits/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    assert table.splitlines()[0].startswith("row | n | alignment/single | alignment/multi | fd")
    assert "student 1 step | 4 | 0.5 | 0.25 | 2 |" in table
    # the resolved recipe, once, as accelerate's hparams.yml next to the hparams events
    [hp] = list((run / "tensorboard").glob("*/hparams.yml"))
    import yaml

    hparams = yaml.safe_load(hp.read_text())
    assert hparams["train.lr"] == 1e-3 and hparams["train.log_with"] == "tensorboard"
    assert hparams["model.path"].startswith("tiny:digits") and json.loads(hparams["train.betas"]) == [0.9, 0.999]


# ---- wandb ---------------------------------------------------------------------------------------------------------
def _wandb_records(path: Path) -> list:
    """The protobuf records of a ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then LevelDB-log
    chunks (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, out = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (n == 0 and kind == 0):  # a block's zero padding
            pos += left
            continue
        buf, pos = buf + data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            out.append(pb.Record.FromString(buf))
            buf = b""
    return out


def _wandb_run(run: Path) -> tuple[list[dict], dict, set[str]]:
    """History rows, config and run ids of all the offline segments of ``run``'s wandb run."""
    rows, config, ids = [], {}, set()
    for f in sorted((run / "wandb").glob("offline-run-*/run-*.wandb")):
        for r in _wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "history":
                rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item})
            elif kind == "run":
                ids.add(r.run.run_id)
                config |= {i.key: json.loads(i.value_json) for i in r.run.config.update}
            elif kind == "config":
                config |= {i.key: json.loads(i.value_json) for i in r.config.update}
    return rows, config, ids


def test_wandb_offline_run_holds_the_history_the_config_the_grid_and_the_eval_table(workdir):
    run = _trained(workdir, "wandb")
    rows, config, ids = _wandb_run(run)
    assert ids == {_state(run, "wandb")["id"]}
    want = _numeric(run)
    for k, pts in want.items():
        assert [(x["_step"], x[k]) for x in rows if k in x] == pts, k
    assert config["train.lr"] == 1e-3 and config["train.log_with"] == "wandb"
    [grid] = [x for x in rows if "samples/_type" in x]  # wandb's nested values come flattened with "/"
    assert grid["_step"] == 3 and grid["samples/_type"] == "images/separated" and grid["samples/count"] == 1
    [png] = list((run / "wandb").glob(f"offline-run-*/files/{grid['samples/filenames'][0]}"))
    assert png.read_bytes() == (run / "samples" / "step-000003.png").read_bytes()
    # the eval summary at the step after the last one (wandb's steps only go up)
    [ev] = [x for x in rows if "eval/digits/_type" in x]
    assert ev["_step"] == 4 and ev["eval/digits/student 1 step/fd"] == 2.0 and ev["eval/digits/_type"] == "table-file"
    [table_file] = list((run / "wandb").glob(f"offline-run-*/files/{ev['eval/digits/path']}"))
    table = json.loads(table_file.read_text())
    assert table["columns"][:5] == ["row", "n", "alignment/single", "alignment/multi", "fd"]
    assert {r[0]: r[1:5] for r in table["data"]}["student 1 step"] == [4, 0.5, 0.25, 2.0]


# ---- mlflow --------------------------------------------------------------------------------------------------------
def _mlflow(run: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow' / 'mlflow.db'}")


def test_mlflow_local_store_holds_the_history_the_params_the_grid_and_the_eval_table(workdir, tmp_path):
    run = _trained(workdir, "mlflow")
    client, run_id = _mlflow(run), _state(run, "mlflow")["id"]
    for k, pts in _numeric(run).items():
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, k)] == pts, k
    info = client.get_run(run_id)
    assert info.data.params["train.lr"] == "0.001" and info.data.params["train.log_with"] == "mlflow"
    assert info.info.run_name == "run-mlflow"
    [art] = client.list_artifacts(run_id, "samples")
    assert art.path == "samples/step-000003.png"
    got = Path(client.download_artifacts(run_id, art.path, str(tmp_path)))
    assert got.read_bytes() == (run / "samples" / "step-000003.png").read_bytes()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/digits/student 1 step/fd")] == [(3, 2.0)]
    table = json.loads(Path(client.download_artifacts(run_id, "eval/digits.json", str(tmp_path))).read_text())
    assert table["columns"][:5] == ["row", "n", "alignment/single", "alignment/multi", "fd"]
    assert {r[0]: r[1:5] for r in table["data"]}["student 1 step"] == [4, 0.5, 0.25, 2.0]


# ---- trackio -------------------------------------------------------------------------------------------------------
def test_trackio_local_db_holds_the_history_the_config_the_grid_and_the_eval_table(workdir):
    run = _trained(workdir, "trackio")
    from trackio.sqlite_storage import SQLiteStorage

    assert SQLiteStorage.get_project_db_path("apexctl").parent == workdir / "trackio"
    logs = SQLiteStorage.get_logs("apexctl", "run-trackio")
    for k, pts in _numeric(run).items():
        assert [(x["step"], x[k]) for x in logs if k in x] == pts, k
    config = SQLiteStorage.get_run_config("apexctl", "run-trackio")
    assert config["train.lr"] == 1e-3 and config["train.log_with"] == "trackio"
    [grid] = [x for x in logs if "samples" in x]
    assert grid["step"] == 3 and grid["samples"]["_type"] == "trackio.image"
    [ev] = [x for x in logs if "eval/digits" in x]
    assert ev["step"] == 3 and ev["eval/digits/student 1 step/fd"] == 2.0
    rows = {r["row"]: r for r in ev["eval/digits"]["_value"]}
    assert rows["student 1 step"]["fd"] == 2.0 and rows["student 1 step"]["alignment/multi"] == 0.25


# ---- resume --------------------------------------------------------------------------------------------------------
def _history(run: Path, kind: str) -> list[tuple[int, float]]:
    """(step, loss) pairs the tracker holds for the run, in the order it logged them."""
    if kind == "wandb":
        return [(x["_step"], x["loss"]) for x in _wandb_run(run)[0] if "loss" in x]
    if kind == "mlflow":
        return [(m.step, m.value) for m in _mlflow(run).get_metric_history(_state(run, kind)["id"], "loss")]
    from trackio.sqlite_storage import SQLiteStorage

    return [(x["step"], x["loss"]) for x in SQLiteStorage.get_logs("apexctl", run.name) if "loss" in x]


@pytest.mark.parametrize("kind", ["wandb", "mlflow", "trackio"])
def test_a_resumed_run_continues_the_tracker_run_without_repeating_a_step(workdir, kind):
    """4 steps stopped at step 3 (checkpoints 2 and 3), the step-3 checkpoint removed (a kill after step 3 was
    logged), then --resume auto: metrics.jsonl gets row 3 again, the tracker keeps its step 3 and gets step 4, in
    the same tracker run."""
    pytest.importorskip(kind)
    r = _recipe(workdir, f"resume-{kind}", kind, steps=4, sample_every=None)
    run = workdir / f"resume-{kind}"
    ok(["distill", str(r), "--until", "3", "-q"])
    first = _state(run, kind)
    assert first["step"] == 3 and _history(run, kind) == [(x["step"], x["loss"]) for x in metrics(run)]
    shutil.rmtree(run / "checkpoints" / "step-000003")
    ok(["distill", str(r), "--resume", "auto", "-q"])
    assert _state(run, kind) == first | {"step": 4}  # same id and name
    rows = metrics(run)
    assert [x["step"] for x in rows] == [1, 2, 3, 4]
    # steps 1–3 from the first segment, 4 from the second, none twice (a deterministic run: the same losses)
    assert _history(run, kind) == [(x["step"], x["loss"]) for x in rows]
    if kind == "wandb":
        assert len(list((run / "wandb").glob("offline-run-*"))) == 2 and _wandb_run(run)[2] == {first["id"]}


# ---- bad input ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("module", "kind", "message"),
    [
        ("wandb", "wandb", "train.log_with = 'wandb' needs the wandb package (pip install wandb)"),
        ("mlflow", "mlflow", "train.log_with = 'mlflow' needs the mlflow package (pip install mlflow)"),
        ("trackio", "trackio", "train.log_with = 'trackio' needs the trackio package (pip install trackio)"),
        ("sqlalchemy", "mlflow", "needs sqlalchemy and alembic (pip install mlflow); or set MLFLOW_TRACKING_URI"),
    ],
)
def test_a_missing_tracker_package_exits_2_before_anything_loads(workdir, monkeypatch, module, kind, message):
    if module == "sqlalchemy":
        pytest.importorskip("mlflow")
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError, as when not installed
    r = _recipe(workdir, f"missing-{module}", kind)
    out = fails(["distill", str(r), "-q"])
    assert message in out.strip().splitlines()[-1] and "Traceback" not in out, out
    assert not (workdir / f"missing-{module}").exists()


def test_an_unknown_tracker_is_bad_input(workdir):
    out = fails(["distill", str(_recipe(workdir, "comet", "comet_ml")), "-q"])
    assert "train.log_with" in out and "'wandb'" in out and "'trackio'" in out, out


def test_summary_table_and_flat_config_by_hand():
    from apexctl.training.trackers import flat_config, summary_table

    rows = {
        "a": {"n": 4, "alignment": {"single": 0.5}, "fd": None, "hist": [1], "x_per_prompt": {"p": 1.0}, "m": "one"},
        "b": {"n": 2, "fd": 1.5, "ok": True},
    }
    assert summary_table(rows) == (["row", "n", "alignment/single", "fd"], [["a", 4, 0.5, None], ["b", 2, None, 1.5]])
    tree = {"train": {"lr": 0.1, "betas": [0.9, 0.99], "sample_prompts": None}, "seed": 3}
    assert flat_config(tree) == {"train.lr": 0.1, "train.betas": "[0.9, 0.99]", "train.sample_prompts": None, "seed": 3}
