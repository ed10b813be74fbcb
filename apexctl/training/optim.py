"""The optimizer (AdamW, or bitsandbytes' 8-bit AdamW) and the LR schedule (linear warm-up, then constant or cosine)."""

from __future__ import annotations

import math
from functools import partial

import torch

from apexctl.errors import BadInput
from apexctl.recipe import Recipe


def require_optimizer_package(recipe: Recipe) -> None:
    """Refuse ``train.optimizer: adamw8bit`` without bitsandbytes before anything is loaded (exit 2)."""
    if recipe.train.optimizer == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise BadInput(
                "train.optimizer = 'adamw8bit' needs bitsandbytes (pip install bitsandbytes); "
                "or use train.optimizer = 'adamw'"
            ) from None


def make_optimizer(recipe: Recipe, groups: list[dict]) -> torch.optim.Optimizer:
    tr = recipe.train
    if tr.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=tr.lr, betas=tr.betas, weight_decay=tr.weight_decay)
    return torch.optim.AdamW(groups, lr=tr.lr, betas=tr.betas, weight_decay=tr.weight_decay)


def lr_lambda(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Linear warm-up, then constant or cosine decay to ``min_ratio``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_schedule(recipe: Recipe, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    tr = recipe.train
    fn = partial(lr_lambda, warmup=tr.warmup_steps, total=tr.steps, schedule=tr.lr_schedule, min_ratio=tr.lr_min_ratio)
    return torch.optim.lr_scheduler.LambdaLR(opt, fn)
