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

Images are clamped to [−1, 1] per channel (what a saved PNG shows), turned to grey by the channel mean, and, if
larger than 8×8 (a recipe with ``data.resolution`` > 8), area-averaged to 8×8.
Nothing is cached on disk; fitting takes about a second.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.linalg
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

    @classmethod
    def fit(cls, split: DigitsSplit, seed: int = 0) -> DigitsJudge:
        """Fit the MLP (and the PCA) on ``split``'s TRAIN images only; accuracy is measured on its TEST images."""
        x_train, y_train = _flatten(split.train_images), split.train_labels.cpu().numpy()
        x_test, y_test = _flatten(split.test_images), split.test_labels.cpu().numpy()
        clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=MLP_MAX_ITER, random_state=seed).fit(x_train, y_train)
        pca = PCA(n_components=PCA_DIM, random_state=seed).fit(x_train)
        return cls(
            clf=clf,
            pca=pca,
            judge_test_accuracy=float(clf.score(x_test, y_test)),
            test_x=x_test,
            ref_mlp=_gaussian(_hidden(clf, x_test)),
            ref_pca=_gaussian(pca.transform(x_test)),
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

    def score(
        self,
        images: ImageLike,
        allowed: Sequence[frozenset[int]],
        kinds: Sequence[str],
        prompts: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """All metrics for N images (see the module docstring); plain Python types, JSON-serialisable.

        ``allowed[i]`` / ``kinds[i]`` belong to image i. ``class_histogram`` is keyed by prompt when ``prompts``
        is given, else by the multi prompt whose set equals ``allowed[i]`` (or the set written as "{0,2,...}").
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
        return {
            "n": n,
            "alignment": alignment,
            "fd": self.fd(x),
            "fd_pca": self.fd_pca(x),
            "diversity": _diversity(x, pred),
            "multi_coverage": float(np.mean(coverage)) if coverage else None,
            "class_histogram": hist,
        }


def real_reference(judge: DigitsJudge, split: DigitsSplit, seed: int = 0) -> dict[str, Any]:
    """The "real data" row: real TEST images scored as if generated, with the metrics' real-data floor.

    Alignment: every test image under its single eval prompt (= judge test accuracy) and under each multi prompt
    containing its label. ``fd`` / ``fd_pca``: ``REAL_FD_SUBSET`` train images (seeded draw) against the test
    images (test against itself would be 0, not a floor). ``diversity``: of the test images.
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
    row.update(
        n=len(labels),
        fd=judge.fd(train_sub),
        fd_pca=judge.fd_pca(train_sub),
        diversity=_diversity(judge.test_x, judge.predict(judge.test_x)),
    )
    return row


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def format_table(rows: Mapping[str, Mapping[str, Any]], title: str | None = None) -> Table:
    """A rich table, one row per entry (e.g. "real data", "teacher 50 steps", "apex 1 step") of ``score`` dicts.

    Columns: align single ↑, align multi ↑, cover multi ↑, FD ↓, diversity (≈ real is best), n.
    """
    table = Table(title=title)
    table.add_column("row", no_wrap=True)
    for name in ("align single ↑", "align multi ↑", "cover multi ↑", "FD ↓", "diversity ≈real", "n"):
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
            str(r.get("n", "")),
        )
    return table
