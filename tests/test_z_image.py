"""What only the Z-Image adapter does, on a hub-free tiny build (docs/design.md §3-§4): the chat-template tokenizer, the
reversed time and sign of its transformer, and per-sample rows at the condition site (the stock forward packs the
captions of a batch). tests/test_family_conformance.py holds what every family satisfies against its stock pipeline."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from apexctl.models.tiny_z_image import build_tiny_z_image
from apexctl.models.z_image import ZImageBackbone

PROMPTS = ["a red fox", "a handwritten digit seven in the snow"]


@pytest.fixture(scope="module")
def zi(tmp_path_factory) -> ZImageBackbone:
    return ZImageBackbone.from_pretrained(build_tiny_z_image(tmp_path_factory.mktemp("z_image") / "tiny"))


def _x(seed: int, b: int = 2) -> torch.Tensor:
    return torch.randn(b, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_tokenizer_has_the_chat_template(zi):
    assert len(zi.tokenizer) > 100 and zi.tokenizer.chat_template
    text = zi.tokenizer.apply_chat_template(
        [{"role": "user", "content": "a red fox"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\na red fox<|im_end|>\n<|im_start|>assistant\n"


def test_velocity_is_negated_reversed_time_model(zi):
    cond = zi.encode_prompts(PROMPTS)
    x, t = _x(5), torch.tensor([0.8, 0.3])
    with torch.no_grad():
        raw = zi.transformer(
            list(x.unsqueeze(2).unbind(0)), 1 - t, ZImageBackbone.cond_to_list(cond), return_dict=False
        )[0]
        v = zi.velocity(x, t, cond)
    torch.testing.assert_close(v, -torch.stack(raw).squeeze(2), atol=1e-5, rtol=0)


def test_a_shift_on_one_row_changes_that_row_only(zi):
    from apexctl.engine.shift import ConditionShift

    site = zi.condition_site()
    cond = zi.encode_prompts(PROMPTS)
    x, t = _x(3), torch.tensor([0.5, 0.5])
    with torch.no_grad():
        v = zi.velocity(x, t, cond)
    shift = ConditionShift(a=-1.0, b=0.1)
    with torch.no_grad(), shift.applied(site, torch.tensor([False, True])):
        v_shift = zi.velocity(x, t, cond)
    with torch.no_grad(), shift.applied(site, torch.tensor([True])):
        v_one = zi.velocity(x[1:], t[1:], cond[1])
    assert torch.equal(v_shift[0], v[0]) and not torch.allclose(v_shift[1], v[1])
    torch.testing.assert_close(v_shift[1:], v_one, atol=1e-5, rtol=0)  # equals shifting that row alone
    assert not site._forward_hooks and not site._forward_pre_hooks  # velocity's per-sample hooks are gone
