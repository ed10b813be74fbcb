"""DMD2's optional GAN term (tianweiy/DMD2 ``main/``): a small classifier head on the critic's intermediate features.

The critic (the fake-score network: the model on the shifted condition, or a separate copy) is tapped at one
transformer block; a head ``D`` maps its image-token features to one logit per row. At a critic time ``s``,
noisy real latents ``u_real = s·z + (1−s)·x`` and noisy one-step samples ``u_fake = s·z' + (1−s)·x̂`` are told
apart with the non-saturating GAN losses (:func:`gan_losses`): the head and the critic learn to separate them, the
generator learns, through the critic's features, to make ``x̂`` look real.

Model-agnostic: the trainer builds ``features(u, s, cond, detach_weights)`` (``training/closures.py``) and the
site comes from ``Backbone.feature_site()``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.functional import softplus

from apexctl.engine.cond import Cond
from apexctl.engine.flow import interpolate

#: features(u, s, cond, detach_weights) → [B, N, D]: the critic's image-token features at its tapped block;
#: detach_weights=True runs the critic with every trained weight detached (gradient reaches u only)
Features = Callable[..., torch.Tensor]


class GanHead(nn.Module):
    """``[B, N, D] → [B]`` logits: ``Linear(hidden, 1)(SiLU(Linear(D, hidden)(mean_tokens(LayerNorm(h)))))``.

    The token mean makes it invariant to the order of the tokens. It runs in fp32 whatever the features' dtype.
    """

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = self.norm(features.to(self.fc1.weight.dtype)).mean(dim=1)
        return self.fc2(nn.functional.silu(self.fc1(h))).squeeze(-1)


@dataclass
class Gan:
    """What an objective needs for the GAN term: the trainer's critic-feature callable and the head."""

    features: Features
    head: GanHead


@contextmanager
def tapped(site: nn.Module, extract: Callable[[Any], torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward of ``site`` appends ``extract(output)`` to the yielded list (the output
    itself is left unchanged); the hook is always removed, also on an exception."""
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: tuple, output: Any) -> None:
        captured.append(extract(output))

    handle = site.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def gan_losses(
    real_logits: torch.Tensor, fake_logits_detached: torch.Tensor, fake_logits_gen: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-saturating GAN losses, softplus(a) = log(1 + eᵃ)::

        L_D = mean softplus(−D(u_real)) + mean softplus(D(sg(u_fake)))    (−log σ(D(real)) − log(1 − σ(D(fake))))
        L_G = mean softplus(−D(u_fake))                                   (−log σ(D(fake)))

    ``fake_logits_detached``: D on the fake rows with the generator cut off (gradient to head and critic);
    ``fake_logits_gen``: D on the fake rows with the head and critic cut off (gradient to the generator). The
    function only combines the logits; the cuts are the caller's (:func:`gan_term`)."""
    loss_d = softplus(-real_logits).mean() + softplus(fake_logits_detached).mean()
    loss_g = softplus(-fake_logits_gen).mean()
    return loss_d, loss_g


def _frozen_head(head: GanHead, features: torch.Tensor) -> torch.Tensor:
    """``head(features)`` with the head's parameters detached: the generator's loss does not train the head."""
    params = {name: p.detach() for name, p in head.named_parameters()}
    return torch.func.functional_call(head, params, (features,))


def gan_term(
    features: Features,
    head: GanHead,
    x_real: torch.Tensor,
    x_fake: torch.Tensor,
    cond: Cond,
    s: torch.Tensor,
    z_real: torch.Tensor,
    z_fake: torch.Tensor,
    **kw: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DMD2's GAN term, ``L_D + L_G`` (:func:`gan_losses`), and its terms by name (all detached)::

        u_real = s·z_real + (1−s)·x_real,   u_fake = s·z_fake + (1−s)·x̂
        L_D    = mean softplus(−D(φ(u_real))) + mean softplus(D(φ(sg(u_fake))))     → head D, critic φ
        L_G    = mean softplus(−sg(D)(sg(φ)(u_fake)))                               → generator, through x̂

    ``x_real [B, C, h, w]`` data latents; ``x_fake`` the generator's one-step samples x̂ = z − F(z, 1, c) WITH their
    graph; ``s [B]`` critic times; ``z_*`` noises. The two D-side rows go through one ``features`` call of 2B rows;
    the G-side call has ``detach_weights=True`` and the head's parameters detached, so L_G moves only the generator.
    The caller passes only the rows that take part (``apex_full``: its e2e rows).
    ``kw`` (per-row tensors, e.g. ``apex_full``'s target time) goes to every ``features`` call.
    Terms: ``gan_d``, ``gan_g``, ``gan_real_acc`` (fraction of real logits > 0), ``gan_fake_acc`` (fraction of the
    D-side fake logits < 0).
    """
    n = x_real.shape[0]
    u_real = interpolate(x_real, z_real, s)
    u_fake = interpolate(x_fake, z_fake, s)

    # both D-side row sets in one forward: the fake rows cut off from the generator
    u_d = torch.cat([u_real, u_fake.detach()])
    kw2 = {k: torch.cat([v, v]) for k, v in kw.items()}
    logits_d = head(features(u_d, torch.cat([s, s]), Cond.cat([cond, cond]), detach_weights=False, **kw2))
    real_logits, fake_logits = logits_d[:n], logits_d[n:]
    gen_logits = _frozen_head(head, features(u_fake, s, cond, detach_weights=True, **kw))
    loss_d, loss_g = gan_losses(real_logits, fake_logits, gen_logits)
    terms = {
        "gan_d": loss_d.detach(),
        "gan_g": loss_g.detach(),
        "gan_real_acc": (real_logits.detach() > 0).float().mean(),
        "gan_fake_acc": (fake_logits.detach() < 0).float().mean(),
    }
    return loss_d + loss_g, terms
