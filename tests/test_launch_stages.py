"""The stages around training on N processes (`--launch 2`, gloo on CPU): prepare, eval generation and sample give
what one process gives, file for file, and resume after a rank is killed (SIGKILL) in the middle.

A cache is compared through its manifest (every shard's sha256: the files are byte-identical) and by training on
it; image folders PNG for PNG.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from data_util import CAPTIONS, digits_recipe, metrics, ok, recipe, run_apexctl, write_folder

from apexctl.data.cache import LatentCache


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("launch-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("APEXCTL_HOME", str(home))
    yield home
    mp.undo()


def _launched(home: Path, args: list, signal_at: str | None = None, code: int = 0) -> str:
    res = run_apexctl([*args, "--launch", 2, "-q"], home, signal_at=signal_at)
    assert (res.returncode == 0) == (code == 0), res.stdout + res.stderr
    return res.stdout


def _manifest(cache: Path) -> dict:
    m = json.loads((cache / "manifest.json").read_text())
    return {k: v for k, v in m.items() if k != "manifest_sha256"}


def _same_cache(a: Path, b: Path) -> None:
    assert _manifest(a) == _manifest(b)  # every shard's sha256, sizes, counts and settings
    for shard in (a / "images").glob("*.safetensors"):
        assert shard.read_bytes() == (b / "images" / shard.name).read_bytes()
    LatentCache.open(b, verify="full")


def _pngs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def test_prepare_on_two_processes_resumes_after_a_kill_and_trains_like_one(home, tmp_path):
    """Digits in 7 image shards and 3 prompt shards: rank 1 is SIGKILLed as it is about to write its second image
    shard; the rerun on 2 processes writes only the missing shards, and the cache equals the one-process cache,
    down to the training losses."""
    data = {"shard_size": 16, "limit": 100}
    for d in ("one", "two"):
        (tmp_path / d).mkdir()
    one = digits_recipe(tmp_path / "one", "one", data={**data, "cache_dir": str(tmp_path / "c1")}, train={"steps": 3})
    two = digits_recipe(tmp_path / "two", "two", data={**data, "cache_dir": str(tmp_path / "c2")}, train={"steps": 3})
    ok(["prepare", one, "-q"])
    kill = "1:apexctl.data.build:BuildState.finish:3:SIGKILL"  # rank 1: prompt shard 1, image shard 1, then dies
    _launched(home, ["prepare", two], signal_at=kill, code=1)
    c2 = tmp_path / "c2"
    assert not (c2 / "manifest.json").exists()
    done = {p.name: p.stat().st_mtime_ns for p in (c2 / "images").glob("*.safetensors")}
    assert "shard-00001.safetensors" in done and "shard-00003.safetensors" not in done
    _launched(home, ["prepare", two])
    kept = {n: (c2 / "images" / n).stat().st_mtime_ns for n in done}
    assert kept == done  # finished shards are kept, not rewritten
    _same_cache(tmp_path / "c1", c2)
    assert json.loads((c2 / "prepare_report.json").read_text())["timing"]["processes"] == 2
    ok(["distill", one, "-q"])
    ok(["distill", two, "-q"])
    losses = [[r["loss"] for r in metrics(tmp_path / d / d)] for d in ("one", "two")]
    assert losses[0] == losses[1] and len(losses[0]) == 3


def test_prepare_folder_and_synthesis_on_two_processes_equal_one(home, tmp_path):
    """An image folder (decoded on DataLoader workers) and teacher synthesis (seeds per item) in 3-item shards."""
    rows = [(f"{i}.png", 40, 36, CAPTIONS[i % len(CAPTIONS)]) for i in range(10)]
    folder = write_folder(tmp_path / "imgs", rows)
    (tmp_path / "p.txt").write_text("a red fox\na blue bird\na cat\n")
    synth = {"steps": 2, "guidance": 2.0, "images_per_prompt": 2, "seed": 3, "batch": 2}
    sources = {
        "folder": {"source": "folder", "path": str(folder), "num_workers": 1},
        "synth": {"source": "prompts", "path": str(tmp_path / "p.txt"), "synthesize": synth},
    }
    for name, data in sources.items():
        for n in (1, 2):
            r = recipe(tmp_path, f"{name}{n}", data={**data, "shard_size": 3, "cache_dtype": "fp32"})
            if n == 1:
                ok(["prepare", r, "-q"])
            else:
                _launched(home, ["prepare", r])
        _same_cache(tmp_path / f"cache-{name}1", tmp_path / f"cache-{name}2")
    assert len(_manifest(tmp_path / "cache-synth2")["shards"]["images"]) == 2


def test_geneval_generation_on_two_processes_resumes_after_a_kill(home, tmp_path):
    """5 prompts × 2 images in batches of 3 (4 units): rank 1 dies before saving its second image; the rerun
    draws what is missing, and every PNG, seeds.json and generation.json equals a one-process run's."""
    common = ["eval", "geneval", "--model", "tiny:test", "--size", 32, "--per-prompt", 2, "--prompts", "0:5"]
    common += ["--batch", 3, "--no-score"]
    ok([*common, "--images", tmp_path / "one", "-q"])
    two = tmp_path / "two"
    _launched(home, [*common, "--images", two], signal_at="1:apexctl.images:save_png:2:SIGKILL", code=1)
    partial = _pngs(two)
    assert 0 < len(partial) < 10
    out = _launched(home, [*common, "--images", two])
    assert out.count(f"{10 - len(partial)} generated, {len(partial)} kept") == 1, out  # rank 0 reports
    one_files = _pngs(tmp_path / "one")
    assert _pngs(two) == one_files and len(one_files) == 10
    for i in range(5):
        seeds = [json.loads((d / f"{i:05d}" / "seeds.json").read_text()) for d in (tmp_path / "one", two)]
        assert seeds[0] == seeds[1] == {"00000.png": 42, "00001.png": 43}
    assert (two / "generation.json").read_text() == (tmp_path / "one" / "generation.json").read_text()


def test_sample_prompts_file_on_two_processes_equals_one(home, tmp_path):
    (tmp_path / "p.txt").write_text("a red fox\na blue bird\na cat\n")
    common = ["sample", "--prompts-file", tmp_path / "p.txt", "--model", "tiny:test", "--size", 32, "-n", 3]
    common += ["--batch", 4, "--steps", 2]
    ok([*common, "--out", tmp_path / "one", "-q"])
    out = _launched(home, [*common, "--out", tmp_path / "two"])
    assert out.count("wrote 9 images") == 1  # rank 0 alone reports
    assert _pngs(tmp_path / "two") == _pngs(tmp_path / "one")  # the 9 images and grid.png
    records = [json.loads((tmp_path / d / "samples.json").read_text()) for d in ("one", "two")]
    assert records[0] == records[1] and records[0]["complete"] is True


def test_fid_and_clip_score_image_sets_on_two_processes_equal_one(home, tmp_path):
    """`eval fid RUN --launch 2` and `eval clip-score RUN --teacher --launch 2`: the student and teacher sets drawn
    on 2 processes are the one-process sets, and rank 0 alone computes the same values from them."""
    from fid_util import build_fid_weights
    from tiny_eval_models import build_tiny_clip

    r = digits_recipe(tmp_path, "run", train={"steps": 2})
    ok(["prepare", r, "-q"])
    ok(["distill", r, "-q"])
    for copy in ("run2", "run3"):
        shutil.copytree(tmp_path / "run", tmp_path / copy, ignore=shutil.ignore_patterns("eval"))
    (tmp_path / "prompts.txt").write_text("a handwritten digit seven\nan even digit\nany digit\n")
    weights = build_fid_weights(tmp_path)
    args = ["--prompts", tmp_path / "prompts.txt", "--per-prompt", 2, "--teacher-steps", 3, "--inception", weights]
    ok(["eval", "fid", tmp_path / "run", *args, "-q"])
    out = _launched(home, ["eval", "fid", tmp_path / "run2", *args])
    assert out.count("FID") >= 1 and out.count("summary:") == 1
    fids = [json.loads((tmp_path / d / "eval" / "fid.json").read_text()) for d in ("run", "run2")]
    assert fids[1]["fid"] == pytest.approx(fids[0]["fid"], rel=1e-6)
    for side in ("generated", "reference"):
        a, b = Path(fids[0][side]["path"]), Path(fids[1][side]["path"])
        assert _pngs(a) == _pngs(b) and len(_pngs(a)) == 6
        assert (a / "samples.jsonl").read_text() == (b / "samples.jsonl").read_text()

    clip = build_tiny_clip(tmp_path / "clip")
    common = ["--prompts", tmp_path / "prompts.txt", "--per-prompt", 2, "--teacher-steps", 3, "--clip", clip]
    ok(["eval", "clip-score", tmp_path / "run", *common, "--teacher", "-q"])  # the FID's sets, reused
    _launched(home, ["eval", "clip-score", tmp_path / "run3", *common, "--teacher"])
    rows = [json.loads((tmp_path / d / "eval" / "clip_score.json").read_text())["rows"] for d in ("run", "run3")]
    assert rows[0].keys() == rows[1].keys() == {"student 1 step", "teacher 3 steps"}
    for label in rows[0]:
        assert rows[1][label]["clip_score"] == pytest.approx(rows[0][label]["clip_score"], rel=1e-6)
        assert _pngs(Path(rows[1][label]["path"])) == _pngs(Path(rows[0][label]["path"]))


def test_bad_input_is_refused_before_any_process_starts(tmp_path):
    """With --launch, the command checks its input in the calling process: one line, exit 2, nothing launched."""
    from data_util import fails

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: tiny:test}\ndata: {source: digits, resolution: -3}\n")
    assert "resolution" in fails(["prepare", bad, "--launch", 2])
    out = fails(["eval", "geneval", "--model", "tiny:test", "--prompts", "900:901", "--no-score", "--launch", 2])
    assert "900" in out
    (tmp_path / "p.txt").write_text("a\n")
    out = fails(["eval", "fid", "--generated", tmp_path, "--reference", tmp_path, "--launch", 2])
    assert "no images" in out or "Inception" in out
    out = fails(["sample", "--prompts-file", tmp_path / "missing.txt", "--launch", 2])
    assert "missing.txt" in out
    out = fails(["eval", "clip-score", "--clip", tmp_path / "no-clip", "--images", tmp_path, "--launch", 2])
    assert "no-clip" in out
