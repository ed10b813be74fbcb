"""The training loop on accelerate (DESIGN §6): one process, or DDP / FSDP through ``accelerate launch``.

Per optimizer step: ``grad_accum`` micro-batches from the latent cache → objective → backward → clip → AdamW →
LR schedule → EMA. Checkpoints hold everything an exact resume needs (weights, optimizer, LR schedule, EMA,
shift, a separate critic, RNG of every rank, data position, step and skip counters) and are written to ``step-N.tmp``, marked
``COMPLETE`` and only then renamed. A run folder has one writer at a time (``RUN/.lock``, engine/lock.py).

The pieces: :func:`setup` builds a :class:`Session`; :func:`train_step` runs one optimizer step;
:func:`save_checkpoint` / :func:`resume_from` write and read checkpoints; :class:`MetricsLog` writes
``metrics.jsonl`` (and tensorboard); :func:`sample_grid` draws the fixed-seed grids; :func:`export` writes the
result. :func:`train` strings them together.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from apexctl.atomic import write_text
from apexctl.data.cache import LatentCache, PairSampler
from apexctl.engine import checkpoint as ckpt
from apexctl.engine.ema import EMA
from apexctl.engine.flow import TimeSampler
from apexctl.engine.lock import RunLock
from apexctl.engine.objectives import (
    ApexConfig,
    ApexPaperConfig,
    FlowMatchingConfig,
    LossOut,
    Net,
    apex,
    apex_paper,
    flow_matching,
)
from apexctl.engine.shift import ConditionShift
from apexctl.errors import ApexError, BadInput
from apexctl.export import write_export
from apexctl.lora import adapters_disabled, check_lora_formats, make_trainable
from apexctl.recipe import Recipe, TimeSpec


def time_sampler(spec: TimeSpec, t_max: float = 1.0) -> TimeSampler:
    return TimeSampler(
        kind=spec.kind,
        logit_mean=spec.logit_mean,
        logit_std=spec.logit_std,
        beta_a=spec.beta_a,
        beta_b=spec.beta_b,
        t_max=t_max,
        one_step_prob=spec.one_step_prob,
    )


def build_objective(recipe: Recipe, reference=None, critic=None):
    """``(net, x, cond) -> LossOut`` for the recipe's objective (``critic``: the separate critic's forward)."""
    m = recipe.method
    if m.objective == "flow_matching":
        return partial(flow_matching, cfg=FlowMatchingConfig(time_sampler(m.time)))
    if m.objective == "apex_paper":
        cfg = ApexPaperConfig(
            time=time_sampler(m.time),
            fake_weight=m.fake_weight,
            mix_weight=m.mix_weight,
            lambda_mix=m.lambda_mix,
            fake_grad=m.fake_grad,
            fake_noise=m.fake_noise,
            weighting=m.weighting,
            weight_max=m.weight_max,
        )
        return partial(apex_paper, cfg=cfg)
    cfg = ApexConfig(
        fm_time=time_sampler(m.time, t_max=m.fm_t_max),
        critic_time=time_sampler(m.critic_time),
        fm_weight=m.fm_weight,
        fake_weight=m.fake_weight,
        rectify_weight=m.rectify_weight,
        delta_clip=m.delta_clip,
        reference_guidance=m.reference_guidance,
        generator_steps=m.generator_steps,
    )
    return partial(apex, cfg=cfg, reference=reference, critic=critic)


def lr_lambda(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Linear warm-up, then constant or cosine decay to ``min_ratio``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


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


class _Stop:
    """SIGINT/SIGTERM: finish the current step, checkpoint, exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self.signal: str | None = None
        self._old: dict = {}

    def __enter__(self) -> _Stop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners)
                pass
        return self

    def _handle(self, signum, _frame) -> None:
        self.requested = True
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _ShadowForward(torch.nn.Module):
    """Calls ``module`` with substitute parameters (EMA shadows) without touching the live ones."""

    def __init__(self, module: torch.nn.Module, params: dict[str, torch.Tensor]) -> None:
        super().__init__()
        object.__setattr__(self, "inner", module)  # not a registered child: no second copy in any state dict
        self.params = params

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.inner, self.params, args, kwargs, strict=False)


class _CriticState:
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


def make_critic(transformer: torch.nn.Module) -> torch.nn.Module:
    """A second copy of the denoiser for ``method.critic: separate``, equal to it at the start. Its trained
    parameters (all weights; with LoRA the adapters) are new tensors; frozen ones (a LoRA base) are shared."""
    memo = {id(p): p for p in transformer.parameters() if not p.requires_grad}
    return copy.deepcopy(transformer, memo)


def run_dir(recipe: Recipe) -> Path:
    return Path(recipe.output.dir)


# --------------------------------------------------------------------------------------------------------------
# setup


def make_accelerator(recipe: Recipe):
    """The Accelerator for the recipe's hardware section (CPU: fp32 and gloo; GPU: bf16 autocast by default)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs

    hw = recipe.hardware
    if hw.threads:
        torch.set_num_threads(hw.threads)
    use_cpu = hw.device == "cpu" or (hw.device == "auto" and not torch.cuda.is_available())
    if hw.device == "cuda" and not torch.cuda.is_available():
        raise BadInput("hardware.device = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    if hw.strategy == "fsdp" and (recipe.train.ema_decay is not None or recipe.method.reference == "ema"):
        raise BadInput(
            "hardware.strategy = 'fsdp' does not support an EMA yet (train.ema_decay / method.reference = 'ema': "
            "the shadow would be sharded); use strategy 'ddp', or drop the EMA"
        )
    precision = hw.precision if hw.precision != "auto" else ("fp32" if use_cpu else "bf16")
    if hw.strategy == "fsdp" and precision == "fp16":
        raise BadInput(
            "hardware.strategy = 'fsdp' does not support precision 'fp16' (no loss scaling on the sharded "
            "optimizer); use 'bf16' or 'fp32'"
        )
    kwargs = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    # accelerate keeps precision/plugins in a process-wide singleton; a second training in the same process
    # (notebooks, the test suite) with other settings would be refused. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(
        cpu=use_cpu,
        mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision],
        kwargs_handlers=kwargs,
    )  # fsdp: no accelerate plugin (it is ignored on CPU); setup() shards the denoiser with torch FSDP2 itself


def check_world(recipe: Recipe, world: int) -> int:
    """``hardware.processes`` must be the launched world size; returns the global batch."""
    hw, tr = recipe.hardware, recipe.train
    if hw.processes != world:
        raise BadInput(
            f"hardware.processes = {hw.processes} but this run has {world} process(es); launch with "
            f"`apexctl distill RECIPE --launch {hw.processes}` (or `accelerate launch --num_processes "
            f"{hw.processes} -m apexctl distill RECIPE`) or set hardware.processes={world}"
        )
    if hw.strategy == "fsdp" and world < 2:
        raise BadInput(
            "hardware.strategy = 'fsdp' shards the model over several processes: launch 2 or more "
            "(`apexctl distill RECIPE --launch N`), or use strategy 'auto' on one process"
        )
    global_batch = tr.micro_batch * tr.grad_accum * world
    if tr.global_batch is not None and tr.global_batch != global_batch:
        raise BadInput(
            f"train.global_batch = {tr.global_batch} but micro_batch × grad_accum × processes = "
            f"{tr.micro_batch} × {tr.grad_accum} × {world} = {global_batch}"
        )
    return global_batch


def check_optional_packages(recipe: Recipe) -> None:
    """Refuse, before loading anything, a recipe option whose package is not installed (exit 2)."""
    tr = recipe.train
    if tr.optimizer == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise BadInput(
                "train.optimizer = 'adamw8bit' needs bitsandbytes (pip install bitsandbytes; CUDA only); "
                "or use train.optimizer = 'adamw'"
            ) from None
    if tr.log_with == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise BadInput(
                "train.log_with = 'tensorboard' needs the tensorboard package (pip install tensorboard); "
                "or use train.log_with = 'none' (metrics.jsonl is always written)"
            ) from None


def make_optimizer(recipe: Recipe, groups: list[dict]) -> torch.optim.Optimizer:
    tr = recipe.train
    if tr.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=tr.lr, betas=tr.betas, weight_decay=tr.weight_decay)
    return torch.optim.AdamW(groups, lr=tr.lr, betas=tr.betas, weight_decay=tr.weight_decay)


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
    objective: Callable
    cache: LatentCache
    sampler: PairSampler
    counter: StepCounter
    params: list[torch.nn.Parameter]
    empty: int | None
    guided_ref: bool
    global_batch: int
    last_good: tuple[int, Path] | None = None
    sample_rows: list[int] = field(default_factory=list)
    critic: torch.nn.Module | None = None  # method.critic: separate (outside DDP: gradients averaged by hand)
    critic_params: list[torch.nn.Parameter] = field(default_factory=list)

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
    def trainable(self) -> list[torch.nn.Parameter]:
        return self.params + (list(self.shift.parameters()) if self.shift.learnable else []) + self.critic_params

    @property
    def unwrapped_trainable(self) -> list[torch.nn.Parameter]:
        """Trained parameters outside the DDP module (learnable shift, separate critic): averaged by hand."""
        return (list(self.shift.parameters()) if self.shift.learnable else []) + self.critic_params


def _make_reference(
    kind: str, backbone, transformer, net: Net, ema: EMA | None, wrapped, base: dict[str, torch.Tensor] | None = None
):
    """F_ref of ``apex``: None (self), the EMA shadows, or the starting model — a frozen copy of the initial trained
    weights (``base``, full tuning) or the LoRA base (adapters off)."""
    if kind == "ema" or (kind == "base" and base is not None):

        def reference(u, t, c):
            params = ema.shadow_dict() if kind == "ema" else base
            backbone.set_forward_module(_ShadowForward(transformer, params))
            try:
                with torch.no_grad():
                    return net(u, t, c)
            finally:
                backbone.set_forward_module(wrapped)

        return reference
    if kind == "base":

        def reference(u, t, c):
            with torch.no_grad(), adapters_disabled(transformer):
                return net(u, t, c)

        return reference
    return None


def _make_critic_forward(backbone, critic: torch.nn.Module, wrapped):
    """F_φ(u, s, c) of ``method.critic: separate``: the critic copy, with gradient, the real condition (no shift)."""

    def forward(u, t, c):
        backbone.set_forward_module(critic)
        try:
            return backbone.velocity(u, t, c).to(u.dtype)
        finally:
            backbone.set_forward_module(wrapped)

    return forward


def setup(recipe: Recipe, acc) -> Session:
    """Model (+ LoRA), shift, optimizer, schedule, EMA, objective and data, in a fixed RNG order."""
    from accelerate.utils import set_seed

    from apexctl.data.prepare import cache_identity
    from apexctl.models import load_for_recipe, resolve_model_path

    hw, tr, m = recipe.hardware, recipe.train, recipe.method
    global_batch = check_world(recipe, acc.num_processes)
    # rank r draws its noise and times from seed + r (rank 0: seed, as a single process); the model weights are the
    # same on every rank (loaded, or LoRA-initialised on each rank and broadcast from rank 0 by DDP)
    set_seed(tr.seed, device_specific=True)

    run = run_dir(recipe)
    model_dir = resolve_model_path(recipe.model.path)
    # the codec is needed only for sample grids, and only on rank 0 (training reads latents from the cache)
    want_codec = tr.sample_every is not None and acc.is_main_process
    backbone = load_for_recipe(recipe.model, model_dir, load_text_encoder=False, load_codec=want_codec)
    cache = LatentCache.open(recipe.data.cache_dir)
    want = cache_identity(recipe, model_dir, backbone.family)
    cache.check(want)

    lora = recipe.model.lora
    transformer = backbone.transformer
    if lora is not None:
        check_lora_formats(backbone, recipe.output.lora_formats)
    make_trainable(backbone, lora)
    transformer.train()
    if hw.gradient_checkpointing:
        if not hasattr(transformer, "enable_gradient_checkpointing"):
            raise BadInput(
                f"hardware.gradient_checkpointing: {type(transformer).__name__} does not support it; set it to false"
            )
        transformer.enable_gradient_checkpointing()
    s = m.shift
    shift = ConditionShift(
        a=s.a,
        b=s.b,
        mode=s.mode,
        learnable=s.learnable,
        site=s.site,
        dim=(backbone.condition_dim() if s.site == "projection" else backbone.embed_dim) if s.mode == "diag" else None,
    )
    if s.site == "projection" and s.mode == "scalar" and backbone.projection_cancels_scalar_bias:
        if s.b != 0.0 or s.learnable:
            acc.print(
                f"warning: method.shift.b has no effect at site 'projection' on {backbone.family} (the text stream is "
                "read through LayerNorms, which remove a constant bias"
                + ("; a learnable b gets no gradient" if s.learnable else "")
                + "); use method.shift.site: embeddings for a bias that changes the condition"
            )
    fsdp = hw.strategy == "fsdp"
    if fsdp:  # shard before the optimizer exists: it steps the sharded (DTensor) parameters
        from apexctl.engine import fsdp as fsdp_mod

        mp = {"bf16": torch.bfloat16}.get(acc.mixed_precision) if acc.device.type == "cuda" else None
        # sharding moves each block's shards to the device (or keeps them on the CPU with hardware.offload): the
        # whole denoiser is never on one device; the rest of the backbone (e.g. the codec on rank 0) moves after
        fsdp_mod.shard(transformer, mixed_precision=mp, offload=hw.offload)
        for child in backbone.children():
            if child is not transformer:
                child.to(acc.device)
    named = [(n, p) for n, p in transformer.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    groups = [{"params": params, "lr": tr.lr}]
    if s.learnable:
        groups.append({"params": list(shift.parameters()), "lr": tr.lr * s.lr_scale, "weight_decay": 0.0})
    critic, critic_named = None, []
    if m.critic == "separate":  # recipe-validated: apex, not FSDP; equal budget: same optimizer, lr and steps
        critic = make_critic(transformer)
        critic_named = [(n, p) for n, p in critic.named_parameters() if p.requires_grad]
        groups.append({"params": [p for _, p in critic_named], "lr": tr.lr})
    opt = make_optimizer(recipe, groups)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        partial(lr_lambda, warmup=tr.warmup_steps, total=tr.steps, schedule=tr.lr_schedule, min_ratio=tr.lr_min_ratio),
    )
    if fsdp:  # not through acc.prepare (it would wrap the model in DDP); checkpoints go through fsdp.OptimizerState
        wrapped = transformer
        shift.to(acc.device)
    else:
        wrapped, opt = acc.prepare(transformer, opt)
        backbone.set_forward_module(wrapped)
        shift.to(acc.device)
        backbone.to(acc.device)
        if critic is not None:  # equal to the model as prepared (DDP broadcast rank 0's weights, e.g. a LoRA init)
            critic.to(acc.device)
            with torch.no_grad():
                for (cn, c), (n, p) in zip(critic_named, named, strict=True):
                    assert cn == n, (cn, n)
                    c.copy_(p)
    # reference = base with full tuning: the starting weights, frozen (taken before any step and before a resume
    # loads the trained ones, so a resumed run has the same base without storing it in the checkpoint)
    base = None
    if m.reference == "base" and recipe.model.lora is None:
        base = {n: p.detach().clone() for n, p in named}

    ema_decay = tr.ema_decay if tr.ema_decay is not None else (0.99 if m.reference == "ema" else None)
    ema = EMA(named, ema_decay) if ema_decay is not None else None
    net = Net(backbone, shift)
    reference = _make_reference(m.reference, backbone, transformer, net, ema, wrapped, base)
    objective = build_objective(recipe, reference, _make_critic_forward(backbone, critic, wrapped) if critic else None)

    sampler = PairSampler(len(cache), seed=tr.seed, cond_dropout=recipe.data.cond_dropout, buckets=cache.pair_buckets)
    guided_ref = m.objective == "apex" and m.reference_guidance > 1.0
    empty = cache.prompt_index("") if (recipe.data.cond_dropout > 0 or guided_ref) else None
    counter = StepCounter()
    for obj in (sched, sampler, counter, shift) + ((ema,) if ema is not None else ()):
        acc.register_for_checkpointing(obj)
    if critic is not None:
        acc.register_for_checkpointing(_CriticState(critic_named))
    if fsdp:  # the optimizer state, gathered; the weights go to model.safetensors in save_checkpoint
        holder = torch.nn.ModuleDict({"transformer": transformer, "shift": shift})
        acc.register_for_checkpointing(fsdp_mod.OptimizerState(holder, opt))
    sess = Session(
        recipe=recipe,
        acc=acc,
        run=run,
        model_dir=model_dir,
        backbone=backbone,
        transformer=transformer,
        wrapped=wrapped,
        shift=shift,
        opt=opt,
        sched=sched,
        ema=ema,
        net=net,
        objective=objective,
        cache=cache,
        sampler=sampler,
        counter=counter,
        params=params,
        empty=empty,
        guided_ref=guided_ref,
        global_batch=global_batch,
        critic=critic,
        critic_params=[p for _, p in critic_named],
    )
    if tr.sample_every is not None:
        sess.sample_rows = _sample_rows(recipe, cache)
    return sess


# --------------------------------------------------------------------------------------------------------------
# checkpoints


def resume_from(sess: Session, resume: str | None) -> None:
    """``resume``: None | "auto" (newest COMPLETE checkpoint of the run, if any) | a checkpoint folder."""
    if not resume:
        return
    acc = sess.acc
    found = ckpt.latest_checkpoint(sess.run) if resume == "auto" else None
    if resume != "auto":
        p = Path(resume)
        if not (p / ckpt.COMPLETE).is_file():
            raise BadInput(f"--resume {resume}: not a complete checkpoint folder")
        found = (0, p)
    if found is not None:
        acc.load_state(str(found[1]))
        if sess.recipe.hardware.strategy == "fsdp":  # the weights: every rank reads the full file, keeps its shards
            from apexctl.engine import fsdp

            fsdp.load_model(sess.transformer, found[1] / "model.safetensors", acc.is_main_process)
        acc.print(f"resumed from {found[1]} at step {sess.counter.step}")
    elif acc.is_main_process:
        acc.print("--resume auto: no complete checkpoint yet, starting from step 0")


def param_checksum(params: list[torch.Tensor]) -> float:
    """A position-weighted float64 sum of the parameters: equal on every rank iff the replicas agree (in practice)."""
    total = 0.0
    with torch.no_grad():
        for i, p in enumerate(params):
            t = p.detach().double()
            total += (i + 1) * float(t.sum()) + float(t.abs().sum())
    return total


def _gather(acc, value) -> list:
    if acc.num_processes == 1:
        return [value]
    import torch.distributed as dist

    out: list = [None] * acc.num_processes
    dist.all_gather_object(out, value)
    return out


def save_checkpoint(sess: Session, step: int) -> Path:
    """Write ``step-N.tmp`` (every rank its RNG state), mark it COMPLETE, rename it to ``step-N``, prune."""
    acc, run = sess.acc, sess.run
    final = ckpt.step_dir(run, step)
    tmp = final.with_name(final.name + ".tmp")
    # replicas must agree before they are saved (DDP keeps them equal; a mismatch is a bug worth stopping for)
    sums = _gather(acc, param_checksum(sess.trainable)) if sess.recipe.hardware.strategy != "fsdp" else []
    if len(set(sums)) > 1:
        raise ApexError(f"step {step}: parameters differ across ranks (checksums {sums}); not checkpointing")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp), safe_serialization=True)  # every rank writes its own RNG state
    if sess.recipe.hardware.strategy == "fsdp":  # gathered on every rank, written by rank 0 (the DDP file layout)
        from apexctl.engine import fsdp

        fsdp.save_model(sess.transformer, tmp / "model.safetensors", acc.is_main_process)
    acc.wait_for_everyone()
    if acc.is_main_process:
        info = {"step": step, "world_size": acc.num_processes, "global_batch": sess.global_batch}
        if sums:
            info["param_checksums"] = sums
        write_text(tmp / ckpt.COMPLETE, json.dumps(info))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        ckpt.prune(run, sess.recipe.train.keep_last)
    acc.wait_for_everyone()
    return final


# --------------------------------------------------------------------------------------------------------------
# one step


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


def _mean_over_ranks(acc, values: list[float]) -> list[float]:
    if acc.num_processes == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=acc.device)
    return (acc.reduce(t, reduction="sum") / acc.num_processes).tolist()


def train_step(sess: Session) -> StepOut:
    """``grad_accum`` micro-batches of the global batch (rank r takes rows r::W), then one optimizer step.

    A non-finite loss or gradient stops the run, or with ``train.skip_nonfinite`` skips the update (weights,
    optimizer state and EMA unchanged; the step, data position and LR schedule advance) up to
    ``train.max_consecutive_skips`` times in a row.
    """
    acc, tr = sess.acc, sess.recipe.train
    world, rank, mb = sess.world, sess.rank, tr.micro_batch
    cache, empty = sess.cache, sess.empty
    fsdp = sess.recipe.hardware.strategy == "fsdp"
    t0 = time.perf_counter()
    terms_sum: dict[str, float] = {}
    loss_sum = 0.0
    for micro in range(tr.grad_accum):
        idx, drop = sess.sampler.next(mb * world)
        idx, drop = idx[rank::world], drop[rank::world]
        x, cond = cache.batch(idx, drop, empty)
        x, cond = x.to(acc.device), cond.to(acc.device)
        sync = micro == tr.grad_accum - 1
        if fsdp:  # FSDP2's no_sync: accumulate unsharded gradients, reduce-scatter on the last micro-batch
            sess.wrapped.set_requires_gradient_sync(sync)
        with nullcontext() if sync or fsdp else acc.no_sync(sess.wrapped), acc.autocast():
            extra = {"uncond": cache.cond(torch.full((len(x),), empty)).to(acc.device)} if sess.guided_ref else {}
            out: LossOut = sess.objective(sess.net, x, cond, **extra)
            acc.backward(out.loss / tr.grad_accum)
        loss_sum += float(out.loss.detach()) / tr.grad_accum
        for k, v in out.terms.items():
            terms_sum[k] = terms_sum.get(k, 0.0) + float(v) / tr.grad_accum
    if world > 1:  # the logged loss is the mean over ranks (a NaN on one rank reaches all: same decision everywhere)
        keys = list(terms_sum)
        vals = _mean_over_ranks(acc, [loss_sum] + [terms_sum[k] for k in keys])
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


# --------------------------------------------------------------------------------------------------------------
# logging


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class MetricsLog:
    """``RUN/metrics.jsonl`` (one JSON object per logged step) and optionally tensorboard events, on rank 0."""

    def __init__(self, sess: Session) -> None:
        self.sess = sess
        self.path = sess.run / "metrics.jsonl"
        self.writer = None
        if sess.main and sess.recipe.train.log_with == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(sess.run / "tensorboard"), purge_step=sess.counter.step + 1)

    def truncate_after(self, step: int) -> None:
        """Drop rows past ``step`` (a run killed after logging but before its next checkpoint): resumed runs
        append exactly the rows an uninterrupted run would have."""
        if not self.sess.main or not self.path.is_file():
            return
        rows = self.path.read_text().splitlines()
        keep = [r for r in rows if r.strip() and json.loads(r).get("step", 0) <= step]
        if len(keep) != len(rows):
            write_text(self.path, "".join(r + "\n" for r in keep))

    def record(self, out: StepOut) -> dict:
        sess = self.sess
        sh = sess.shift
        rec = {
            "step": out.step,
            "loss": out.loss,
            **{f"loss/{k}": v for k, v in out.terms.items()},
            "grad_norm": out.grad_norm,
            "lr": sess.sched.get_last_lr()[0],
            "step_time": out.seconds,
            "samples_per_s": sess.global_batch / out.seconds,
        }
        if sh.learnable:
            rec["shift/a"] = float(sh.a.detach().float().mean())
            rec["shift/b"] = float(sh.b.detach().float().mean())
        if sess.recipe.train.skip_nonfinite:
            rec["skipped"] = sess.counter.skipped
            rec["skipped_in_a_row"] = sess.counter.streak
        peaks = _gather(sess.acc, peak_memory_mb(sess.acc.device))  # every rank takes part
        rec["peak_mem_mb"] = max(peaks)
        if len(peaks) > 1:
            rec.update({f"peak_mem_mb/rank{r}": v for r, v in enumerate(peaks)})
        return rec

    def write(self, rec: dict) -> None:
        if not self.sess.main:
            return
        # NaN/inf (a skipped step's grad norm) as null: metrics.jsonl stays strict JSON
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.writer is not None:
            for k, v in clean.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, rec["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# --------------------------------------------------------------------------------------------------------------
# sample grids


def _sample_rows(recipe: Recipe, cache: LatentCache) -> list[int]:
    prompts = recipe.train.sample_prompts
    if prompts:
        return [cache.prompt_index(p) for p in prompts]  # BadInput (exit 2) for a prompt the cache lacks
    return [i for i, p in enumerate(cache.prompts) if p][:4]


@torch.no_grad()
def sample_grid(sess: Session, step: int) -> Path | None:
    """1-step samples of the current model (the EMA when that is what gets exported), fixed seeds, as
    ``RUN/samples/step-N.png``: one row per prompt, ``train.sample_images`` seeds per row.

    Every rank runs the (tiny) forward on the unwrapped module, with no collective; rank 0 decodes and saves.
    The noise comes from per-image generators, so the training RNG streams are untouched.
    """
    from apexctl.engine.sampler import one_step
    from apexctl.generate import seeded_noise
    from apexctl.images import save_grid

    tr, cache, bb = sess.recipe.train, sess.cache, sess.backbone
    k = tr.sample_images
    rows = [r for r in sess.sample_rows for _ in range(k)]
    seeds = [sess.recipe.sample.seed + j for _ in sess.sample_rows for j in range(k)]
    dtype = next(sess.transformer.parameters()).dtype
    z = seeded_noise(tuple(cache.latents.shape[1:]), seeds).to(sess.acc.device, dtype)
    cond = cache.cond(torch.tensor(rows)).to(sess.acc.device, dtype)
    use_ema = sess.ema is not None and tr.export != "live"
    module = _ShadowForward(sess.transformer, sess.ema.shadow_dict()) if use_ema else sess.transformer
    was_training = sess.transformer.training
    sess.transformer.eval()
    bb.set_forward_module(module)
    try:
        with sess.acc.autocast():
            lat = one_step(bb, z, cond)
    finally:
        bb.set_forward_module(sess.wrapped)
        sess.transformer.train(was_training)
    if not sess.main:
        return None
    images = bb.decode_latents(lat).float().cpu()
    upscale = max(1, 64 // max(images.shape[-1], 1))
    labels = [cache.prompts[r] for r in sess.sample_rows]
    return save_grid(images, sess.run / "samples" / f"step-{step:06d}.png", nrow=k, upscale=upscale, labels=labels)


# --------------------------------------------------------------------------------------------------------------
# export


def export(sess: Session) -> None:
    """LoRA runs: the adapter (diffusers format) to ``lora/``; full runs: a complete model folder to ``model/``.
    With an EMA, ``train.export`` picks which weights go there. Rank 0 writes."""
    recipe, tr = sess.recipe, sess.recipe.train
    lora = recipe.model.lora
    backbone = sess.backbone
    if recipe.hardware.strategy == "fsdp":
        backbone = _gathered_backbone(sess)  # every rank takes part in the gather; rank 0 gets the model
    if not sess.main:
        return
    name = "lora" if lora is not None else "model"
    run, ema = sess.run, sess.ema

    def write(folder: Path) -> None:
        write_export(backbone, recipe, folder, sess.model_dir)

    if ema is None or tr.export == "live":
        write(run / name)
    else:
        if tr.export == "both":
            write(run / f"{name}-live")
        with ema.swapped():
            write(run / name)
    if sess.shift.learnable:
        write_text(run / "shift.json", json.dumps({"a": sess.shift.a.tolist(), "b": sess.shift.b.tolist()}))


def _gathered_backbone(sess: Session):
    """FSDP: the full state dict gathered to rank 0 (torch's full_state_dict, CPU) and loaded into a fresh CPU copy
    of the denoiser (plus the LoRA), which the export then writes. Other ranks return None."""
    from apexctl.engine import fsdp
    from apexctl.models import load_for_recipe

    state = fsdp.full_model_state(sess.transformer)
    if not sess.main:
        return None
    recipe = sess.recipe
    bb = load_for_recipe(recipe.model, sess.model_dir, load_text_encoder=False, load_codec=False)
    make_trainable(bb, recipe.model.lora)
    bb.transformer.load_state_dict(state, strict=True)
    return bb


# --------------------------------------------------------------------------------------------------------------
# the loop


def _lock(acc, run: Path) -> RunLock | None:
    """Rank 0 takes the run folder's lock; every rank learns whether it got it (one message, same exit code)."""
    lock, err = None, None
    if acc.is_main_process:
        try:
            lock = RunLock(run).acquire()
        except BadInput as exc:
            err = str(exc)
    err = _gather(acc, err)[0]
    if err is not None:
        raise BadInput(err)
    if lock is not None and lock.warning:
        print(f"warning: {lock.warning}", file=sys.stderr, flush=True)
    return lock


def train(
    recipe: Recipe,
    *,
    resume: str | None = None,
    until: int | None = None,
    quiet: bool = False,
) -> Path:
    """Train per ``recipe``; returns the run folder. ``resume``: None | "auto" | a checkpoint folder.
    ``until``: stop after this step (checkpointed), to be resumed later."""
    check_optional_packages(recipe)
    acc = make_accelerator(recipe)
    check_world(recipe, acc.num_processes)  # before the lock and any loading: a wrong launch is bad input
    lock = _lock(acc, run_dir(recipe))
    try:
        return _train_locked(recipe, acc, resume=resume, until=until, quiet=quiet)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(recipe: Recipe, acc, *, resume: str | None, until: int | None, quiet: bool) -> Path:
    from apexctl.progress import progress

    sess = setup(recipe, acc)
    resume_from(sess, resume)
    tr, run, counter = recipe.train, sess.run, sess.counter
    log = MetricsLog(sess)
    if sess.main:
        run.mkdir(parents=True, exist_ok=True)
        write_text(run / "recipe.yaml", recipe.dump())
        log.truncate_after(counter.step)

    sess.last_good = ckpt.latest_checkpoint(run)
    stop_at = min(tr.steps, until) if until is not None else tr.steps
    try:
        with _Stop() as stop, progress(quiet or not sess.main) as bar:
            task = bar.add_task(f"{recipe.method.objective}", total=tr.steps, completed=counter.step)
            while counter.step < stop_at:
                out = train_step(sess)
                step = out.step
                if step % tr.log_every == 0 or step == stop_at:
                    log.write(log.record(out))
                if tr.sample_every is not None and (step % tr.sample_every == 0 or step == tr.steps):
                    sample_grid(sess, step)
                desc = (
                    f"{recipe.method.objective} loss {out.loss:.4f} · {sess.global_batch / out.seconds:.0f} samples/s"
                )
                bar.update(task, completed=step, description=desc)
                stop_now = _stop_everywhere(acc, stop.requested)
                if step % tr.checkpoint_every == 0 or step == stop_at or stop_now:
                    sess.last_good = (step, save_checkpoint(sess, step))
                if stop_now:
                    acc.print(
                        f"stopped at step {step} on {stop.signal or 'request'}; checkpoint {sess.last_good[1]}; "
                        f"continue with --resume auto"
                    )
                    return run
    finally:
        log.close()

    if counter.step >= tr.steps:
        export(sess)
    acc.wait_for_everyone()
    return run


def _stop_everywhere(acc, requested: bool) -> bool:
    """A signal may reach only some ranks (e.g. a SIGTERM to rank 0): all ranks stop at the same step."""
    if acc.num_processes == 1:
        return requested
    flag = torch.tensor([1.0 if requested else 0.0], device=acc.device)
    return bool(acc.reduce(flag, reduction="sum").item() > 0)
