"""One optimizer step: ``grad_accum`` micro-batches from the latent cache → objective → backward → clip → AdamW →
LR schedule → EMA, with the non-finite policy of ``train.skip_nonfinite``."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from apexctl.engine.objectives import LossOut, regression
from apexctl.errors import ApexError
from apexctl.training.hardware import mean_over_ranks
from apexctl.training.offload import activations_on_cpu, evict_all

if TYPE_CHECKING:
    from apexctl.training.state import Session


@dataclass
class StepOut:
    step: int
    loss: float
    terms: dict[str, float]
    grad_norm: float
    skipped: bool
    seconds: float = 0.0


def _nonfinite_error(sess: Session, what: str, step: int, terms: dict[str, float]) -> ApexError:
    lg = sess.last_good
    where = f"last good checkpoint: {lg[1]}" if lg else "no checkpoint written yet"
    detail = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
    return ApexError(f"non-finite {what} at step {step} ({detail}); stopping. {where}")


def train_step(sess: Session) -> StepOut:
    """``grad_accum`` micro-batches of the global batch (rank r takes rows r::W), then one optimizer step.

    A non-finite loss or gradient stops the run, or with ``train.skip_nonfinite`` skips the update (weights,
    optimizer state and EMA unchanged; the step, data position and LR schedule advance) up to
    ``train.max_consecutive_skips`` times in a row.
    """
    acc, tr = sess.acc, sess.recipe.train
    world, rank, mb = sess.world, sess.rank, tr.micro_batch
    cache, empty = sess.cache, sess.empty
    hw = sess.recipe.hardware
    fsdp = hw.strategy == "fsdp"
    t0 = time.perf_counter()
    # two time scales (method.critic_updates = N > 1): the critic trains every step, the generator every N-th
    m, done = sess.recipe.method, sess.counter.step
    n_critic = getattr(m, "critic_updates", 1)
    sched: dict = {"phase": "critic"} if n_critic > 1 and (done + 1) % n_critic else {}
    if getattr(m, "rectify_warmup", 0) > 0:  # critic warm-up: the generator's adversarial weight ramps from 0
        sched["rectify_scale"] = m.rectify_scale(done)
    warm = sess.warm_start is not None and done < m.warm_start_steps  # regression on the teacher's pairs
    terms_sum: dict[str, float] = {}
    loss_sum = 0.0
    for micro in range(tr.grad_accum):
        if warm:
            x, z, cond = sess.warm_start.batch(mb, rank, world)
            x, z, cond = x.to(acc.device), z.to(acc.device, x.dtype), cond.to(acc.device)
        else:
            idx, drop = sess.sampler.next(mb * world)
            idx, drop = idx[rank::world], drop[rank::world]
            x, cond = cache.batch(idx, drop, empty)
            x, cond = x.to(acc.device), cond.to(acc.device)
        sync = micro == tr.grad_accum - 1
        if fsdp:  # FSDP2's no_sync: accumulate unsharded gradients, reduce-scatter on the last micro-batch
            sess.wrapped.set_requires_gradient_sync(sync)
        # hardware.offload_activations: what this forward saves for its backward waits in CPU memory
        saved = activations_on_cpu(acc.device) if hw.offload_activations else nullcontext()
        with nullcontext() if sync or fsdp else acc.no_sync(sess.wrapped), acc.autocast(), saved:
            if warm:
                out: LossOut = regression(sess.net, x, z, cond)
            else:
                extra = {"uncond": cache.cond(torch.full((len(x),), empty)).to(acc.device)} if sess.guided_ref else {}
                out = sess.objective(sess.net, x, cond, **extra, **sched)
            acc.backward(out.loss / tr.grad_accum)
        if hw.offload_base:  # the first block, recomputed last in backward, goes back to the CPU too
            evict_all(sess.transformer)
        loss_sum += float(out.loss.detach()) / tr.grad_accum
        for k, v in out.terms.items():
            terms_sum[k] = terms_sum.get(k, 0.0) + float(v) / tr.grad_accum
    if world > 1:  # the logged loss is the mean over ranks (a NaN on one rank reaches all: same decision everywhere)
        keys = list(terms_sum)
        vals = mean_over_ranks(acc, [loss_sum] + [terms_sum[k] for k in keys])
        loss_sum, terms_sum = vals[0], dict(zip(keys, vals[1:], strict=True))
        # the learnable shift and a separate critic live outside the DDP module: average their gradients by hand
        for p in sess.unwrapped_trainable:
            if p.grad is not None:
                p.grad.copy_(acc.reduce(p.grad, reduction="mean"))
    step = sess.counter.step + 1
    finite = math.isfinite(loss_sum)
    if not finite and not tr.skip_nonfinite:
        raise _nonfinite_error(sess, "loss", step, terms_sum)
    trainable = sess.trainable
    gnorm = float("nan")
    if finite:
        if fsdp:
            gnorm = _clip_sharded(sess, tr.max_grad_norm)
        elif sess.critic_params and getattr(sess.recipe.method, "critic_max_grad_norm", None) is not None:
            # the separate critic has its own clip (DMD2); the logged norm is the generator's
            acc.clip_grad_norm_(sess.critic_params, sess.recipe.method.critic_max_grad_norm)
            gnorm = float(acc.clip_grad_norm_(sess.generator_trainable, tr.max_grad_norm or float("inf")))
        elif tr.max_grad_norm is not None:
            gnorm = float(acc.clip_grad_norm_(trainable, tr.max_grad_norm))
        else:
            gnorm = float(torch.norm(torch.stack([p.grad.norm() for p in trainable if p.grad is not None])))
    skipped = not (finite and math.isfinite(gnorm))
    if skipped and not tr.skip_nonfinite:
        raise _nonfinite_error(sess, f"gradient norm ({gnorm})", step, terms_sum)
    c = sess.counter
    if skipped:
        c.skipped += 1
        c.streak += 1
        if c.streak > tr.max_consecutive_skips:
            raise _nonfinite_error(
                sess, f"loss/gradients in {c.streak} consecutive steps (train.max_consecutive_skips = "
                f"{tr.max_consecutive_skips}); last", step, terms_sum,
            )  # fmt: skip
    else:
        c.streak = 0
        sess.opt.step()
    sess.sched.step()
    sess.opt.zero_grad(set_to_none=True)
    if sess.ema is not None and not skipped:
        sess.ema.update()
    c.step = step
    return StepOut(step, loss_sum, terms_sum, gnorm, skipped, time.perf_counter() - t0)


@torch.no_grad()
def _clip_sharded(sess: Session, max_norm: float | None) -> float:
    """Global gradient norm (and clipping) under FSDP: each rank holds disjoint shards of the denoiser's gradients
    (summed over ranks) and a replicated copy of the shift's (counted once)."""
    acc = sess.acc
    local = sum(
        (_local(p.grad).float().pow(2).sum().to(acc.device) for p in sess.params if p.grad is not None),
        torch.zeros((), device=acc.device),
    )
    total = acc.reduce(local.reshape(1), reduction="sum")[0]
    if sess.shift.learnable:
        total = total + sum(p.grad.float().pow(2).sum() for p in sess.shift.parameters() if p.grad is not None)
    norm = float(total.sqrt())
    if max_norm is not None and math.isfinite(norm):
        coef = min(1.0, max_norm / (norm + 1e-6))
        for p in sess.trainable:
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2 gradients); a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t
