"""Shared loading pieces of the family adapters: one-line errors instead of tracebacks or silent empty tokenizers."""

from __future__ import annotations

import pytest

from apexctl.errors import BadInput
from apexctl.models.base import load_component, load_tokenizer


class _Tok:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def test_empty_tokenizer_is_refused_with_one_line():
    # transformers 5 offline returns an empty tokenizer for an uncached hub id instead of raising
    with pytest.raises(BadInput, match=r"^org/model: tokenizer_2/ loaded empty \(3 tokens\): not a local folder"):
        load_tokenizer("org/model", "tokenizer_2", lambda: _Tok(3), min_tokens=10)
    assert len(load_tokenizer("org/model", "tokenizer", lambda: _Tok(11), min_tokens=10)) == 11


def test_component_load_failure_is_one_line():
    def fail():
        raise OSError("no file named config.json\nsecond line")

    with pytest.raises(BadInput, match=r"^/m: cannot load vae/ \(OSError: no file named config.json\)$"):
        load_component("/m", "vae", fail)
