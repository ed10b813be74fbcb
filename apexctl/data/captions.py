"""Caption checks: empty and over-long captions are dropped (and reported) before anything is encoded.

The length limit is ``data.max_caption_tokens`` or the family's ``max_sequence_length`` (what its pipeline would
truncate to), counted with the family's long-text tokenizer (T5 for SD3 / FLUX, else the one tokenizer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from apexctl.data.report import Report
from apexctl.data.sources import Item


def _long_tokenizer(backbone) -> object | None:
    for name in ("tokenizer_3", "tokenizer_2", "tokenizer"):
        tok = getattr(backbone, name, None)
        if tok is not None:
            return tok
    return None


def token_counts(backbone, texts: Sequence[str]) -> dict[str, int] | None:
    """Tokens per text (no special tokens), or None when the backbone has no tokenizer loaded."""
    tok = _long_tokenizer(backbone)
    if tok is None or not texts:
        return None
    ids = tok(list(texts), add_special_tokens=False)["input_ids"]
    return {t: len(i) for t, i in zip(texts, ids, strict=True)}


def filter_captions(items: Sequence[Item], backbone, max_tokens: int | None, report: Report) -> list[Item]:
    """Items with their bad captions removed; an item with no caption left is skipped. Each drop goes to ``report``."""
    limit = max_tokens if max_tokens is not None else getattr(backbone, "max_sequence_length", None)
    unique = sorted({c for it in items for c in it.captions if c.strip()})
    counts = token_counts(backbone, unique) if limit is not None else None
    kept: list[Item] = []
    for it in items:
        good = []
        for c in it.captions:
            if not c.strip():
                reason = "empty caption"
            elif counts is not None and counts[c] > limit:
                reason = f"caption too long ({counts[c]} tokens > {limit})"
            else:
                good.append(c)
                continue
            if len(it.captions) > 1:
                report.skip(it.index, it.key, reason, caption=c)
            else:
                report.skip(it.index, it.key, reason)
        if len(good) == len(it.captions):
            kept.append(it)
        elif good:
            kept.append(replace(it, captions=tuple(good)))
    return kept
