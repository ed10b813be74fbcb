"""What only the SANA adapter does, on a hub-free tiny build (docs/design.md §3-§4): its Gemma tokenizer, positive prompts with
the complex human instruction but "" as the pipeline's negative prompt, and the two schedulers SanaPipeline is used
with. tests/test_family_conformance.py holds what every family satisfies against its stock pipeline."""

from __future__ import annotations

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from apexctl.errors import BadInput
from apexctl.models.sana import SanaBackbone, default_complex_human_instruction
from apexctl.models.tiny_sana import build_tiny_sana, gemma_tokenizer

PROMPTS = ["a red fox", "a handwritten digit seven in the snow"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_sana(tmp_path_factory.mktemp("sana") / "tiny")


def test_tokenizer_is_deterministic_gemma_style():
    a, b = gemma_tokenizer(), gemma_tokenizer()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    ids = a("a handwritten digit seven").input_ids
    assert ids[0] == a.bos_token_id and len(ids) == 5  # <bos> + one token per corpus word


def test_the_empty_prompt_is_encoded_as_the_negative_prompt(folder):
    from diffusers import SanaPipeline

    sana = SanaBackbone.from_pretrained(folder)
    pipe = SanaPipeline.from_pretrained(folder)
    ours = sana.encode_prompts(PROMPTS + [""])
    embeds, _, neg, neg_mask = pipe.encode_prompt(
        PROMPTS,
        do_classifier_free_guidance=True,
        negative_prompt="",
        device="cpu",
        complex_human_instruction=default_complex_human_instruction(),
    )
    assert torch.equal(ours.embeds[:2], embeds)  # positive prompts: with the complex human instruction
    assert torch.equal(ours.embeds[2:], neg[:1]) and torch.equal(ours.mask[2:], neg_mask[:1].long())  # "": without
    assert ours.mask[2].sum() < ours.mask[1].sum() < sana.max_sequence_length  # every row padded to 300 tokens
    assert torch.equal(sana.encode_negative_prompts(["", ""]).embeds, neg)


def _with_scheduler(folder, dest, name: str):
    shutil.copytree(folder, dest)
    cfg_path = dest / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "_class_name": name}))
    return dest


def test_dpm_solver_folders_load_and_save_and_other_schedulers_are_refused(folder, tmp_path):
    """The hub SANA models ship DPMSolverMultistepScheduler; model_index.json records the scheduler present."""
    dpm = _with_scheduler(folder, tmp_path / "dpm", "DPMSolverMultistepScheduler")
    bb = SanaBackbone.from_pretrained(dpm, load_text_encoder=False, load_codec=False)
    assert type(bb.scheduler).__name__ == "DPMSolverMultistepScheduler"
    bb.save_pretrained(tmp_path / "out", source=dpm)
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]
    other = _with_scheduler(folder, tmp_path / "euler", "EulerDiscreteScheduler")
    with pytest.raises(
        BadInput, match=r"scheduler 'EulerDiscreteScheduler' is not supported \(allowed: Flow.*DPMSolver"
    ):
        SanaBackbone.from_pretrained(other, load_text_encoder=False, load_codec=False)
