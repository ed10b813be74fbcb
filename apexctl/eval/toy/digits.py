"""The digits scorer (docs/design.md §8): a fixed, model-agnostic protocol for 8×8 digit images in [−1, 1].

Judge: sklearn ``MLPClassifier(hidden_layer_sizes=(128,))`` fitted on the real TRAIN split only, on flattened 64-d
pixels in [−1, 1]. Metrics on N generated images with per-image allowed classes and kind ("single" | "multi"):

- ``alignment``: fraction of images whose predicted class ∈ allowed, per kind and overall (None if a kind is absent).
- ``fd``: Fréchet distance between the judge's 128-d hidden ReLU features ``h = max(0, x W1 + b1)`` of all N images
  and of the real held-out TEST images: ``|μ1 − μ2|² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½)``. A few ReLU units are dead on
  digits, so the covariances are singular; we add ``FD_EPS·I`` to both and keep the real part of ``sqrtm``.
- ``fd_pca``: the same in a 20-d PCA of the train pixels (secondary; the space of notes/toy-experiment.md's
  ``fd_pca``, whose numbers docs/design.md §5 quotes).
- ``diversity``: mean over predicted classes with ≥ 2 images of the mean per-pixel std (ddof 0) within that class,
  in the [−1, 1] pixel scale. This is the toy study's ``div`` (real held-out digits: 0.327 there; 0.328 here by
  true class, 0.326 by predicted class; on a [0, 1] scale it would be half). A collapsed model (one image per class) scores 0.
- ``class_histogram``: for each multi prompt, counts of predicted classes 0..9 (mode coverage made visible).
- ``multi_coverage``: mean over multi prompts of the fraction of allowed classes that get at least half their fair
  share, ``count ≥ 0.5 · n_prompt / |allowed|``. Alignment alone cannot see collapse: the blurred mean of the even
  digits is classified as a 6, which *is* even.
- ``seed_diversity`` (and ``seed_diversity_per_prompt``, prompt → value): for each single prompt, the mean over
  pairs i < j of its images of the RMS pixel distance ``sqrt(mean_p (a_i,p − a_j,p)²)``, on the judge's 8×8 grey
  pixels mapped to [0, 1] (``(x + 1) / 2``); overall: the mean over single prompts. One-step seed collapse (the same
  image for every seed of a prompt) scores 0; it is invisible to ``diversity``, which pools a class's images across
  prompts. Needs ``prompts``.
- ``fd_single`` (and ``fd_single_per_prompt``): for each single prompt of class k, the Fréchet distance between its
  images and the real held-out TEST images of class k, in the 20-d PCA space of ``fd_pca``; overall: the mean over
  single prompts. Why PCA-20 and not the 128-d hidden features: the default split holds only 39–40 test images per
  class, so a 128-d class covariance has rank ≤ 39 and most of it would be ``FD_EPS``: the distance then measures
  the sample size as much as the images (real train draws of 20 / 40 / 100 images per class: 12.4 / 7.9 / 6.0 in
  128-d, 2.5 / 1.8 / 1.4 in PCA-20); 20 dimensions keep the class covariance full rank. Needs ``prompts``; a prompt
  (or class) with fewer than 2 images gets None.

Images are clamped to [−1, 1] per channel (what a saved PNG shows), turned to grey by the channel mean, and, if
larger than 8×8 (a recipe with ``data.resolution`` > 8), area-averaged to 8×8.
Nothing is cached on disk; fitting takes about a second.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.linalg
import scipy.spatial.distance
import torch
from rich.table import Table
from sklearn.decomposition import PCA
from sklearn.neural_network import MLPClassifier

from apexctl.data.digits import EVAL_TEMPLATE, MULTI_PROMPTS, DigitsSplit, multi_prompts_for, single_prompt
from apexctl.errors import BadInput

FD_EPS = 1e-6  # added to both covariances' diagonal: dead ReLU units make them singular
MLP_MAX_ITER = 500  # the judge converges in ~180 Adam epochs on the default split
PCA_DIM = 20
REAL_FD_SUBSET = 1000  # real "generated" set for the reference FD: as many train images as a typical sample run
REAL_FD_PER_CLASS = 100  # real "generated" set per class for the reference fd_single: a typical images-per-prompt
KINDS = ("single", "multi")

ImageLike = torch.Tensor | np.ndarray


def _flatten(images: ImageLike) -> np.ndarray:
    """``[N, 1|3, S, S]`` (or ``[N, 64]``) in [−1, 1] → float64 ``[N, 64]``: clamped, grey, area-resized to 8×8."""
    x = images.detach().to("cpu", torch.float64).numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    x = x.astype(np.float64, copy=False)
    if x.ndim == 4:
        if x.shape[1] not in (1, 3) or x.shape[2] != x.shape[3] or x.shape[2] < 8:
            raise BadInput(f"digits images must be [N, 1|3, S, S] with S >= 8, got shape {tuple(x.shape)}")
        x = np.clip(x, -1.0, 1.0).mean(axis=1, keepdims=True)  # clamp per channel first, as a PNG would
        if x.shape[2] != 8:  # a recipe may train at a larger resolution: area-average back to the judge's 8×8
            x = torch.nn.functional.interpolate(torch.from_numpy(x), size=(8, 8), mode="area").numpy()
        x = x.reshape(len(x), 64)
    elif x.ndim != 2 or x.shape[1] != 64:
        raise BadInput(f"digits images must be [N, 1|3, S, S] or [N, 64], got shape {tuple(x.shape)}")
    return np.clip(x, -1.0, 1.0)


def _gaussian(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (ddof 1) of ``[N, D]`` features, with ``FD_EPS·I`` added to the covariance."""
    if len(features) < 2:
        raise BadInput(f"Fréchet distance needs at least 2 images, got {len(features)}")
    cov = np.cov(features, rowvar=False) + FD_EPS * np.eye(features.shape[1])
    return features.mean(axis=0), cov


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """``|μ1 − μ2|² + tr(Σ1) + tr(Σ2) − 2 tr((Σ1 Σ2)^½)``; real part of scipy's ``sqrtm`` (imaginary parts are noise)."""
    covmean = np.real(scipy.linalg.sqrtm(cov1 @ cov2))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean))


def _diversity(x: np.ndarray, pred: np.ndarray) -> float | None:
    """Mean over predicted classes with ≥ 2 images of the mean per-pixel std (ddof 0) within the class."""
    stds = [x[pred == c].std(axis=0).mean() for c in range(10) if int((pred == c).sum()) >= 2]
    return float(np.mean(stds)) if stds else None


def _hidden(clf: MLPClassifier, x: np.ndarray) -> np.ndarray:
    """The MLP's hidden ReLU activations ``max(0, x W1 + b1)`` for flat pixels ``x`` ``[N, 64]``."""
    return np.maximum(x @ clf.coefs_[0] + clf.intercepts_[0], 0.0)


def pairwise_rms(x: np.ndarray) -> float | None:
    """Mean over pairs i < j of rows ``x`` ``[n, D]`` of ``sqrt(mean_d (x_i − x_j)²)``; None when n < 2.

    ``pdist`` is the vectorised pairwise Euclidean distance (C loop, exact 0 for equal rows); RMS = L2 / sqrt(D)."""
    if len(x) < 2:
        return None
    return float(scipy.spatial.distance.pdist(x, "euclidean").mean() / np.sqrt(x.shape[1]))


def single_groups(kinds: Sequence[str], prompts: Sequence[str] | None) -> dict[str, np.ndarray] | None:
    """Single prompt → indices of its images, in first-seen order; None without ``prompts`` or single images."""
    if prompts is None:
        return None
    groups: dict[str, list[int]] = {}
    for i, (k, p) in enumerate(zip(kinds, prompts, strict=True)):
        if k == "single":
            groups.setdefault(p, []).append(i)
    return {p: np.asarray(idx) for p, idx in groups.items()} or None


def per_prompt_mean(
    groups: Mapping[str, np.ndarray] | None, value: Callable[[str, np.ndarray], float | None]
) -> tuple[float | None, dict[str, float | None] | None]:
    """``value(prompt, indices)`` per group and their mean over groups with a value (None if there are none)."""
    if groups is None:
        return None, None
    per = {p: value(p, idx) for p, idx in groups.items()}
    return mean_known(per), per


def mean_known(per: Mapping[str, float | None]) -> float | None:
    """The mean of the values that are not None (None if there are none)."""
    known = [v for v in per.values() if v is not None]
    return float(np.mean(known)) if known else None


def seed_diversity(
    pixels01: np.ndarray, groups: Mapping[str, np.ndarray] | None
) -> tuple[float | None, dict[str, float | None] | None]:
    """``pairwise_rms`` of each group's rows of ``pixels01`` ``[N, D]`` (in [0, 1]), and the mean over groups."""
    return per_prompt_mean(groups, lambda _, idx: pairwise_rms(pixels01[idx]))


def group_value(allowed: Sequence, idx: np.ndarray, prompt: str) -> Any:
    """The ``allowed`` entry shared by all images ``idx`` of one prompt (BadInput if they disagree)."""
    first = allowed[int(idx[0])]
    if any(allowed[int(i)] != first for i in idx[1:]):
        raise BadInput(f"score: the images of prompt {prompt!r} have different allowed sets")
    return first


def check_score_args(n: int, allowed: Sequence, kinds: Sequence[str], prompts: Sequence[str] | None, what: str) -> None:
    """BadInput unless there is one ``allowed`` entry, kind (and prompt, if given) per image and every kind is known."""
    if len(allowed) != n or len(kinds) != n or (prompts is not None and len(prompts) != n):
        raise BadInput(
            f"score: {n} images but {len(allowed)} {what}, {len(kinds)} kinds"
            + ("" if prompts is None else f", {len(prompts)} prompts")
        )
    bad = sorted({k for k in kinds if k not in KINDS})
    if bad:
        raise BadInput(f"score: kinds must be one of {KINDS}, got {bad}")


def alignment_by_kind(ok: np.ndarray, kinds: np.ndarray) -> dict[str, float | None]:
    """Fraction of correct images per kind (None when a kind is absent) and ``overall``."""
    alignment: dict[str, float | None] = {
        k: (float(ok[kinds == k].mean()) if (kinds == k).any() else None) for k in KINDS
    }
    alignment["overall"] = float(ok.mean()) if len(ok) else None
    return alignment


@dataclass
class DigitsJudge:
    """A digit classifier fitted on real train images, with the real test statistics the metrics compare to."""

    clf: MLPClassifier
    pca: PCA
    judge_test_accuracy: float
    test_x: np.ndarray = field(repr=False)  # [N_test, 64] real held-out pixels
    ref_mlp: tuple[np.ndarray, np.ndarray] = field(repr=False)  # (μ, Σ + eps·I) of the test features
    ref_pca: tuple[np.ndarray, np.ndarray] = field(repr=False)  # the same in PCA space
    # per class k: (μ, Σ + eps·I) of the class-k test images in PCA space; None when the class has < 2 images
    ref_pca_class: dict[int, tuple[np.ndarray, np.ndarray] | None] = field(repr=False)

    @classmethod
    def fit(cls, split: DigitsSplit, seed: int = 0) -> DigitsJudge:
        """Fit the MLP (and the PCA) on ``split``'s TRAIN images only; accuracy is measured on its TEST images."""
        x_train, y_train = _flatten(split.train_images), split.train_labels.cpu().numpy()
        x_test, y_test = _flatten(split.test_images), split.test_labels.cpu().numpy()
        clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=MLP_MAX_ITER, random_state=seed).fit(x_train, y_train)
        pca = PCA(n_components=PCA_DIM, random_state=seed).fit(x_train)
        z_test = pca.transform(x_test)
        by_class = {k: z_test[y_test == k] for k in range(10)}
        return cls(
            clf=clf,
            pca=pca,
            judge_test_accuracy=float(clf.score(x_test, y_test)),
            test_x=x_test,
            ref_mlp=_gaussian(_hidden(clf, x_test)),
            ref_pca=_gaussian(z_test),
            ref_pca_class={k: (_gaussian(z) if len(z) >= 2 else None) for k, z in by_class.items()},
        )

    @property
    def test_accuracy(self) -> float:
        """Alias of ``judge_test_accuracy``."""
        return self.judge_test_accuracy

    def features(self, images: ImageLike) -> np.ndarray:
        """The hidden ReLU layer, ``max(0, x W1 + b1)``: float64 ``[N, 128]``."""
        return _hidden(self.clf, _flatten(images))

    def predict(self, images: ImageLike) -> np.ndarray:
        """Predicted digit class per image, int64 ``[N]``."""
        return self.clf.predict(_flatten(images)).astype(np.int64)

    def fd(self, images: ImageLike) -> float:
        """Fréchet distance of ``images`` to the real TEST images in the judge's feature space."""
        return frechet_distance(*_gaussian(self.features(images)), *self.ref_mlp)

    def fd_pca(self, images: ImageLike) -> float:
        """Fréchet distance of ``images`` to the real TEST images in the train-fitted PCA-20 pixel space."""
        return frechet_distance(*_gaussian(self.pca.transform(_flatten(images))), *self.ref_pca)

    def fd_class(self, images: ImageLike, k: int) -> float | None:
        """Fréchet distance of ``images`` to the real TEST images of class ``k`` in the PCA-20 space (``fd_single``);
        None when either side has fewer than 2 images."""
        x = _flatten(images)
        ref = self.ref_pca_class.get(int(k))
        if ref is None or len(x) < 2:
            return None
        return frechet_distance(*_gaussian(self.pca.transform(x)), *ref)

    def score(
        self,
        images: ImageLike,
        allowed: Sequence[frozenset[int]],
        kinds: Sequence[str],
        prompts: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """All metrics for N images (see the module docstring); plain Python types, JSON-serialisable.

        ``allowed[i]`` / ``kinds[i]`` (/ ``prompts[i]``) belong to image i. ``class_histogram`` is keyed by prompt
        when ``prompts`` is given, else by the multi prompt whose set equals ``allowed[i]`` (or the set written as
        "{0,2,...}"). ``seed_diversity`` / ``fd_single`` group the single images by ``prompts[i]``: None without it.
        """
        x = _flatten(images)
        n = len(x)
        check_score_args(n, allowed, kinds, prompts, "allowed sets")
        pred = self.predict(x)
        ok = np.array([int(p) in a for p, a in zip(pred, allowed, strict=True)], dtype=bool)
        kinds_arr = np.asarray(kinds)
        alignment = alignment_by_kind(ok, kinds_arr)

        names = {v: k for k, v in MULTI_PROMPTS.items()}
        hist: dict[str, list[int]] = {}
        sets: dict[str, frozenset[int]] = {}
        for i in np.flatnonzero(kinds_arr == "multi"):
            a = frozenset(allowed[i])
            key = prompts[i] if prompts is not None else names.get(a, "{" + ",".join(map(str, sorted(a))) + "}")
            hist.setdefault(key, [0] * 10)[int(pred[i])] += 1
            sets[key] = a
        order = [p for p in MULTI_PROMPTS if p in hist] + [p for p in hist if p not in MULTI_PROMPTS]
        hist = {p: hist[p] for p in order}  # known multi prompts in their canonical order
        coverage = [
            np.mean([counts[c] >= 0.5 * sum(counts) / len(sets[key]) for c in sets[key]])
            for key, counts in hist.items()
        ]
        groups = single_groups(kinds, prompts)
        seed_div, seed_div_per = seed_diversity((x + 1.0) / 2.0, groups)
        fd_single, fd_single_per = per_prompt_mean(groups, lambda p, idx: self._fd_prompt(x[idx], allowed, idx, p))
        return {
            "n": n,
            "alignment": alignment,
            "fd": self.fd(x),
            "fd_pca": self.fd_pca(x),
            "diversity": _diversity(x, pred),
            "multi_coverage": float(np.mean(coverage)) if coverage else None,
            "class_histogram": hist,
            "seed_diversity": seed_div,
            "seed_diversity_per_prompt": seed_div_per,
            "fd_single": fd_single,
            "fd_single_per_prompt": fd_single_per,
        }

    def _fd_prompt(
        self, x: np.ndarray, allowed: Sequence[frozenset[int]], idx: np.ndarray, prompt: str
    ) -> float | None:
        """``fd_class`` of one single prompt's images ``x``; None unless its allowed set is one class."""
        a = group_value(allowed, idx, prompt)
        return self.fd_class(x, next(iter(a))) if len(a) == 1 else None


def real_reference(judge: DigitsJudge, split: DigitsSplit, seed: int = 0) -> dict[str, Any]:
    """The "real data" row: real TEST images scored as if generated, with the metrics' real-data floor.

    Alignment: every test image under its single eval prompt (= judge test accuracy) and under each multi prompt
    containing its label. ``fd`` / ``fd_pca``: ``REAL_FD_SUBSET`` train images (seeded draw) against the test
    images (test against itself would be 0, not a floor). ``diversity``: of the test images. ``seed_diversity``:
    of each class's test images under its single prompt. ``fd_single``: per class, ``REAL_FD_PER_CLASS`` train
    images of the class (seeded draw) against its test images.
    """
    labels = split.test_labels.cpu().numpy().tolist()
    # (image index, prompt, allowed set, kind) for every test image under each eval prompt it satisfies
    cases = [(i, single_prompt(y, EVAL_TEMPLATE), frozenset({y}), "single") for i, y in enumerate(labels)]
    cases += [(i, p, MULTI_PROMPTS[p], "multi") for i, y in enumerate(labels) for p in multi_prompts_for(y)]
    idx, prompts, allowed, kinds = (list(col) for col in zip(*cases, strict=True))
    row = judge.score(split.test_images[idx], allowed, kinds, prompts)
    rng = np.random.default_rng(seed)
    sub = rng.choice(len(split.train_images), size=min(REAL_FD_SUBSET, len(split.train_images)), replace=False)
    train_sub = split.train_images[np.sort(sub)]
    train_y = split.train_labels.cpu().numpy()
    per_class = {}
    for k in sorted(set(labels)):
        pool = np.flatnonzero(train_y == k)
        pick = np.sort(rng.choice(pool, size=min(REAL_FD_PER_CLASS, len(pool)), replace=False))
        per_class[single_prompt(k, EVAL_TEMPLATE)] = judge.fd_class(split.train_images[pick], k)
    seed_div = row["seed_diversity_per_prompt"] or {}
    row["seed_diversity_per_prompt"] = {p: seed_div[p] for p in per_class if p in seed_div}  # class order
    row.update(
        n=len(labels),
        fd=judge.fd(train_sub),
        fd_pca=judge.fd_pca(train_sub),
        diversity=_diversity(judge.test_x, judge.predict(judge.test_x)),
        fd_single=mean_known(per_class),
        fd_single_per_prompt=per_class,
    )
    return row


#: the console table's columns, headers on two lines so that the table fits the 120 columns of a log
TABLE_COLUMNS = (
    "align\nsingle ↑",
    "align\nmulti ↑",
    "cover\nmulti ↑",
    "FD ↓",
    "diversity\n≈real",
    "seed div\n≈real",
    "FD\nsingle ↓",
    "n",
)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def format_table(rows: Mapping[str, Mapping[str, Any]], title: str | None = None) -> Table:
    """A rich table, one row per entry (e.g. "real data", "teacher 50 steps", "apex 1 step") of ``score`` dicts.

    Columns: align single ↑, align multi ↑, cover multi ↑, FD ↓, diversity (≈ real is best), seed diversity of the
    single prompts (≈ real is best), FD of the single prompts to their class ↓, n.
    """
    table = Table(title=title)
    table.add_column("row", no_wrap=True)
    for name in TABLE_COLUMNS:
        table.add_column(name, justify="right", no_wrap=True)
    for name, r in rows.items():
        align = r.get("alignment", {})
        table.add_row(
            name,
            _fmt(align.get("single")),
            _fmt(align.get("multi")),
            _fmt(r.get("multi_coverage")),
            _fmt(r.get("fd"), 2),
            _fmt(r.get("diversity")),
            _fmt(r.get("seed_diversity")),
            _fmt(r.get("fd_single"), 2),
            str(r.get("n", "")),
        )
    return table
