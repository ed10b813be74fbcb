"""The state one training run holds (:class:`Session`, built by :func:`apexctl.training.session.setup`) and the
step counter it checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from apexctl.engine.ema import EMA
from apexctl.engine.objectives import Net
from apexctl.engine.shift import ConditionShift
from apexctl.recipe import Recipe


@dataclass
class StepCounter:
    """Optimizer steps taken (skipped ones included) and the non-finite skip counters; checkpointed."""

    step: int = 0
    skipped: int = 0
    streak: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped": self.skipped, "streak": self.streak}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.skipped = int(state.get("skipped", 0))
        self.streak = int(state.get("streak", 0))


@dataclass
class Session:
    """Everything one training run holds; built by :func:`setup`."""

    recipe: Recipe
    acc: Any
    run: Path
    model_dir: Path
    backbone: Any
    transformer: torch.nn.Module
    wrapped: torch.nn.Module
    shift: ConditionShift
    opt: Any
    sched: Any
    ema: EMA | None
    net: Net
    objective: Any  # (net, x, cond, **extra) -> LossOut
    cache: Any  # apexctl.data.cache.LatentCache
    sampler: Any  # apexctl.data.cache.PairSampler
    counter: StepCounter
    params: list[torch.nn.Parameter]
    empty: int | None
    guided_ref: bool
    global_batch: int
    last_good: tuple[int, Path] | None = None
    sample_rows: list[int] = field(default_factory=list)
    critic: torch.nn.Module | None = None  # method.critic: separate (outside DDP: gradients averaged by hand)
    critic_params: list[torch.nn.Parameter] = field(default_factory=list)
    aux_params: list[torch.nn.Parameter] = field(default_factory=list)  # target-time embedder, GAN head
    critic_forward: Any = None  # F_φ(u, s, c) of a separate critic (the critic-lag diagnostic samples with it)
    warm_start: Any = None  # apexctl.training.warm_start.WarmStartPairs (method.warm_start_steps > 0)

    @property
    def world(self) -> int:
        return self.acc.num_processes

    @property
    def rank(self) -> int:
        return self.acc.process_index

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    @property
    def generator_trainable(self) -> list[torch.nn.Parameter]:
        """Every trained parameter but a separate critic's: the denoiser's, a learnable shift, the target-time
        embedder."""
        shift = list(self.shift.parameters()) if self.shift.learnable else []
        return self.params + shift + self.aux_params

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return self.generator_trainable + self.critic_params

    @property
    def unwrapped_trainable(self) -> list[torch.nn.Parameter]:
        """Trained parameters outside the DDP module (learnable shift, separate critic, target-time embedder):
        averaged by hand."""
        return (list(self.shift.parameters()) if self.shift.learnable else []) + self.critic_params + self.aux_params
