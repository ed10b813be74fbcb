"""Experiment trackers (``train.log_with``: tensorboard, wandb, mlflow, trackio) through accelerate's tracker
classes, on rank 0: :class:`Tracker` opens, logs to and closes a run folder's tracker run, for the training
(:mod:`~apexctl.training.metrics`) and for ``apexctl eval digits``/``scenes``.

A run folder has one tracker run per kind, named in ``RUN/tracker.json`` (``{kind: {project, name, id, step}}``,
``step``: the last one logged); a resumed training or a later eval continues it, a training from step 0 opens a new
one. No step is sent twice: tensorboard purges its events past the checkpoint resumed from, the others keep theirs.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import uuid
from pathlib import Path

from apexctl.atomic import write_text
from apexctl.errors import BadInput

STATE = "tracker.json"
_NOT_A_KEY = re.compile(r"[^\w\-. /]")  # mlflow's metric names: word characters, "-", ".", " ", "/" only
PROJECT = "apexctl"


def require_package(kind: str) -> None:
    """BadInput (exit 2, one line) when ``train.log_with = kind`` cannot be served by the installed packages."""
    if kind == "none":
        return
    try:
        importlib.import_module(kind)
    except ImportError:
        raise BadInput(
            f"train.log_with = '{kind}' needs the {kind} package (pip install {kind}); "
            "or use train.log_with = 'none' (metrics.jsonl is always written)"
        ) from None
    if kind == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
        try:
            for module in ("sqlalchemy", "alembic"):
                importlib.import_module(module)
        except ImportError:
            raise BadInput(
                "train.log_with = 'mlflow' keeps its runs in RUN/mlflow/mlflow.db (SQLite), which needs sqlalchemy "
                "and alembic (pip install mlflow); or set MLFLOW_TRACKING_URI to a tracking server"
            ) from None


def flat_config(tree: dict, prefix: str = "") -> dict:
    """A recipe dump (nested dicts) as ``{"train.lr": 0.001, …}``; lists as JSON text (what every tracker takes)."""
    out: dict = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= flat_config(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


def summary_table(rows: dict[str, dict]) -> tuple[list[str], list[list]]:
    """Eval rows (``{row name: scores}``) as a table: the numeric scores, nested dicts one level deep as
    ``parent/child``; per-prompt breakdowns (``*_per_prompt``) and lists stay in results.json only."""
    cells = []
    for scores in rows.values():
        cell = {}
        for k, v in scores.items():
            for kk, vv in v.items() if isinstance(v, dict) and not k.endswith("_per_prompt") else [("", v)]:
                if isinstance(vv, (int, float)) and not isinstance(vv, bool):
                    cell[f"{k}/{kk}" if kk else k] = vv
        cells.append(cell)
    columns = list(dict.fromkeys(c for cell in cells for c in cell))
    return ["row", *columns], [[name, *(cell.get(c) for c in columns)] for name, cell in zip(rows, cells, strict=True)]


class Tracker:
    """The ``kind`` tracker run of the run folder ``run`` (a new one unless ``resume``), via accelerate's class.
    ``config`` (flat): its hyperparameters, logged when the run is new (trackio: at each open, as its resume drops
    them). ``purge_step`` (training): tensorboard drops its events from that step on."""

    def __init__(self, kind: str, run: Path, *, config: dict, resume: bool, purge_step: int | None = None) -> None:
        from accelerate.state import PartialState
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS, filter_trackers

        require_package(kind)
        PartialState()  # accelerate's trackers log through its logger, which needs the state (eval has no Accelerator)
        if not filter_trackers([kind], run):
            raise BadInput(f"train.log_with = '{kind}': accelerate does not find the {kind} package")
        self.kind, self.path, self.unset_uri = kind, run / STATE, None
        run.mkdir(parents=True, exist_ok=True)
        try:
            self.states = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.states = {}
        old = self.states.get(kind) if resume else None
        project = os.environ.get("WANDB_PROJECT", PROJECT) if kind == "wandb" else PROJECT
        self.state = old or {"project": project, "name": run.name, "id": None, "step": 0}
        self.floor = self.state["step"] if old and kind != "tensorboard" else 0  # steps the tracker already has
        cls, s = LOGGER_TYPE_TO_CLASS[kind], self.state
        if kind == "tensorboard":
            self.tracker = cls("tensorboard", run, **({"purge_step": purge_step} if purge_step else {}))
        elif kind == "wandb":
            s["id"] = s["id"] or uuid.uuid4().hex[:12]  # chosen here so that it is stored before the run starts
            self.tracker = cls(s["project"], id=s["id"], name=s["name"], resume="allow", dir=str(run))
        elif kind == "mlflow":
            import mlflow

            local = not os.environ.get("MLFLOW_TRACKING_URI")
            if local:  # the run folder's own SQLite store, until close() unsets it
                (run / "mlflow").mkdir(exist_ok=True)
                mlflow.set_tracking_uri(f"sqlite:///{(run / 'mlflow' / 'mlflow.db').resolve()}")
                os.environ.pop("MLFLOW_TRACKING_URI")  # which set_tracking_uri exports: the user's env stays as it was
                self.unset_uri = mlflow.set_tracking_uri
            artifacts = (run / "mlflow" / "artifacts").resolve().as_uri() if local else None
            self.tracker = cls(s["project"], logging_dir=artifacts, run_id=s["id"], run_name=s["name"])
        else:
            self.tracker = cls(s["project"], name=s["name"], resume="allow" if old else "never", config=config)
        self.tracker.start()
        if kind in ("mlflow", "trackio"):  # the id the tracker chose
            s["id"] = self.tracker.active_run.info.run_id if kind == "mlflow" else self.tracker.run.id
        if old is None and kind != "trackio":
            self.tracker.store_init_configuration(config)
        self._save()

    def log(self, values: dict, step: int) -> None:
        """The numeric entries of ``values`` at ``step`` (None, NaN-as-None and text are left out)."""
        if step <= self.floor:
            return
        nums = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.tracker.log({_NOT_A_KEY.sub("", k): v for k, v in nums.items()}, step=step)
        self.state["step"] = max(self.state["step"], step)
        self._save()

    def log_image(self, key: str, path: Path, step: int) -> None:
        """The PNG at ``path`` as an image (mlflow: an artifact under ``key/``)."""
        if step <= self.floor:
            return
        if self.kind == "tensorboard":
            import numpy as np
            from PIL import Image

            pixels = np.asarray(Image.open(path).convert("RGB"))[None]
            self.tracker.log_images({key: pixels}, step=step, dataformats="NHWC")
        elif self.kind == "wandb":
            self.tracker.log_images({key: [str(path)]}, step=step)
        elif self.kind == "mlflow":
            self.tracker.log_artifact(str(path), artifact_path=key)
        else:
            import trackio

            self.tracker.log({key: trackio.Image(str(path))}, step=step)

    def log_summary(self, name: str, rows: dict[str, dict]) -> None:
        """Eval rows as a table (wandb, trackio: a Table; mlflow: ``name.json`` via log_table; tensorboard: a
        markdown text) and as scalars ``name/row/column``, at the run's last logged step (wandb, whose steps only
        go up: the one after)."""
        columns, data = summary_table(rows)
        step = self.state["step"] + (self.kind == "wandb")
        pairs = [(f"{name}/{r[0]}/{c}", v) for r in data for c, v in zip(columns[1:], r[1:], strict=True)]
        scalars = {_NOT_A_KEY.sub("", k): v for k, v in pairs if v is not None}
        extra: dict = {}
        if self.kind == "tensorboard":
            lines = [" | ".join(columns), " | ".join("---" for _ in columns)]
            cells = [[r[0], *("" if v is None else f"{v:g}" for v in r[1:])] for r in data]
            extra[name] = "\n".join(lines + [" | ".join(c) for c in cells])
        elif self.kind == "wandb":
            self.tracker.log_table(name, columns=columns, data=data, step=step)
        elif self.kind == "mlflow":
            import mlflow

            mlflow.log_table({c: [r[i] for r in data] for i, c in enumerate(columns)}, artifact_file=f"{name}.json")
        else:
            import trackio

            extra[name] = trackio.Table(columns=columns, data=data)
        self.tracker.log({**scalars, **extra}, step=step)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None
            if self.unset_uri is not None:
                self.unset_uri(None)  # the next run in this process gets its own store

    def _save(self) -> None:
        self.states[self.kind] = self.state
        write_text(self.path, json.dumps(self.states, indent=1) + "\n")


def log_eval_summary(recipe, name: str, rows: dict[str, dict]) -> None:
    """``apexctl eval digits``/``scenes``: the summary rows to the trained run's tracker run (``train.log_with``)."""
    from apexctl.training.session import run_dir

    if recipe.train.log_with == "none":
        return
    config = flat_config(recipe.model_dump(mode="json"))
    tracker = Tracker(recipe.train.log_with, run_dir(recipe), config=config, resume=True)
    try:
        tracker.log_summary(name, rows)
    finally:
        tracker.close()
