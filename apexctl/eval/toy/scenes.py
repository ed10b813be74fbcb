"""The scenes judge: attribute-aware checks in the spirit of GenEval for 16×16 RGB scenes of coloured digits.

Per slot (the four 8×8 quadrants; a pair occupies the two top ones) of an image clamped to [−1, 1]:

- **present**: at least ``PRESENT_PIXELS`` ink pixels, i.e. pixels whose brightest channel is above mid-grey
  (``max_c x_c > 0``). The sparsest real digit has 10, an empty real slot 0. (A first version thresholded the
  slot's mean ink at 0.1; a 1-step APEX student's faint background speckle, mean ink ≈ 0.1 with no pixel above
  mid-grey, then counted as digits in empty quadrants.)
- **colour**: the ink-weighted mean RGB of the slot (in [0, 1]), divided by its largest channel, nearest palette
  pattern (Euclidean): red (1,0,0), green, blue, white (1,1,1).
- **class**: :class:`apexctl.eval.toy.digits.DigitsJudge`'s classifier on the slot's grey crop ``max_c x_c`` (for a
  palette digit that is exactly the painted 8×8 digit).

A sample is correct iff the number of present slots, their positions, colours and classes satisfy its
:class:`~apexctl.data.scenes.SceneRule` (pairs: the left and right classes add to ten).

Metrics (names as in the digits judge, so :func:`apexctl.eval.toy.digits.format_table` prints both):

- ``alignment``: fraction correct, overall and per kind ("single": fully specified; "multi": several modes).
- ``multi_coverage``: for each multi prompt, each open attribute (class / colour / position values; pairs: the 9
  (left, right) pairs) scores the fraction of its allowed values that get at least half their fair share
  ``0.5 · n_prompt / n_values`` among the prompt's *correct* samples; a prompt's coverage is the mean over its open
  attributes, and ``multi_coverage`` the mean over multi prompts (marginals rather than joint combinations: with 100
  images a prompt like "a blue digit" has 40 joint modes, too few images per mode for a stable count).
- ``fd``: Fréchet distance in a fixed 52-d feature space, the concatenation over the 4 slots of the digits judge's
  10 class logits of the grey crop (its output layer on the 128 hidden ReLU features; low-dimensional, so 100
  images per prompt estimate the covariance and ``sqrtm`` stays cheap) and the slot's ink-weighted mean RGB (colour
  and presence), against real scenes
  painted with HELD-OUT digits: ``REF_PER_PROMPT`` per evaluation prompt, uniform over each prompt's allowed modes
  (so a model that matches the prompt distribution scores the real floor, not 0).
- ``fd_pca``: the same in a 32-d PCA of the raw pixels (fitted on the first ``PCA_FIT`` training scenes).
- ``diversity``: :mod:`apexctl.eval.toy.digits`'s diversity over the grey crops of all present slots, grouped by
  predicted class.
- ``mode_histogram``: per multi prompt, counts of each open attribute's values among correct samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.decomposition import PCA

from apexctl.data import scenes as S
from apexctl.data.digits import DigitsSplit
from apexctl.errors import BadInput
from apexctl.eval.toy.digits import (
    DigitsJudge,
    ImageLike,
    _diversity,
    _gaussian,
    _hidden,
    alignment_by_kind,
    check_score_args,
    format_table,
    frechet_distance,
)

PRESENT_PIXELS = 5  # half the sparsest real digit's ink pixels
PCA_DIM = 32
PCA_FIT = 1000
REF_PER_PROMPT = 100
REAL_FD_PER_PROMPT = 100
SLOTS: tuple[str, ...] = S.POSITION_NAMES
_PATTERNS = np.array([S.PALETTE[c] for c in S.COLOURS])

__all__ = ["SceneJudge", "format_table", "real_reference"]


def _pixels(images: ImageLike) -> np.ndarray:
    """``[N, 3, 16, 16]`` in [−1, 1] → float64, clamped (what a PNG shows)."""
    x = images.detach().to("cpu", torch.float64).numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if x.ndim != 4 or x.shape[1:] != (3, S.SIZE, S.SIZE):
        raise BadInput(f"scenes images must be [N, 3, {S.SIZE}, {S.SIZE}], got shape {tuple(x.shape)}")
    return np.clip(x.astype(np.float64, copy=False), -1.0, 1.0)


def _crops(x: np.ndarray) -> np.ndarray:
    """``[N, 3, 16, 16]`` → ``[N, 4 slots, 3, 8, 8]`` in ``SLOTS`` order."""
    return np.stack([x[:, :, r : r + 8, c : c + 8] for r, c in S.POSITIONS.values()], axis=1)


@dataclass
class Detections:
    """Per image and slot: ``present`` bool ``[N, 4]``, ``colour`` index ``[N, 4]``, ``label`` ``[N, 4]``,
    ``grey`` crops ``[N, 4, 64]`` and ink-weighted mean RGB ``rgb`` ``[N, 4, 3]``."""

    present: np.ndarray
    colour: np.ndarray
    label: np.ndarray
    grey: np.ndarray
    rgb: np.ndarray

    def digits(self, i: int) -> list[S.Digit]:
        return [
            S.Digit(int(self.label[i, s]), S.COLOURS[int(self.colour[i, s])], SLOTS[s])
            for s in range(len(SLOTS))
            if self.present[i, s]
        ]


@dataclass
class SceneJudge:
    """Slot detector + the digits classifier, with the real held-out reference statistics of the metrics."""

    digits: DigitsJudge
    pca: PCA
    ref: tuple[np.ndarray, np.ndarray] = field(repr=False)
    ref_pca: tuple[np.ndarray, np.ndarray] = field(repr=False)

    @classmethod
    def fit(cls, split: DigitsSplit, prompts: Sequence[S.ScenePrompt] | None = None, seed: int = 0) -> SceneJudge:
        """Fit the digits classifier on ``split``'s TRAIN digits and the PCA on the training scenes; the reference is
        ``REF_PER_PROMPT`` real scenes of TEST digits per prompt of ``prompts`` (default: the evaluation prompts)."""
        digits = DigitsJudge.fit(split, seed=seed)
        train = S.train_scenes(split, seed=seed)
        pixels = train.images[:PCA_FIT].reshape(min(PCA_FIT, len(train.images)), -1).numpy()
        pca = PCA(n_components=PCA_DIM, random_state=seed).fit(pixels)
        real = _prompt_scenes(split.test_images, split.test_labels, prompts, REF_PER_PROMPT, seed + 1)
        judge = cls(digits, pca, ref=(np.zeros(1), np.zeros((1, 1))), ref_pca=(np.zeros(1), np.zeros((1, 1))))
        x = _pixels(real)
        judge.ref = _gaussian(judge._features(judge.detect(x)))
        judge.ref_pca = _gaussian(pca.transform(x.reshape(len(x), -1)))
        return judge

    @property
    def test_accuracy(self) -> float:
        """The digits classifier's held-out accuracy."""
        return self.digits.judge_test_accuracy

    def detect(self, images: ImageLike) -> Detections:
        x = _crops(_pixels(images))  # [N, 4, 3, 8, 8]
        n = len(x)
        ink = (x + 1.0) / 2.0  # [0, 1]
        grey = x.max(axis=2).reshape(n, len(SLOTS), 64)  # brightest channel, [-1, 1]
        weight = ink.max(axis=2, keepdims=True)  # [N, 4, 1, 8, 8]
        ink_pixels = (grey > 0.0).sum(axis=-1)
        rgb = (ink * weight).sum(axis=(-1, -2)) / np.maximum(weight.sum(axis=(-1, -2)), 1e-9)  # [N, 4, 3]
        norm = rgb / np.maximum(rgb.max(axis=-1, keepdims=True), 1e-9)
        colour = ((norm[:, :, None, :] - _PATTERNS[None, None]) ** 2).sum(-1).argmin(-1)
        label = self.digits.clf.predict(grey.reshape(-1, 64)).reshape(n, len(SLOTS)).astype(np.int64)
        return Detections(ink_pixels >= PRESENT_PIXELS, colour, label, grey, rgb)

    def _features(self, det: Detections) -> np.ndarray:
        n = len(det.grey)
        clf = self.digits.clf
        logits = _hidden(clf, det.grey.reshape(-1, 64)) @ clf.coefs_[1] + clf.intercepts_[1]
        return np.concatenate([logits.reshape(n, -1), det.rgb.reshape(n, -1)], axis=1)

    def correct(self, images: ImageLike, allowed: Sequence[S.SceneRule]) -> np.ndarray:
        det = self.detect(images)
        return np.array([rule.satisfied_by(det.digits(i)) for i, rule in enumerate(allowed)], dtype=bool)

    def fd(self, images: ImageLike) -> float:
        """Fréchet distance to the real held-out reference in the slot feature space."""
        return frechet_distance(*_gaussian(self._features(self.detect(images))), *self.ref)

    def fd_pca(self, images: ImageLike) -> float:
        x = _pixels(images)
        return frechet_distance(*_gaussian(self.pca.transform(x.reshape(len(x), -1))), *self.ref_pca)

    def score(
        self,
        images: ImageLike,
        allowed: Sequence[S.SceneRule],
        kinds: Sequence[str],
        prompts: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """All metrics for N images (module docstring); ``allowed[i]`` is image i's rule. Same shape as
        :meth:`apexctl.eval.toy.digits.DigitsJudge.score`. Multi prompts are keyed by ``prompts[i]`` when given, else by
        the ``MULTI_PROMPTS`` name of the rule."""
        x = _pixels(images)
        n = len(x)
        check_score_args(n, allowed, kinds, prompts, "rules")
        det = self.detect(x)
        found = [det.digits(i) for i in range(n)]
        ok = np.array([rule.satisfied_by(ds) for rule, ds in zip(allowed, found, strict=True)], dtype=bool)
        kinds_arr = np.asarray(kinds)
        alignment = alignment_by_kind(ok, kinds_arr)

        names = {v: k for k, v in S.MULTI_PROMPTS.items()}
        hist: dict[str, dict[str, dict[str, int]]] = {}
        totals: dict[str, int] = {}
        for i in np.flatnonzero(kinds_arr == "multi"):
            rule = allowed[i]
            key = prompts[i] if prompts is not None else names.get(rule, repr(rule))
            h = hist.setdefault(key, {a: {str(v): 0 for v in vals} for a, vals in rule.modes().items()})
            totals[key] = totals.get(key, 0) + 1
            if ok[i]:
                ds = found[i]
                values = {
                    "class": ds[0].label,
                    "colour": ds[0].colour,
                    "position": ds[0].position,
                    "pair": (ds[0].label, ds[-1].label),
                }
                for a in h:
                    h[a][str(values[a])] += 1
        coverage = [
            np.mean([np.mean([c >= 0.5 * totals[key] / len(counts) for c in counts.values()]) for counts in h.values()])
            for key, h in hist.items()
            if h
        ]
        present = det.present.reshape(-1)
        grey, labels = det.grey.reshape(-1, 64)[present], det.label.reshape(-1)[present]
        return {
            "n": n,
            "alignment": alignment,
            "fd": frechet_distance(*_gaussian(self._features(det)), *self.ref),
            "fd_pca": self.fd_pca(x),
            "diversity": _diversity(grey, labels) if len(grey) else None,
            "multi_coverage": float(np.mean(coverage)) if coverage else None,
            "mode_histogram": hist,
        }


def _prompt_scenes(
    images: torch.Tensor, labels: torch.Tensor, prompts: Sequence[S.ScenePrompt] | None, per_prompt: int, seed: int
) -> torch.Tensor:
    prompts = S.eval_prompts() if prompts is None else prompts
    return torch.cat(
        [
            S.scenes_for_rule(images, labels, p.allowed, per_prompt, seed + 1000 * k).images
            for k, p in enumerate(prompts)
        ]
    )


def real_reference(
    judge: SceneJudge,
    split: DigitsSplit,
    prompts: Sequence[S.ScenePrompt] | None = None,
    per_prompt: int = REAL_FD_PER_PROMPT,
    seed: int = 0,
) -> dict[str, Any]:
    """The "real data" row: ``per_prompt`` real scenes of HELD-OUT digits per prompt, scored as if generated (its
    alignment is the detector's accuracy). ``fd`` / ``fd_pca``: the same prompts painted with TRAIN digits against
    the held-out reference (held-out against itself would be 0, not a floor)."""
    prompts = S.eval_prompts() if prompts is None else prompts
    real = _prompt_scenes(split.test_images, split.test_labels, prompts, per_prompt, seed + 7)
    rows = [p for p in prompts for _ in range(per_prompt)]
    row = judge.score(real, [p.allowed for p in rows], [p.kind for p in rows], [p.prompt for p in rows])
    train = _prompt_scenes(split.train_images, split.train_labels, prompts, per_prompt, seed + 11)
    row.update(fd=judge.fd(train), fd_pca=judge.fd_pca(train))
    return row
