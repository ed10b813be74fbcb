"""The "scenes" setting: coloured digits at positions on a 16×16 RGB canvas (a harder sibling of ``digits``).

Canvas: RGB ``[3, 16, 16]`` in [−1, 1], background −1. A digit is an 8×8 scikit-learn digit (ink from
:func:`apexctl.data.digits.load_split`: TRAIN split for training scenes, held-out TEST split for the judge's real
reference) painted in one palette colour: channel ``c`` = ``−1 + (ink + 1)·pattern[c]`` (so a red digit has its ink
in R and −1 in G, B; a white digit has it in all three). Positions are the four 8×8 quadrants.

- Single-digit scenes: one digit in one quadrant ("a red seven in the top left").
- Pair scenes: two digits side by side in the **top row** (top-left and top-right quadrants, bottom row empty),
  every pair adds to ten ((1, 9) … (9, 1), incl. (5, 5)), each digit in its own random colour
  ("a red one beside a blue nine"). Using the quadrants for pairs too means the judge has one slot layout.

Prompts: each scene gets its fully specified prompt plus every several-mode (multi) prompt of ``MULTI_PROMPTS`` it
satisfies (as :func:`apexctl.data.digits.training_pairs` does). Multi prompts leave classes, colours or positions
open, or ask for a pair that adds to ten, so a one-step model regressing to the conditional mean shows up as a blur
spread over modes. :func:`eval_prompts` lists the evaluation prompts, each with its :class:`SceneRule` (what counts as
correct) and kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from apexctl.data.digits import NAMES, DigitsSplit
from apexctl.errors import BadInput

SIZE = 16  # canvas side; a digit is 8×8
RESOLUTION = SIZE
#: palette: name → RGB channel pattern (ink goes where the pattern is 1)
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
#: position name → (row, col) offset of its 8×8 quadrant
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top right": (0, 8),
    "bottom left": (8, 0),
    "bottom right": (8, 8),
}
POSITION_NAMES: tuple[str, ...] = tuple(POSITIONS)
PAIR_POSITIONS: tuple[str, str] = ("top left", "top right")  # pairs: left digit, right digit
PAIR_SUM = 10
ALL_CLASSES = frozenset(range(10))
EVEN = frozenset({0, 2, 4, 6, 8})
ODD = frozenset({1, 3, 5, 7, 9})

N_SINGLE = 3000  # training single-digit scenes
N_PAIR = 600  # training pair scenes


@dataclass(frozen=True)
class Digit:
    """One painted digit of a scene: class, colour name, position name."""

    label: int
    colour: str
    position: str


@dataclass(frozen=True)
class SceneRule:
    """What counts as a correct image: exactly ``count`` digits, at ``positions`` (count 1: one of them; count 2:
    exactly these), each with a class in ``classes`` and a colour in ``colours``; pairs also add to ``pair_sum``."""

    classes: frozenset[int] = ALL_CLASSES
    colours: frozenset[str] = frozenset(COLOURS)
    positions: frozenset[str] = frozenset(POSITION_NAMES)
    count: int = 1
    pair_sum: int | None = None

    def modes(self) -> dict[str, list]:
        """The open attributes and their allowed values (what multi-prompt coverage counts): ``class`` / ``colour``
        / ``position`` when more than one value is allowed; pairs: ``pair`` = the (left, right) classes adding up."""
        if self.count == 2:
            s = self.pair_sum if self.pair_sum is not None else PAIR_SUM
            return {"pair": [(a, s - a) for a in sorted(self.classes) if (s - a) in self.classes]}
        out: dict[str, list] = {}
        for name, values in (("class", self.classes), ("colour", self.colours), ("position", self.positions)):
            if len(values) > 1:
                order = POSITION_NAMES if name == "position" else COLOURS if name == "colour" else range(10)
                out[name] = [v for v in order if v in values]
        return out

    def satisfied_by(self, digits: Sequence[Digit]) -> bool:
        """Whether a scene with ``digits`` (position-sorted or not) satisfies this rule."""
        if len(digits) != self.count or len({d.position for d in digits}) != self.count:
            return False
        if any(d.label not in self.classes or d.colour not in self.colours for d in digits):
            return False
        if self.count == 1:
            return digits[0].position in self.positions
        if {d.position for d in digits} != set(self.positions):
            return False
        return self.pair_sum is None or sum(d.label for d in digits) == self.pair_sum


@dataclass(frozen=True)
class ScenePrompt:
    """One evaluation prompt, its rule and its kind ("single": one valid (class, colour, position); "multi": several).

    ``allowed`` is the rule (named like :class:`apexctl.data.digits.EvalPrompt`'s field, so one eval loop serves both)."""

    prompt: str
    allowed: SceneRule
    kind: Literal["single", "multi"]


PAIR_RULE = SceneRule(classes=frozenset(range(1, 10)), positions=frozenset(PAIR_POSITIONS), count=2, pair_sum=PAIR_SUM)
#: the several-mode prompts (training and evaluation)
MULTI_PROMPTS: dict[str, SceneRule] = {
    "an even digit in the bottom right": SceneRule(classes=EVEN, positions=frozenset({"bottom right"})),
    "an odd blue digit in the top left": SceneRule(
        classes=ODD, colours=frozenset({"blue"}), positions=frozenset({"top left"})
    ),
    "an odd red digit in the bottom left": SceneRule(
        classes=ODD, colours=frozenset({"red"}), positions=frozenset({"bottom left"})
    ),
    "a green three": SceneRule(classes=frozenset({3}), colours=frozenset({"green"})),
    "a white eight": SceneRule(classes=frozenset({8}), colours=frozenset({"white"})),
    "a blue digit": SceneRule(colours=frozenset({"blue"})),
    "two digits that add to ten": PAIR_RULE,
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def single_prompt(d: Digit) -> str:
    """The fully specified prompt of a one-digit scene: "a red seven in the top left"."""
    return f"{_article(d.colour)} {d.colour} {NAMES[d.label]} in the {d.position}"


def pair_prompt(left: Digit, right: Digit) -> str:
    """The fully specified prompt of a pair scene: "a red one beside a blue nine"."""
    return f"{_article(left.colour)} {left.colour} {NAMES[left.label]} beside {_article(right.colour)} {right.colour} {NAMES[right.label]}"


def full_prompt(digits: Sequence[Digit]) -> str:
    return single_prompt(digits[0]) if len(digits) == 1 else pair_prompt(*digits)


def multi_prompts_for(digits: Sequence[Digit]) -> list[str]:
    """The multi prompts a scene satisfies, in ``MULTI_PROMPTS`` order."""
    return [p for p, rule in MULTI_PROMPTS.items() if rule.satisfied_by(digits)]


def _rule_of(d: Digit) -> SceneRule:
    return SceneRule(frozenset({d.label}), frozenset({d.colour}), frozenset({d.position}))


#: the fully specified evaluation prompts: every class once, each colour and position 2–3 times
EVAL_SINGLE: tuple[Digit, ...] = tuple(Digit(c, COLOURS[c % 4], POSITION_NAMES[(c + c // 4) % 4]) for c in range(10))


def eval_prompts() -> list[ScenePrompt]:
    """The fixed evaluation prompts: 10 fully specified single-digit prompts, then the 7 multi prompts."""
    singles = [ScenePrompt(single_prompt(d), _rule_of(d), "single") for d in EVAL_SINGLE]
    return singles + [ScenePrompt(p, rule, "multi") for p, rule in MULTI_PROMPTS.items()]


def paint(inks: Sequence[torch.Tensor], digits: Sequence[Digit]) -> torch.Tensor:
    """Paint 8×8 inks (``[1, 8, 8]`` or ``[8, 8]`` in [−1, 1], background −1) as ``digits`` → ``[3, 16, 16]``."""
    canvas = torch.full((3, SIZE, SIZE), -1.0)
    for ink, d in zip(inks, digits, strict=True):
        r, c = POSITIONS[d.position]
        pattern = torch.tensor(PALETTE[d.colour]).view(3, 1, 1)
        canvas[:, r : r + 8, c : c + 8] = -1.0 + (ink.reshape(1, 8, 8) + 1.0) * pattern
    return canvas


@dataclass(frozen=True)
class SceneSet:
    """Scenes ``[N, 3, 16, 16]`` float32 in [−1, 1] and their digits (position order: top-left first)."""

    images: torch.Tensor
    digits: list[tuple[Digit, ...]]


def _by_class(labels: torch.Tensor) -> list[np.ndarray]:
    lab = labels.cpu().numpy()
    return [np.flatnonzero(lab == c) for c in range(10)]


def _render(images: torch.Tensor, by_class: list[np.ndarray], scenes: list[tuple[Digit, ...]], rng) -> SceneSet:
    out = torch.empty((len(scenes), 3, SIZE, SIZE))
    for i, ds in enumerate(scenes):
        inks = [images[int(rng.choice(by_class[d.label]))] for d in ds]
        out[i] = paint(inks, ds)
    return SceneSet(out, scenes)


def _pair(rng, a: int) -> tuple[Digit, Digit]:
    c1, c2 = (COLOURS[int(k)] for k in rng.integers(0, len(COLOURS), size=2))
    return Digit(a, c1, PAIR_POSITIONS[0]), Digit(PAIR_SUM - a, c2, PAIR_POSITIONS[1])


def make_scenes(images: torch.Tensor, labels: torch.Tensor, n_single: int, n_pair: int, seed: int = 0) -> SceneSet:
    """``n_single`` one-digit scenes (class, colour, position uniform) then ``n_pair`` pair scenes (pairs adding to
    ten, uniform; colours uniform each), inks drawn from ``images`` of the class. Deterministic for a given seed."""
    if n_single < 0 or n_pair < 0:
        raise BadInput(f"scene counts must be >= 0, got {n_single} single, {n_pair} pair")
    rng = np.random.default_rng(seed)
    scenes: list[tuple[Digit, ...]] = []
    for _ in range(n_single):
        c, k, p = rng.integers(0, 10), rng.integers(0, len(COLOURS)), rng.integers(0, len(POSITION_NAMES))
        scenes.append((Digit(int(c), COLOURS[int(k)], POSITION_NAMES[int(p)]),))
    scenes += [_pair(rng, int(rng.integers(1, 10))) for _ in range(n_pair)]
    return _render(images, _by_class(labels), scenes, rng)


def scenes_for_rule(images: torch.Tensor, labels: torch.Tensor, rule: SceneRule, n: int, seed: int = 0) -> SceneSet:
    """``n`` real scenes satisfying ``rule``, uniform over its allowed classes (pairs: over its pairs), colours and
    positions, inks from ``images`` (the judge's real reference uses the held-out split)."""
    rng = np.random.default_rng(seed)
    classes, colours = sorted(rule.classes), [c for c in COLOURS if c in rule.colours]
    positions = [p for p in POSITION_NAMES if p in rule.positions]
    scenes: list[tuple[Digit, ...]] = []
    for _ in range(n):
        if rule.count == 2:
            left, right = rule.modes()["pair"][int(rng.integers(0, len(rule.modes()["pair"])))]
            c1, c2 = (colours[int(k)] for k in rng.integers(0, len(colours), size=2))
            scenes.append((Digit(left, c1, PAIR_POSITIONS[0]), Digit(right, c2, PAIR_POSITIONS[1])))
        else:
            c = classes[int(rng.integers(0, len(classes)))]
            k = colours[int(rng.integers(0, len(colours)))]
            p = positions[int(rng.integers(0, len(positions)))]
            scenes.append((Digit(c, k, p),))
    return _render(images, _by_class(labels), scenes, rng)


def train_scenes(split: DigitsSplit, seed: int = 0, n_single: int = N_SINGLE, n_pair: int = N_PAIR) -> SceneSet:
    """The training scenes: inks from ``split``'s TRAIN digits only."""
    return make_scenes(split.train_images, split.train_labels, n_single, n_pair, seed=seed)


def training_pairs(scenes: Sequence[Sequence[Digit]]) -> list[tuple[int, str]]:
    """(scene index, prompt) pairs, scene-major: the fully specified prompt, then every multi prompt it satisfies."""
    pairs: list[tuple[int, str]] = []
    for i, ds in enumerate(scenes):
        pairs.append((i, full_prompt(ds)))
        pairs.extend((i, p) for p in multi_prompts_for(ds))
    return pairs


def all_prompts() -> list[str]:
    """Every single-digit prompt (160), the multi and eval prompts (pair prompts come from the training scenes)."""
    singles = [single_prompt(Digit(c, k, p)) for c in range(10) for k in COLOURS for p in POSITION_NAMES]
    return list(dict.fromkeys(singles + list(MULTI_PROMPTS) + [e.prompt for e in eval_prompts()]))


def vocabulary_corpus() -> list[str]:
    """Phrases for the tiny tokenizer of ``tiny:scenes`` (each word one token)."""
    pairs = [
        pair_prompt(Digit(a, k, "top left"), Digit(PAIR_SUM - a, k, "top right")) for a in range(1, 10) for k in COLOURS
    ]
    return [*all_prompts(), *pairs]
