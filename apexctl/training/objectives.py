"""The recipe's objective as a ``(net, x, cond, generator=...) -> LossOut`` callable (docs/design.md §5).

Each objective's engine config is built from its own ``method`` section (:meth:`ApexMethod.config` etc.), whose
defaults are the engine dataclasses' (:mod:`apexctl.engine.config`): one source of defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from apexctl.engine.apex_full import apex_full
from apexctl.engine.gan import Gan
from apexctl.engine.objectives import Critic, LossOut, Reference, apex, apex_paper, flow_matching
from apexctl.recipe import Recipe

Objective = Callable[..., LossOut]


def build_objective(
    recipe: Recipe,
    reference: Reference | None = None,
    critic: Critic | None = None,
    target_reference: Reference | None = None,
    gan: Gan | None = None,
) -> Objective:
    """``(net, x, cond) -> LossOut`` for the recipe's objective. ``reference`` (F_ref / F_R), ``target_reference``
    (F_T of ``apex_full``) and ``critic`` (the separate critic's forward, ``method.critic: separate``) are the
    trainer's closures."""
    m = recipe.method
    if m.objective == "apex_full":
        return partial(apex_full, cfg=m.config(), reference=reference, target_reference=target_reference, gan=gan)
    if m.objective == "flow_matching":
        return partial(flow_matching, cfg=m.config())
    if m.objective == "apex_paper":
        return partial(apex_paper, cfg=m.config())
    return partial(apex, cfg=m.config(), reference=reference, critic=critic, gan=gan)
