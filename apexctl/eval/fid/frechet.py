"""FID between two image folders through torchmetrics' ``FrechetInceptionDistance`` with our FID Inception-v3.

``FID = ‖μ_g − μ_r‖² + tr(Σ_g + Σ_r − 2 (Σ_g Σ_r)^½)`` over the 2048-d pool3 features of the generated (g) and
reference (r) images; μ, Σ are the feature mean and the unbiased (N − 1) covariance. torchmetrics accumulates the
sums in float64 and takes ``tr((Σ_g Σ_r)^½)`` as the sum of the square roots of the eigenvalues of ``Σ_g Σ_r``.
FID is biased upward for small N (it is an estimate from samples): compare numbers only at equal image counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from apexctl.errors import BadInput
from apexctl.eval.fid import inception
from apexctl.eval.imagesets import load_rgb, to_uint8_chw


def _resized(path: Path) -> torch.Tensor:
    """One image as float ``[3, S, S]`` in [0, 255], resized like the extractor would (so sizes may differ)."""
    x = to_uint8_chw(load_rgb(path)).float()[None]
    size = inception.INPUT_SIZE  # read at call time: tests shrink it to keep the network cheap on CPU
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x[0]


def _update(metric, files: Sequence[Path], real: bool, batch: int, bar, task) -> None:
    for i in range(0, len(files), batch):
        chunk = files[i : i + batch]
        metric.update(torch.stack([_resized(p) for p in chunk]).to(metric.device), real=real)
        bar.advance(task, len(chunk))


def fid_between(
    generated: Sequence[Path],
    reference: Sequence[Path],
    extractor: inception.FIDInceptionV3,
    *,
    batch: int = 32,
    quiet: bool = False,
) -> float:
    """FID of the ``generated`` images against the ``reference`` images (paths), via torchmetrics."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from apexctl.progress import progress

    if len(generated) < 2 or len(reference) < 2:
        raise BadInput(f"FID needs at least 2 images on each side, got {len(generated)} and {len(reference)}")
    # normalize=False: our extractor takes [0, 255] values as they are; reset_real_features is irrelevant (one pass)
    # the metric's float64 sums live where the extractor runs (CUDA when there is one)
    # sync_on_compute off: one process holds every image (rank 0 of a launched job scores alone)
    metric = FrechetInceptionDistance(feature=extractor, normalize=False, sync_on_compute=False)
    metric = metric.to(extractor.fc.weight.device)
    with progress(quiet) as bar:
        _update(metric, reference, True, batch, bar, bar.add_task("FID reference", total=len(reference)))
        _update(metric, generated, False, batch, bar, bar.add_task("FID generated", total=len(generated)))
    value = float(metric.compute())
    # rank-deficient covariances (N < 2048) leave round-off of either sign; FID is a squared distance
    return max(value, 0.0)
