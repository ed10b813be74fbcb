"""The callables ``apex`` receives besides the model (docs/design.md §5.2): the reference F_ref (self | ema | base)
and the separate critic F_φ, plus the critic copy itself and its checkpoint state, and the critic's features for
the GAN term (engine/gan.py)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from apexctl.engine.ema import EMA
from apexctl.engine.gan import Features, tapped
from apexctl.engine.objectives import Critic, Net, Reference


class ShadowForward(torch.nn.Module):
    """Calls ``module`` with substitute parameters (EMA shadows) without touching the live ones."""

    def __init__(self, module: torch.nn.Module, params: dict[str, torch.Tensor]) -> None:
        super().__init__()
        object.__setattr__(self, "inner", module)  # not a registered child: no second copy in any state dict
        self.params = params

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.inner, self.params, args, kwargs, strict=False)


def make_reference(
    kind: str,
    backbone,
    transformer: torch.nn.Module,
    net: Net,
    ema: EMA | None,
    wrapped: torch.nn.Module,
    base: dict[str, torch.Tensor] | None = None,
    adapters_off: Callable[[], AbstractContextManager] | None = None,
) -> Reference | None:
    """F_ref of ``apex`` / ``apex_full``: None (self), the EMA shadows, or the starting model — a frozen copy of the
    initial trained weights (``base``, full tuning) or the LoRA base (``adapters_off()``: the adapters disabled).

    ``tt`` (``apex_full``'s target-time input) reaches the EMA reference (with the live target-time embedder: it
    is not averaged); the starting model has none, and its stock path is its instantaneous velocity, so ``base``
    drops it."""
    if kind == "ema" or (kind == "base" and base is not None):

        def reference(u, t, c, tt=None):
            params = ema.shadow_dict() if kind == "ema" else base
            backbone.set_forward_module(ShadowForward(transformer, params))
            try:
                with torch.no_grad():
                    return net(u, t, c, tt=tt if kind == "ema" else None)
            finally:
                backbone.set_forward_module(wrapped)

        return reference
    if kind == "base":
        if adapters_off is None:
            raise ValueError("reference 'base' with LoRA needs adapters_off")

        def reference(u, t, c, tt=None):
            with torch.no_grad(), adapters_off():
                return net(u, t, c)

        return reference
    return None


def make_critic(transformer: torch.nn.Module) -> torch.nn.Module:
    """A second copy of the denoiser for ``method.critic: separate``, equal to it at the start. Its trained
    parameters (all weights; with LoRA the adapters) are new tensors; frozen ones (a LoRA base) are shared."""
    memo = {id(p): p for p in transformer.parameters() if not p.requires_grad}
    return copy.deepcopy(transformer, memo)


def make_critic_forward(backbone, critic: torch.nn.Module, wrapped: torch.nn.Module) -> Critic:
    """F_φ(u, s, c) of ``method.critic: separate``: the critic copy, with gradient, the real condition (no shift)."""

    def forward(u, t, c):
        backbone.set_forward_module(critic)
        try:
            return backbone.velocity(u, t, c).to(u.dtype)
        finally:
            backbone.set_forward_module(wrapped)

    return forward


class CriticState:
    """Checkpoint state of ``method.critic: separate``: the critic's trained parameters by name (its frozen LoRA
    base is the model's own, shared, and not saved); its optimizer state is the optimizer's last param group."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]]) -> None:
        self.named = named

    def state_dict(self) -> dict:
        return {"critic": {n: p.detach().cpu() for n, p in self.named}}

    def load_state_dict(self, state: dict) -> None:
        saved = state["critic"]
        if list(saved) != [n for n, _ in self.named]:
            raise ValueError("critic state does not match the critic's trained parameters")
        with torch.no_grad():
            for n, p in self.named:
                p.copy_(saved[n])


def make_gan_features(
    backbone,
    transformer: torch.nn.Module,
    wrapped: torch.nn.Module,
    net: Net,
    critic: torch.nn.Module | None = None,
) -> Features:
    """``features(u, s, cond, detach_weights)`` of the GAN term (engine/gan.py): the critic branch run inside
    ``tapped(*backbone.feature_site(...))``, returning the tapped block's image-token features ``[B, N, D]``.

    The critic branch is the self-critic ``net(u, s, cond, fake=all rows)`` (the shifted condition) through the
    live forward module ``wrapped``, or with ``critic`` (``method.critic: separate``) that copy on the real
    condition, like :func:`make_critic_forward`. ``detach_weights=True`` runs the same module with every trained
    parameter detached (``ShadowForward``): the gradient reaches ``u`` only. The previous forward module is
    restored afterwards. ``tt`` (``apex_full``'s target time) reaches the self-critic's net."""
    module = critic if critic is not None else transformer
    site, extract = backbone.feature_site(module)

    def features(u: torch.Tensor, s: torch.Tensor, cond, detach_weights: bool = False, tt=None) -> torch.Tensor:
        if detach_weights:
            params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
            forward: torch.nn.Module = ShadowForward(module, params)
        else:
            forward = critic if critic is not None else wrapped
        previous = backbone.denoiser
        backbone.set_forward_module(forward)
        try:
            with tapped(site, extract) as captured:
                if critic is not None:
                    backbone.velocity(u, s, cond)
                else:
                    net(u, s, cond, fake=torch.ones(u.shape[0], dtype=torch.bool, device=u.device), tt=tt)
        finally:
            backbone.set_forward_module(previous)
        if len(captured) != 1:
            raise RuntimeError(f"the GAN feature site ran {len(captured)} times in one critic forward (expected 1)")
        return captured[0]

    return features
