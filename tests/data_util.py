"""Helpers for the data tests: tiny on-disk sources written in tmp_path, recipes, and an encoder blocker."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from typer.testing import CliRunner

from apexctl.cli import app

runner = CliRunner()
TINY_DIGITS = "tiny:digits?num_layers=2&num_attention_heads=2&attention_head_dim=16"


def ok(args: list[str]) -> str:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def write_recipe(tmp: Path, name: str, tree: dict, sections: dict) -> Path:
    """``tree`` with each of ``sections`` merged into its section, written to ``tmp/name.yaml``."""
    for k, v in sections.items():
        tree.setdefault(k, {}).update(v)
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


#: the trainer tests' EMA run: EMA reference, learnable shift, cosine schedule with warm-up, prompt dropout
EMA_RUN = {
    "data": {"cond_dropout": 0.1},
    "method": {"reference": "ema", "shift": {"learnable": True}},
    "train": {"steps": 6, "lr_schedule": "cosine", "warmup_steps": 2, "ema_decay": 0.9},
}


def digits_recipe(
    tmp: Path, name: str, *, model_path: str = TINY_DIGITS, preset: dict | None = None, **sections: dict
) -> Path:
    """A tiny-digits ``apex`` recipe on CPU (cache ``tmp/cache``, run ``tmp/name``): the defaults the trainer tests
    share, then ``preset``'s sections, then ``sections`` (each merged into its section)."""
    tree = {
        "model": {"path": model_path},
        "data": {"source": "digits", "cache_dir": str(tmp / "cache")},
        "method": {"objective": "apex"},
        "train": {"micro_batch": 4, "lr": 1e-3, "log_every": 1, "checkpoint_every": 100},
        "hardware": {"device": "cpu"},
        "output": {"dir": str(tmp / name)},
    }
    for layer in (preset or {}, sections):
        for k, v in layer.items():
            tree.setdefault(k, {}).update(v)
    return write_recipe(tmp, name, tree, {})


def fails(args: list[str], code: int = 2) -> str:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == code, res.output
    return res.output


def png_bytes(seed: int, w: int, h: int) -> bytes:
    """A smooth random RGB image (a gradient plus noise) as PNG bytes; the same seed gives the same bytes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (xx[..., None] * rng.uniform(0, 4, 3) + yy[..., None] * rng.uniform(0, 4, 3)) % 256
    arr = np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_folder(root: Path, rows: list[tuple[str, int, int, str]]) -> Path:
    """``rows``: (file name, width, height, caption) → PNGs + metadata.jsonl."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (name, w, h, text) in enumerate(rows):
        (root / name).write_bytes(png_bytes(i, w, h))
        lines.append(json.dumps({"file_name": name, "text": text}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


CAPTIONS = ["a red fox", "a blue bird", "a green tree", "a red fox", "a cat", "a dog"]


def recipe(tmp: Path, name: str, model: str = "tiny:test", data: dict | None = None, **sections) -> Path:
    tree = {
        "model": {"path": model},
        "data": {"cache_dir": str(tmp / f"cache-{name}"), "resolution": 32, "num_workers": 0, **(data or {})},
        "method": {"objective": "apex"},
        "train": {"steps": 2, "micro_batch": 2, "log_every": 1, "checkpoint_every": 100, "seed": 1},
        "hardware": {"device": "cpu"},
        "output": {"dir": str(tmp / f"run-{name}")},
    }
    for k, v in sections.items():
        tree.setdefault(k, {}).update(v)
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


def block_encoders(monkeypatch) -> None:
    """Make loading or calling a text encoder or codec fail loudly (training must read only the cache)."""
    import diffusers
    import transformers

    from apexctl.models import base, qwen_image

    def boom(*a, **k):
        raise AssertionError("a text encoder or codec was loaded/used during training")

    monkeypatch.setattr(transformers.Qwen2_5_VLForConditionalGeneration, "from_pretrained", boom)
    monkeypatch.setattr(diffusers.AutoencoderKLQwenImage, "from_pretrained", boom)
    monkeypatch.setattr(base.PixelCodec, "__init__", boom)
    for name in ("encode_prompts", "encode_images", "decode_latents"):
        monkeypatch.setattr(qwen_image.QwenImageBackbone, name, boom)


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def save_random_lora(model: str, dest: Path, seed: int = 0) -> Path:
    """A rank-2 LoRA with random (non-zero) weights on ``model``'s default targets, saved to ``dest`` as a trained
    one is (for tests that only need an adapter that changes the images)."""
    import torch

    from apexctl.lora import add_lora
    from apexctl.models import load_backbone

    bb = load_backbone(model)
    add_lora(bb.transformer, rank=2, alpha=2.0, targets=bb.lora_targets, dropout=0.0, init="gaussian")
    with torch.no_grad():
        for name, p in bb.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    return bb.save_lora(dest)


#: put on a subprocess's PYTHONPATH as sitecustomize: APEXCTL_TEST_SIGNAL="RANK:MODULE:ATTR:CALL:SIGNAL" makes the
#: process of that RANK (absent: 0) send SIGNAL to itself when MODULE.ATTR (a function or Class.method) is called
#: for the CALL-th time, before that call runs. A real signal at a point that does not depend on the machine's speed.
SIGNAL_HOOK = """
import os

_spec = os.environ.get("APEXCTL_TEST_SIGNAL")
# (a launcher has no RANK either: it wraps the function too, and never calls it)
if _spec and os.environ.get("RANK", "0") == _spec.split(":")[0]:
    import functools
    import importlib
    import signal

    _rank, _module, _attr, _call, _name = _spec.split(":")
    _owner = importlib.import_module(_module)
    *_path, _leaf = _attr.split(".")
    for _p in _path:
        _owner = getattr(_owner, _p)
    _real, _calls = getattr(_owner, _leaf), [0]

    @functools.wraps(_real)
    def _wrapped(*args, **kwargs):
        _calls[0] += 1
        if _calls[0] == int(_call):
            os.kill(os.getpid(), getattr(signal, _name))
        return _real(*args, **kwargs)

    setattr(_owner, _leaf, _wrapped)
"""


def run_apexctl(
    args: list, home: Path, *, signal_at: str | None = None, timeout: float = 180
) -> subprocess.CompletedProcess:
    """``python -m apexctl ARGS`` in a subprocess (``APEXCTL_HOME=home``); ``signal_at`` as SIGNAL_HOOK reads it. A
    hang (a rank waiting on a collective) is killed with all the processes it started."""
    env = {**os.environ, "APEXCTL_HOME": str(home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("APEXCTL_TEST_SIGNAL", None)
    if signal_at is not None:
        hook = Path(home) / "signal-hook"
        hook.mkdir(parents=True, exist_ok=True)
        (hook / "sitecustomize.py").write_text(SIGNAL_HOOK)
        env["APEXCTL_TEST_SIGNAL"] = signal_at
        env["PYTHONPATH"] = os.pathsep.join([str(hook), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "apexctl", *map(str, args)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        import psutil  # accelerate's dependency

        # the launcher and its ranks (torch starts each rank in a session of its own, holding our pipes)
        for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s: {' '.join(cmd)}\n{out}\n{err}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def prepared_home(tmp_path_factory, name: str, make_recipe) -> Iterator[Path]:
    """A module fixture's body: a fresh folder with ``APEXCTL_HOME`` pointing into it and the cache of
    ``make_recipe(folder, "prep")`` prepared; yields the folder."""
    import pytest

    tmp = tmp_path_factory.mktemp(name)
    mp = pytest.MonkeyPatch()
    mp.setenv("APEXCTL_HOME", str(tmp / "home"))
    ok(["prepare", make_recipe(tmp, "prep"), "-q"])
    yield tmp
    mp.undo()
