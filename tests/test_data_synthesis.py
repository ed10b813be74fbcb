"""Teacher synthesis: each cached image is what `apexctl sample` with the teacher settings gives for its seed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from data_util import ok, recipe
from PIL import Image

from apexctl.data.cache import LatentCache


@pytest.fixture(autouse=True)
def _home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("APEXCTL_HOME", str(tmp_path_factory.getbasetemp() / "apexctl-home"))


def test_synthesised_images_match_sample_for_recorded_seeds(tmp_path):
    from apexctl.images import to_uint8
    from apexctl.models import load_backbone, resolve_model_path

    prompts = ["a red fox", "a blue bird in the sky"]
    (tmp_path / "p.jsonl").write_text(json.dumps({"text": prompts[0]}) + "\n" + json.dumps(prompts[1]) + "\n")
    synth = {"steps": 3, "guidance": 2.5, "images_per_prompt": 2, "seed": 11, "batch": 3}
    synth["export_dir"] = str(tmp_path / "export")
    data = {"source": "prompts", "path": str(tmp_path / "p.jsonl"), "synthesize": synth}
    r = recipe(tmp_path, "syn", data={**data, "cache_dtype": "fp32", "shard_size": 3})
    ok(["prepare", r, "-q"])
    cache = LatentCache.open(tmp_path / "cache-syn", verify="full")
    assert cache.manifest["num_images"] == 4 and len(cache.manifest["shards"]["images"]) == 2
    seeds = [s for sh in cache.image_shards() for s in sh["seed.0"].tolist()]
    assert seeds == [11, 12, 13, 14]  # seed + images_per_prompt·i + k
    assert [cache.prompts[p] for p in cache.pair_prompt.tolist()] == [prompts[0]] * 2 + [prompts[1]] * 2

    model = resolve_model_path("tiny:test")
    bb = load_backbone(model)
    cached = to_uint8(bb.decode_latents(cache.latents[:]))
    for i, p in enumerate(prompts):
        out = tmp_path / f"sample{i}"
        args = ["sample", p, "--model", model, "--steps", 3, "--guidance", 2.5, "--seed", 11 + 2 * i, "-n", 2]
        ok([*args, "--size", 32, "--out", out])
        for k in range(2):
            png = np.asarray(Image.open(next(out.glob(f"{k:03d}_*_seed{11 + 2 * i + k}.png"))).convert("RGB"))
            assert np.abs(png.astype(int) - cached[2 * i + k].astype(int)).max() <= 1, (i, k)

    # the export is a folder source: metadata.jsonl with text and seed, PNGs equal to the decoded cache
    rows = [json.loads(x) for x in (tmp_path / "export" / "metadata.jsonl").read_text().splitlines()]
    assert [(x["text"], x["seed"]) for x in rows] == [
        (prompts[0], 11),
        (prompts[0], 12),
        (prompts[1], 13),
        (prompts[1], 14),
    ]
    for j, row in enumerate(rows):
        png = np.asarray(Image.open(tmp_path / "export" / row["file_name"]).convert("RGB"))
        assert np.array_equal(png, cached[j])
    assert not list(tmp_path.glob(".export*"))  # written through a temporary sibling, renamed at the end


@pytest.mark.parametrize("offload", [False, True])
def test_prepare_puts_the_denoiser_on_the_device_only_when_it_draws(tmp_path, monkeypatch, offload):
    """The prompt shards and image encoding need the text encoders and the codec alone: the denoiser stays in host
    memory until the teacher draws (a 20B transformer never has to fit a GPU that only encodes); then it goes to
    the device, and with ``offload_text_encoder`` the text encoders go back to host memory first, so the GPU
    never holds both. Each module's moves are recorded (on this CPU machine a move to "cpu" changes nothing)."""
    from torch import nn

    from apexctl.data.synthesize import load_teacher, teacher_to_device
    from apexctl.models import resolve_model_path
    from apexctl.recipe import load_recipe

    (tmp_path / "p.txt").write_text("a red fox\n")
    synth = {"steps": 2, "offload_text_encoder": offload}
    r = load_recipe(
        recipe(tmp_path, "place", data={"source": "prompts", "path": str(tmp_path / "p.txt"), "synthesize": synth})
    )
    moves: list[tuple[str, str]] = []
    to = nn.Module.to

    def spy(self, *args, **kwargs):
        device = args[0] if args else kwargs.get("device")
        if device is not None and self.__class__.__module__.split(".")[0] in ("transformers", "diffusers"):
            moves.append((type(self).__name__, str(device)))
        return to(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", spy)
    bb = load_teacher(r, resolve_model_path(r.model.path), "cpu")
    text, codec, denoiser = type(bb.text_encoder).__name__, type(bb.codec).__name__, type(bb.transformer).__name__
    assert sorted(moves) == sorted([(text, "cpu"), (codec, "cpu")])  # encoders and codec only, to the device
    moves.clear()
    teacher_to_device(bb, r.data.synthesize, "cpu")
    assert moves == ([(text, "cpu")] if offload else []) + [(denoiser, "cpu")]


def test_offloading_the_text_encoder_draws_the_same_cache(tmp_path):
    """``data.synthesize.offload_text_encoder``: the same latents (the prompts encoded by the same weights)."""
    (tmp_path / "p.txt").write_text("a red fox\na blue bird\n")
    caches = []
    for offload in (False, True):
        synth = {"steps": 2, "guidance": 2.0, "batch": 2, "offload_text_encoder": offload}
        data = {"source": "prompts", "path": str(tmp_path / "p.txt"), "synthesize": synth, "cache_dtype": "fp32"}
        ok(["prepare", recipe(tmp_path, f"off{offload}", data=data), "-q"])
        caches.append(LatentCache.open(tmp_path / f"cache-off{offload}", verify="full").latents[:])
    assert torch.equal(*caches)
