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
- ``seed_diversity`` (and ``seed_diversity_per_prompt``): for each single prompt, the mean over pairs i < j of its
  images of the RMS distance over all 3·16·16 values in [0, 1] (clamped, ``(x + 1) / 2``), as in
  :mod:`apexctl.eval.toy.digits`; overall: the mean over single prompts. One digit fills a quarter of the canvas
  (a coloured one: one channel of it), so real values are about a third of the digits setting's.
- ``fd_single`` (and ``fd_single_per_prompt``): for each fully specified single prompt (one class, colour and
  position), the Fréchet distance in the ``fd`` feature space between its images and every HELD-OUT digit of its
  class painted once in its colour at its position (≈ 40 at the default split). Such a real set varies in at most
  13 of the 52 features (the occupied slot's 10 logits and 3 RGB means; empty slots are constant), fewer than its
  images, so its covariance is estimated where it is not ``FD_EPS``; a generated set's ink in empty slots counts
  against it through its own variance and mean there. Other single rules get None.

``seed_diversity`` / ``fd_single`` group the single images by ``prompts[i]`` and are None without it. In the
real-data row, ``seed_diversity`` is that of the per-prompt sets above (distinct held-out digits: the row's own
images are drawn with replacement, so ~1/40 of their pairs are identical), and ``fd_single`` the prompts painted
with TRAIN digits against them.
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
    group_value,
    mean_known,
    pairwise_rms,
    per_prompt_mean,
    seed_diversity,
    single_groups,
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


def _unit(x: np.ndarray) -> np.ndarray:
    """Clamped pixels ``[N, 3, 16, 16]`` in [−1, 1] → ``[N, 768]`` in [0, 1] (what ``seed_diversity`` compares)."""
    return ((x + 1.0) / 2.0).reshape(len(x), -1)


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
    test_images: torch.Tensor = field(repr=False)  # held-out digit inks [N, 1, 8, 8]: the per-prompt real sets
    test_labels: torch.Tensor = field(repr=False)
    _single_ref: dict[S.SceneRule, tuple[np.ndarray, np.ndarray] | None] = field(default_factory=dict, repr=False)

    @classmethod
    def fit(cls, split: DigitsSplit, prompts: Sequence[S.ScenePrompt] | None = None, seed: int = 0) -> SceneJudge:
        """Fit the digits classifier on ``split``'s TRAIN digits and the PCA on the training scenes; the reference is
        ``REF_PER_PROMPT`` real scenes of TEST digits per prompt of ``prompts`` (default: the evaluation prompts)."""
        digits = DigitsJudge.fit(split, seed=seed)
        train = S.train_scenes(split, seed=seed)
        pixels = train.images[:PCA_FIT].reshape(min(PCA_FIT, len(train.images)), -1).numpy()
        pca = PCA(n_components=PCA_DIM, random_state=seed).fit(pixels)
        real = _prompt_scenes(split.test_images, split.test_labels, prompts, REF_PER_PROMPT, seed + 1)
        empty = (np.zeros(1), np.zeros((1, 1)))
        judge = cls(digits, pca, empty, empty, test_images=split.test_images, test_labels=split.test_labels)
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

    def single_reference(self, rule: S.SceneRule) -> torch.Tensor | None:
        """Every held-out digit of ``rule``'s class painted once in its colour at its position ``[n, 3, 16, 16]``;
        None unless ``rule`` is fully specified (one digit, one class, colour and position)."""
        if not _fully_specified(rule):
            return None
        d = S.Digit(next(iter(rule.classes)), next(iter(rule.colours)), next(iter(rule.positions)))
        inks = self.test_images[self.test_labels == d.label]
        return torch.stack([S.paint([ink], [d]) for ink in inks]) if len(inks) else None

    def _single_gaussian(self, rule: S.SceneRule) -> tuple[np.ndarray, np.ndarray] | None:
        if rule not in self._single_ref:
            real = self.single_reference(rule)
            ok = real is not None and len(real) >= 2
            self._single_ref[rule] = _gaussian(self._features(self.detect(real))) if ok else None
        return self._single_ref[rule]

    def _fd_single(self, features: np.ndarray, rule: S.SceneRule) -> float | None:
        ref = self._single_gaussian(rule)
        return None if ref is None or len(features) < 2 else frechet_distance(*_gaussian(features), *ref)

    def fd_single(self, images: ImageLike, rule: S.SceneRule) -> float | None:
        """Fréchet distance of ``images`` (all answers to one fully specified ``rule``) to its real set
        (:meth:`single_reference`) in the ``fd`` feature space; None if either has fewer than 2 images."""
        return self._fd_single(self._features(self.detect(images)), rule)

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
        features = self._features(det)
        groups = single_groups(kinds, prompts)
        seed_div, seed_div_per = seed_diversity(_unit(x), groups)
        fd_single, fd_single_per = per_prompt_mean(
            groups, lambda p, idx: self._fd_single(features[idx], group_value(allowed, idx, p))
        )
        return {
            "n": n,
            "alignment": alignment,
            "fd": frechet_distance(*_gaussian(features), *self.ref),
            "fd_pca": self.fd_pca(x),
            "diversity": _diversity(grey, labels) if len(grey) else None,
            "multi_coverage": float(np.mean(coverage)) if coverage else None,
            "mode_histogram": hist,
            "seed_diversity": seed_div,
            "seed_diversity_per_prompt": seed_div_per,
            "fd_single": fd_single,
            "fd_single_per_prompt": fd_single_per,
        }


def _fully_specified(rule: S.SceneRule) -> bool:
    return rule.count == 1 and len(rule.classes) == len(rule.colours) == len(rule.positions) == 1


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
    the held-out reference (held-out against itself would be 0, not a floor); ``fd_single`` likewise per single
    prompt, and ``seed_diversity`` that of each single prompt's real set (module docstring)."""
    prompts = S.eval_prompts() if prompts is None else prompts
    real = _prompt_scenes(split.test_images, split.test_labels, prompts, per_prompt, seed + 7)
    rows = [p for p in prompts for _ in range(per_prompt)]
    row = judge.score(real, [p.allowed for p in rows], [p.kind for p in rows], [p.prompt for p in rows])
    train = _prompt_scenes(split.train_images, split.train_labels, prompts, per_prompt, seed + 11)
    row.update(fd=judge.fd(train), fd_pca=judge.fd_pca(train))
    fd_single, seed_div = {}, {}
    for k, p in enumerate(prompts):
        if p.kind == "single":
            real_p = judge.single_reference(p.allowed)
            seed_div[p.prompt] = None if real_p is None else pairwise_rms(_unit(_pixels(real_p)))
            fd_single[p.prompt] = judge.fd_single(train[k * per_prompt : (k + 1) * per_prompt], p.allowed)
    for key, per in (("seed_diversity", seed_div), ("fd_single", fd_single)):
        row[key], row[key + "_per_prompt"] = (mean_known(per), per) if per else (None, None)
    return row
