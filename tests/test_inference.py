"""apexctl.inference: one seed per image (batch-independent, guided and few-step), the sample-settings resolver
that every command shares, model resolution for `apexctl sample` (native size, runs, LoRA runs, bad folders)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from data_util import save_random_lora
from PIL import Image
from typer.testing import CliRunner

from apexctl.cli import app
from apexctl.engine import sampler
from apexctl.errors import BadInput
from apexctl.inference import (
    ModelInfo,
    generate_images,
    resolve_method,
    resolve_sample_settings,
    run_recipe,
    seeded_noise,
)
from apexctl.models import load_backbone, resolve_model_path
from apexctl.recipe import validate_recipe

runner = CliRunner()
DIGITS = "tiny:digits?num_layers=1&num_attention_heads=2&attention_head_dim=8"
#: every family's tiny build and an image size it takes
FAMILIES = {"qwen_image": ("tiny:test", 32), "digits": (DIGITS, 8), "sd3": ("tiny:sd3", 32)}
FAMILIES |= {"sana": ("tiny:sana", 32), "flux": ("tiny:flux", 32), "z_image": ("tiny:z_image", 32)}
PROMPTS = ["a red fox", "a handwritten digit seven", "two cats on a sofa"]


@pytest.fixture(scope="module", autouse=True)
def _home(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("APEXCTL_HOME", str(tmp_path_factory.mktemp("home")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def backbones():
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_backbone(resolve_model_path(FAMILIES[name][0])).eval()
        return cache[name]

    return get


def _ok(args: list) -> str:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def _fails(args: list) -> str:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
    return res.output


# ------------------------------------------------------------------------------------ one seed per image
@pytest.mark.parametrize("family", list(FAMILIES))
def test_guided_batch_equals_each_image_alone(backbones, family):
    """Defect 1: the negative prompt's row is broadcast with every field (SD3/FLUX ``pooled`` too)."""
    bb, size = backbones(family), FAMILIES[family][1]
    kw = dict(height=size, width=size, steps=2, method="euler", guidance=4.0, negative_prompt="blurry")
    seeds = [3, 4, 5]
    batched = generate_images(bb, PROMPTS, seeds, batch=3, **kw)
    alone = torch.cat([generate_images(bb, [p], [s], batch=1, **kw) for p, s in zip(PROMPTS, seeds, strict=True)])
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)
    unguided = generate_images(bb, PROMPTS[:1], seeds[:1], **{**kw, "guidance": 1.0})
    assert (unguided - alone[:1]).abs().max() > 1e-4  # the guidance did something


@pytest.mark.parametrize("family", ["digits", "sd3"])
def test_few_step_images_do_not_depend_on_the_batch(backbones, family):
    """Defect 2: the re-noising is drawn per image from the image's own seed."""
    bb, size = backbones(family), FAMILIES[family][1]
    kw = dict(height=size, width=size, steps=4, method="few", renoise="stochastic")
    prompts, seeds = ["a red fox"] * 4, [10, 11, 12, 13]
    four = generate_images(bb, prompts, seeds, batch=4, **kw)
    ones = torch.cat([generate_images(bb, prompts[:1], [s], batch=1, **kw) for s in seeds])
    torch.testing.assert_close(four, ones, atol=1e-4, rtol=1e-4)
    # stochastic re-noising is random: the same initial noise, other re-noising draws → another image
    det = generate_images(bb, prompts[:1], seeds[:1], **{**kw, "renoise": "deterministic"})
    assert (det - ones[:1]).abs().max() > 1e-3
    assert (four[0] - four[1]).abs().max() > 1e-3  # different seeds differ


def test_seeded_noise_is_each_generators_first_draw():
    z = seeded_noise((2, 3, 3), [7, 8])
    for i, s in enumerate([7, 8]):
        assert torch.equal(z[i], torch.randn((2, 3, 3), generator=torch.Generator().manual_seed(s)))


def test_randn_tensor_draws_on_the_generators_device_then_moves():
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    x = sampler.randn_tensor((2, 3), gens, "meta", torch.float16)
    assert x.device.type == "meta" and x.dtype == torch.float16 and x.shape == (2, 3)
    rows = sampler.randn_tensor((2, 3), [torch.Generator().manual_seed(s) for s in (1, 2)], "cpu", torch.float32)
    assert torch.equal(rows[1], torch.randn((1, 3), generator=torch.Generator().manual_seed(2))[0])
    one = sampler.randn_tensor((2, 3), torch.Generator().manual_seed(1), "cpu", torch.float32)
    assert torch.equal(one, torch.randn((2, 3), generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="one per row"):
        sampler.randn_tensor((3, 3), gens, "cpu", torch.float32)


class _Zero:
    """A Denoiser double: F = 0 (only the sampler's noise handling is under test)."""

    def velocity(self, x_t, t, cond):
        return torch.zeros_like(x_t)


def test_few_step_noise_is_drawn_where_the_generator_lives(monkeypatch):
    """Defect 2 (CUDA): torch refuses a CPU generator for a draw on another device; emulate that refusal and
    sample on the ``meta`` device with CPU generators."""
    real = torch.randn

    def strict_randn(*args, generator=None, device=None, **kw):
        if generator is not None and device is not None and torch.device(device) != generator.device:
            raise RuntimeError(f"Expected a '{torch.device(device).type}' device type for generator")
        return real(*args, generator=generator, device=device, **kw)

    monkeypatch.setattr(torch, "randn", strict_randn)
    z = torch.zeros(2, 1, 4, 4, device="meta")
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    out = sampler.few_step(_Zero(), z, None, 3, "stochastic", gens)
    assert out.device.type == "meta" and out.shape == z.shape
    out = sampler.few_step(_Zero(), z, None, 3, "stochastic", gens[0])
    assert out.device.type == "meta"


# ------------------------------------------------------------------------------------ the settings resolver
@pytest.mark.parametrize(
    ("steps", "guidance", "distilled", "want"),
    [
        (1, 1.0, True, "one"),
        (1, 1.0, False, "one"),
        (4, 1.0, True, "few"),
        (4, 1.0, False, "euler"),
        (4, 3.0, True, "euler"),
        (1, 3.0, False, "euler"),
    ],
)
def test_auto_has_one_meaning(steps, guidance, distilled, want):
    assert resolve_method("auto", steps, guidance, distilled) == want
    if guidance <= 1.0:
        assert resolve_method("few", steps, guidance, distilled) == "few"  # an explicit method is kept
    else:  # the one- and few-step samplers take no guidance: refused, not silently unguided
        with pytest.raises(BadInput, match="only euler"):
            resolve_method("few", steps, guidance, distilled)


def test_size_precedence():
    base = {"model": {"path": "tiny:digits"}, "data": {"resolution": 16}}
    native = ModelInfo(native_size=64)
    assert resolve_sample_settings(None, native).height == 64
    r = validate_recipe(base)
    assert (resolve_sample_settings(r, native).height, resolve_sample_settings(r, native).width) == (16, 16)
    r = validate_recipe({**base, "sample": {"width": 24}})
    assert (resolve_sample_settings(r, native).height, resolve_sample_settings(r, native).width) == (16, 24)
    r = validate_recipe({**base, "sample": {"height": 8, "width": 24}})
    s = resolve_sample_settings(r, native)
    assert (s.height, s.width) == (8, 24)
    assert (resolve_sample_settings(r, native, size=32).height, resolve_sample_settings(r, native, size=32).width) == (
        32,
        32,
    )
    with pytest.raises(Exception, match="--size"):
        resolve_sample_settings(None, ModelInfo())


# ------------------------------------------------------------------------------------ commands
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished full run (an APEX student) written without training: recipe.yaml + model/ (the tiny digits model)."""
    root = tmp_path_factory.mktemp("cmd")
    run = root / "runs" / "student"
    run.mkdir(parents=True)
    shutil.copytree(resolve_model_path(DIGITS), run / "model")
    tree = {
        "model": {"path": DIGITS},
        "data": {"source": "digits", "resolution": 8, "cache_dir": str(root / "cache")},
        "method": {"objective": "apex"},
        "sample": {"steps": 2, "renoise": "deterministic", "negative_prompt": "blurry", "seed": 5, "batch": 3},
        "output": {"dir": str(run)},
    }
    (run / "recipe.yaml").write_text(yaml.safe_dump(tree))
    return run


@pytest.fixture
def spy(monkeypatch):
    """Replace the one image generator every command calls; record its settings."""
    import apexctl.inference

    calls: list[dict] = []

    def fake(backbone, prompts, seeds, **kw):
        calls.append({**kw, "seeds": list(seeds)})
        return torch.zeros(len(prompts), 3, kw["height"], kw["width"])

    monkeypatch.setattr(apexctl.inference, "generate_images", fake)
    return calls


SETTING_KEYS = ("height", "width", "steps", "method", "guidance", "negative_prompt", "renoise")


def test_every_command_resolves_the_same_settings(run, spy, tmp_path):
    """Defect 4: one recipe, one meaning of its sample section, in sample / eval geneval / eval digits / eval
    report / the fid and clip-score image sets."""
    from apexctl.eval.sample_sets import student_spec

    _ok(["sample", "a", "--recipe", run / "recipe.yaml", "-n", 1, "--out", tmp_path / "s", "-q"])
    _ok(["sample", "a", "--model", run / "model", "-n", 1, "--out", tmp_path / "s2", "-q"])
    _ok(["eval", "geneval", "--model", run / "model", "--no-score", "--prompts", "0:1", "--per-prompt", 1,
         "--images", tmp_path / "g", "-q"])  # fmt: skip
    _ok(["eval", "digits", "--recipe", run / "recipe.yaml", "--per-prompt", 2, "--teacher-steps", 3,
         "--student-steps", 2, "--out", tmp_path / "d", "-q"])  # fmt: skip
    _ok(["eval", "report", run, "--steps", 2, "--per-prompt", 1, "--out", tmp_path / "r" / "r.html", "-q"])
    student = [c for c in spy if c["steps"] == 2]
    assert len(student) == 5, spy
    want = {"height": 8, "width": 8, "steps": 2, "method": "few", "guidance": 1.0}
    want |= {"negative_prompt": "blurry", "renoise": "deterministic"}
    for call in student:
        assert {k: call[k] for k in SETTING_KEYS} == want, call
    spec = student_spec(run_recipe(run), 2)
    assert {k: getattr(spec, k) for k in SETTING_KEYS} == want
    # the eval's teacher rows are Euler (with the teacher's guidance), whatever the student's auto means
    assert {c["method"] for c in spy if c["steps"] == 3} == {"euler"}


def test_sample_honours_the_recipes_width_seed_and_batch(run, spy, tmp_path):
    _ok(["sample", "a", "b", "--model", run / "model", "-n", 2, "--out", tmp_path / "s", "-q",
         "--set", "sample.width=16"])  # fmt: skip
    assert [c["seeds"] for c in spy] == [[5, 6, 5], [6]]  # one call per unit of sample.batch = 3 images
    assert all((c["height"], c["width"], c["batch"]) == (8, 16, 3) for c in spy)
    assert sorted(p.name for p in (tmp_path / "s").glob("0*.png"))[0].endswith("_seed5.png")
    assert json.loads((tmp_path / "s" / "samples.json").read_text())["width"] == 16
    # a command option wins over the recipe
    _ok(["sample", "a", "--model", run / "model", "-n", 1, "--out", tmp_path / "t", "-q", "--seed", 9,
         "--batch", 1, "--size", 16])  # fmt: skip
    assert (spy[2]["height"], spy[2]["width"], spy[2]["batch"], spy[2]["seeds"]) == (16, 16, 1, [9])


def test_sample_finds_the_run_of_a_model_folder(run, tmp_path):
    """Defect 3: `--model RUN/model` uses RUN/recipe.yaml (size, steps: few-step for the distilled student)."""
    _ok(["sample", "a", "--model", run / "model", "-n", 1, "--out", tmp_path / "s", "-q"])
    rec = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert (rec["height"], rec["steps"], rec["method"], rec["seeds"]) == (8, 2, "few", [5])


@pytest.fixture(scope="module")
def plain_sd3(tmp_path_factory) -> Path:
    """The tiny SD3 as a plain diffusers folder (no apexctl marker: the family comes from model_index.json)."""
    out = tmp_path_factory.mktemp("plain") / "sd3"
    shutil.copytree(resolve_model_path("tiny:sd3"), out)
    (out / "apexctl_model.json").unlink()
    return out


def test_sample_of_a_plain_folder_defaults_to_the_native_size(plain_sd3, tmp_path):
    """Defect 3: no --size and no recipe → the size the stock pipeline draws (SD3: sample_size · vae_scale_factor)."""
    _ok(["sample", "a red fox", "--model", plain_sd3, "-n", 1, "--out", tmp_path / "s", "-q"])
    png = next((tmp_path / "s").glob("000_*.png"))
    assert Image.open(png).size == (32, 32)


def test_missing_and_empty_model_folders_get_their_own_message(tmp_path):
    assert "no such folder" in _fails(["sample", "a", "--model", tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    assert "empty" in _fails(["sample", "a", "--model", tmp_path / "empty"])


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_guided_cli_sample_of_several_images(family, tmp_path):
    """Defect 1 as a user hits it: `apexctl sample --model <tiny SD3/FLUX> --size 32 --steps 4 --guidance 4 -n 2`."""
    model = resolve_model_path(f"tiny:{family}")
    _ok(["sample", "--model", model, "--size", 32, "--steps", 4, "--guidance", 4, "--num-images", 2, "a red fox",
         "--out", tmp_path / "s", "-q"])  # fmt: skip
    assert len(list((tmp_path / "s").glob("00*_a-red-fox_seed*.png"))) == 2


@pytest.mark.parametrize("family", ["qwen_image", "sd3", "sana", "flux", "z_image"])
def test_native_size_is_the_stock_pipelines_default(backbones, family):
    """``Backbone.native_size`` = the height/width the family's stock pipeline passes to ``prepare_latents`` when
    called with neither."""
    import inspect

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(resolve_model_path(FAMILIES[family][0]))
    seen = {}
    original = pipe.prepare_latents

    class Stop(Exception):
        pass

    def spy(*args, **kwargs):
        bound = inspect.signature(original).bind(*args, **kwargs)
        seen.update(height=bound.arguments["height"], width=bound.arguments["width"])
        raise Stop

    pipe.prepare_latents = spy
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(Stop):
        pipe("a red fox", num_inference_steps=1, output_type="latent")
    n = backbones(family).native_size()
    assert seen == {"height": n, "width": n}


def test_a_lora_run_is_the_newest_run(tmp_path, monkeypatch):
    """Defect 9: `apexctl sample` with no model finds a LoRA run (lora/, no model/) and samples base + LoRA."""
    run = tmp_path / "runs" / "lora-run"
    tree = {
        "model": {"path": DIGITS, "lora": {"rank": 2, "alpha": 2.0, "init": "gaussian"}},
        "data": {"source": "digits", "resolution": 8},
        "sample": {"steps": 1},
        "output": {"dir": "elsewhere"},  # the run folder was moved: its own location wins
    }
    save_random_lora(DIGITS, run / "lora")
    run.mkdir(exist_ok=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(tree))
    monkeypatch.chdir(tmp_path)
    out = _ok(["sample", "a handwritten digit seven", "-n", 1, "--out", tmp_path / "s", "-q"])
    assert "wrote 1 images" in out
    rec = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert rec["model"].endswith(f"+ LoRA {Path('runs', 'lora-run', 'lora')}"), rec["model"]
    with_lora = np.asarray(Image.open(next((tmp_path / "s").glob("000_*.png"))), dtype=int)
    _ok(["sample", "a handwritten digit seven", "--model", DIGITS, "-n", 1, "--steps", 1, "--size", 8,
         "--out", tmp_path / "base", "-q"])  # fmt: skip
    base = np.asarray(Image.open(next((tmp_path / "base").glob("000_*.png"))), dtype=int)
    assert np.abs(with_lora - base).max() > 0  # the adapter was attached
