"""Random FID-Inception weights for tests, saved like the published file (a ``torch.save``'d state dict)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from apexctl.eval.fid import inception

SMALL_INPUT = 75  # the smallest input Inception-v3 takes; 299 costs ~16× more CPU for the same code path


def small_inception_input():
    """Generator for a module-scoped fixture: shrink the extractor's input size for the whole test module."""
    mp = pytest.MonkeyPatch()
    mp.setattr(inception, "INPUT_SIZE", SMALL_INPUT)
    yield
    mp.undo()


def calibrate(model: inception.FIDInceptionV3, images: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to its conv output's batch statistics on ``images``.

    With default random init the activations shrink layer by layer to ~1e-8 and every FID would be ~0; after this
    (data-dependent init, one forward pass) each layer is standardised and the features are O(1).
    """
    hooks = []
    for mod in model.modules():
        if isinstance(mod, inception._Conv):

            def hook(_conv, _inp, out, bn=mod.bn):
                bn.running_mean.copy_(out.mean((0, 2, 3)))
                bn.running_var.copy_(out.var((0, 2, 3)) + 1e-5)

            hooks.append(mod.conv.register_forward_hook(hook))
    model(images)
    for h in hooks:
        h.remove()


def build_fid_weights(folder: Path, seed: int = 0) -> Path:
    """``folder/pt_inception-2015-12-05-6726825d.pth`` with random, calibrated weights."""
    g = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed)
    model = inception.FIDInceptionV3()
    calibrate(model, torch.randint(0, 256, (16, 3, 32, 32), generator=g).float())
    path = Path(folder) / inception.WEIGHTS_NAME
    torch.save(model.state_dict(), path)
    return path
