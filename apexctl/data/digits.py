"""The embedded default data set: scikit-learn's 8×8 handwritten digits with text prompts (offline).

Pixel convention: sklearn stores ink intensity 0..16 (0 = blank paper, 16 = full ink). We map it linearly to
``x = v / 8 − 1``, so **background is −1 and ink is +1**. Saved as PNG (``apexctl.images``: −1→0, +1→255) the
digits therefore look white on black, like MNIST.

Prompts. Each image gets one *single* prompt that names its digit and every *multi* prompt whose digit set
contains its label (see ``training_pairs``). Multi prompts have several valid answers, so a one-step student
that collapses to the conditional mean shows up there (``apexctl.eval.toy.digits`` reports mode coverage).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from apexctl.errors import BadInput

NAMES: list[str] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SINGLE_TEMPLATES: list[str] = ["a handwritten digit {}", "the number {}", "a drawing of the digit {}"]
MULTI_PROMPTS: dict[str, frozenset[int]] = {
    "an even digit": frozenset({0, 2, 4, 6, 8}),
    "an odd digit": frozenset({1, 3, 5, 7, 9}),
    "a digit greater than five": frozenset({6, 7, 8, 9}),
    "a digit less than five": frozenset({0, 1, 2, 3, 4}),
    "any digit": frozenset(range(10)),
}
# The single prompt the evaluation uses (it is also one of the training templates).
EVAL_TEMPLATE = SINGLE_TEMPLATES[0]

N_IMAGES = 1797  # size of sklearn's digits set


@dataclass(frozen=True)
class DigitsSplit:
    """A stratified train / held-out split. Images: float32 ``[N, 1, 8, 8]`` in [−1, 1] (ink = +1); labels: int64 ``[N]``."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt and the digit classes that count as a correct answer to it."""

    prompt: str
    allowed: frozenset[int]
    kind: Literal["single", "multi"]


def load_split(holdout: int = 397, seed: int = 0) -> DigitsSplit:
    """Load the digits and split off ``holdout`` images, stratified by label; same (holdout, seed) → same split.

    The default (397 held out, 1400 for training) is the split of notes/toy-experiment.md.
    """
    if not 10 <= holdout <= N_IMAGES - 10:
        raise BadInput(
            f"digits holdout must be between 10 and {N_IMAGES - 10} (one image per class each side), got {holdout}"
        )
    data = load_digits()
    images = (data.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # 0..16 -> [-1, 1], add channel axis
    labels = data.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=holdout, stratify=labels, random_state=seed
    )
    return DigitsSplit(
        train_images=torch.from_numpy(np.ascontiguousarray(images[idx_train])),
        train_labels=torch.from_numpy(labels[idx_train]),
        test_images=torch.from_numpy(np.ascontiguousarray(images[idx_test])),
        test_labels=torch.from_numpy(labels[idx_test]),
    )


def single_prompt(label: int, template: str = EVAL_TEMPLATE) -> str:
    """The single-digit prompt for ``label`` with ``template`` (e.g. "a handwritten digit seven")."""
    return template.format(NAMES[int(label)])


def multi_prompts_for(label: int) -> list[str]:
    """The multi prompts whose digit set contains ``label``, in ``MULTI_PROMPTS`` order."""
    return [p for p, allowed in MULTI_PROMPTS.items() if int(label) in allowed]


def training_pairs(labels: torch.Tensor | np.ndarray | Sequence[int], seed: int = 0) -> list[tuple[int, str]]:
    """(image index, prompt) pairs for training, image-major, deterministic for a given (labels, seed).

    Each image i gets one single prompt naming its digit, with a template drawn by ``np.random.default_rng(seed)``,
    then every multi prompt that contains its label. Every label has 3 multi prompts except 5 (2: it is neither
    greater nor less than five), so the mix is about 26 % single / 74 % multi (default split: 1400 single, 4058
    multi pairs, 25.6 % single), and "any digit" alone is about a quarter of all pairs. A trainer that wants
    another balance should reweight by kind rather than change this list.
    """
    labels_arr = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64).reshape(-1)
    if labels_arr.size and (labels_arr.min() < 0 or labels_arr.max() > 9):
        raise BadInput(f"digit labels must be in 0..9, got range {labels_arr.min()}..{labels_arr.max()}")
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, len(SINGLE_TEMPLATES), size=labels_arr.size)  # one draw per image, in order
    pairs: list[tuple[int, str]] = []
    for i, (label, t) in enumerate(zip(labels_arr.tolist(), templates.tolist(), strict=True)):
        pairs.append((i, single_prompt(label, SINGLE_TEMPLATES[t])))
        pairs.extend((i, p) for p in multi_prompts_for(label))
    return pairs


def eval_prompts() -> list[EvalPrompt]:
    """The fixed evaluation prompts: "a handwritten digit {name}" for the 10 digits, then the 5 multi prompts."""
    singles = [EvalPrompt(single_prompt(d), frozenset({d}), "single") for d in range(10)]
    multis = [EvalPrompt(p, allowed, "multi") for p, allowed in MULTI_PROMPTS.items()]
    return singles + multis


def all_prompts() -> list[str]:
    """Every distinct prompt used in training or evaluation (35: 3 templates × 10 digits + 5 multi), stable order."""
    train = [t.format(name) for t in SINGLE_TEMPLATES for name in NAMES] + list(MULTI_PROMPTS)
    return list(dict.fromkeys(train + [e.prompt for e in eval_prompts()]))  # dedupe, keep first-seen order
