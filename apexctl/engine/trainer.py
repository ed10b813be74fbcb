"""The training loop on accelerate (DESIGN §6): one process here, DDP/FSDP through ``accelerate launch``.

Per optimizer step: ``grad_accum`` micro-batches from the latent cache → objective → backward → clip → AdamW →
LR schedule → EMA. Checkpoints hold everything an exact resume needs (weights, optimizer, LR schedule, EMA,
shift, RNG of every rank, data position, step) and are written to a temporary folder, then renamed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from apexctl.atomic import write_text
from apexctl.data.cache import LatentCache, PairSampler
from apexctl.engine import checkpoint as ckpt
from apexctl.engine.ema import EMA
from apexctl.engine.flow import TimeSampler
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
from apexctl.lora import adapters_disabled, add_lora, check_lora_formats
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


def build_objective(recipe: Recipe, reference=None):
    """``(net, x, cond) -> LossOut`` for the recipe's objective."""
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
    )
    return partial(apex, cfg=cfg, reference=reference)


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
    step: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class _Stop:
    """SIGINT/SIGTERM: finish the current step, checkpoint, exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
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


def run_dir(recipe: Recipe) -> Path:
    return Path(recipe.output.dir)


def train(
    recipe: Recipe,
    *,
    resume: str | None = None,
    until: int | None = None,
    quiet: bool = False,
) -> Path:
    """Train per ``recipe``; returns the run folder. ``resume``: None | "auto" | a checkpoint folder.
    ``until``: stop after this step (checkpointed), to be resumed later."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    from apexctl.data.prepare import cache_identity
    from apexctl.models import load_for_recipe, resolve_model_path

    hw, tr, m = recipe.hardware, recipe.train, recipe.method
    if hw.threads:
        torch.set_num_threads(hw.threads)
    use_cpu = hw.device == "cpu" or (hw.device == "auto" and not torch.cuda.is_available())
    if hw.device == "cuda" and not torch.cuda.is_available():
        raise BadInput("hardware.device = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    precision = hw.precision if hw.precision != "auto" else ("fp32" if use_cpu else "bf16")
    kwargs = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    fsdp_plugin = None
    if hw.strategy == "fsdp":
        from accelerate import FullyShardedDataParallelPlugin

        fsdp_plugin = FullyShardedDataParallelPlugin(cpu_offload=hw.offload)
    # accelerate keeps precision/plugins in a process-wide singleton; a second training in the same process
    # (notebooks, the test suite) with other settings would be refused. The process group (PartialState) is kept.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    acc = Accelerator(
        cpu=use_cpu,
        mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision],
        kwargs_handlers=kwargs,
        fsdp_plugin=fsdp_plugin,
    )
    world = acc.num_processes
    if hw.processes != world:
        raise BadInput(
            f"hardware.processes = {hw.processes} but this run has {world} process(es); launch with "
            f"`accelerate launch --num_processes {hw.processes} -m apexctl distill RECIPE` or set hardware.processes={world}"
        )
    global_batch = tr.micro_batch * tr.grad_accum * world
    if tr.global_batch is not None and tr.global_batch != global_batch:
        raise BadInput(
            f"train.global_batch = {tr.global_batch} but micro_batch × grad_accum × processes = "
            f"{tr.micro_batch} × {tr.grad_accum} × {world} = {global_batch}"
        )
    set_seed(tr.seed)

    run = run_dir(recipe)
    model_dir = resolve_model_path(recipe.model.path)
    backbone = load_for_recipe(recipe.model, model_dir, load_text_encoder=False, load_codec=False)
    cache = LatentCache.open(recipe.data.cache_dir)
    want = cache_identity(recipe, model_dir, backbone.family)
    cache.check(want)

    lora = recipe.model.lora
    transformer = backbone.transformer
    if lora is not None:  # frozen base in its dtype, fp32 adapter
        check_lora_formats(backbone, recipe.output.lora_formats)
        add_lora(
            transformer,
            rank=lora.rank,
            alpha=lora.alpha,
            targets=lora.targets or backbone.lora_targets,
            dropout=lora.dropout,
            init=lora.init,
        )
    else:
        transformer.float().requires_grad_(True)  # fp32 master weights; autocast gives bf16 compute on GPU
    transformer.train()
    if hw.gradient_checkpointing and hasattr(transformer, "enable_gradient_checkpointing"):
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
    named = [(n, p) for n, p in transformer.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    groups = [{"params": params, "lr": tr.lr}]
    if s.learnable:
        groups.append({"params": list(shift.parameters()), "lr": tr.lr * s.lr_scale, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=tr.lr, betas=tr.betas, weight_decay=tr.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        partial(lr_lambda, warmup=tr.warmup_steps, total=tr.steps, schedule=tr.lr_schedule, min_ratio=tr.lr_min_ratio),
    )
    wrapped, opt = acc.prepare(transformer, opt)
    backbone.set_forward_module(wrapped)
    shift.to(acc.device)
    backbone.to(acc.device)

    ema_decay = tr.ema_decay if tr.ema_decay is not None else (0.99 if m.reference == "ema" else None)
    ema = EMA(named, ema_decay) if ema_decay is not None else None
    net = Net(backbone, shift)
    reference = None
    if m.reference == "ema":

        def reference(u, t, c, _net=net, _ema=ema, _live=wrapped):
            shadow = _ema.shadow_dict()
            backbone.set_forward_module(_ShadowForward(transformer, shadow))
            try:
                with torch.no_grad():
                    return _net(u, t, c)
            finally:
                backbone.set_forward_module(_live)

    elif m.reference == "base":

        def reference(u, t, c, _net=net):
            with torch.no_grad(), adapters_disabled(transformer):
                return _net(u, t, c)

    objective = build_objective(recipe, reference)

    sampler = PairSampler(len(cache), seed=tr.seed, cond_dropout=recipe.data.cond_dropout, buckets=cache.pair_buckets)
    guided_ref = m.objective == "apex" and m.reference_guidance > 1.0
    empty = cache.prompt_index("") if (recipe.data.cond_dropout > 0 or guided_ref) else None
    counter = StepCounter()
    for obj in (sched, sampler, counter, shift) + ((ema,) if ema is not None else ()):
        acc.register_for_checkpointing(obj)

    if resume:
        found = ckpt.latest_checkpoint(run) if resume == "auto" else None
        if resume != "auto":
            p = Path(resume)
            if not (p / ckpt.COMPLETE).is_file():
                raise BadInput(f"--resume {resume}: not a complete checkpoint folder")
            found = (0, p)
        if found is not None:
            acc.load_state(str(found[1]))
            acc.print(f"resumed from {found[1]} at step {counter.step}")
        elif acc.is_main_process:
            acc.print("--resume auto: no complete checkpoint yet, starting from step 0")

    if acc.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        write_text(run / "recipe.yaml", recipe.dump())
    metrics_path = run / "metrics.jsonl"

    def save_checkpoint(step: int) -> Path:
        final = ckpt.step_dir(run, step)
        tmp = final.with_name(final.name + ".tmp")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)  # every rank writes its own RNG state
        acc.wait_for_everyone()
        if acc.is_main_process:
            write_text(tmp / ckpt.COMPLETE, json.dumps({"step": step}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            ckpt.prune(run, tr.keep_last)
        acc.wait_for_everyone()
        return final

    last_good = ckpt.latest_checkpoint(run)
    stop_at = min(tr.steps, until) if until is not None else tr.steps
    from apexctl.progress import progress

    rank, mb = acc.process_index, tr.micro_batch
    with _Stop() as stop, progress(quiet or not acc.is_main_process) as bar:
        task = bar.add_task(f"{m.objective}", total=tr.steps, completed=counter.step)
        while counter.step < stop_at:
            t0 = time.perf_counter()
            terms_sum: dict[str, float] = {}
            loss_sum = 0.0
            for micro in range(tr.grad_accum):
                idx, drop = sampler.next(mb * world)
                idx, drop = idx[rank::world], drop[rank::world]
                x, cond = cache.batch(idx, drop, empty)
                x, cond = x.to(acc.device), cond.to(acc.device)
                sync = micro == tr.grad_accum - 1
                with nullcontext() if sync else acc.no_sync(wrapped), acc.autocast():
                    extra = {"uncond": cache.cond(torch.full((len(x),), empty)).to(acc.device)} if guided_ref else {}
                    out: LossOut = objective(net, x, cond, **extra)
                    acc.backward(out.loss / tr.grad_accum)
                loss_sum += float(out.loss.detach()) / tr.grad_accum
                for k, v in out.terms.items():
                    terms_sum[k] = terms_sum.get(k, 0.0) + float(v) / tr.grad_accum
            step = counter.step + 1
            if not math.isfinite(loss_sum):
                where = f"last good checkpoint: {last_good[1]}" if last_good else "no checkpoint written yet"
                terms = ", ".join(f"{k}={v:.4g}" for k, v in terms_sum.items())
                raise ApexError(f"non-finite loss at step {step} ({terms}); stopping. {where}")
            all_params = params + (list(shift.parameters()) if s.learnable else [])
            if tr.max_grad_norm is not None:
                gnorm = float(acc.clip_grad_norm_(all_params, tr.max_grad_norm))
            else:
                gnorm = float(torch.norm(torch.stack([p.grad.norm() for p in all_params if p.grad is not None])))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
            counter.step = step
            dt = time.perf_counter() - t0
            if acc.is_main_process and (step % tr.log_every == 0 or step == stop_at):
                rec = {
                    "step": step,
                    "loss": loss_sum,
                    **{f"loss/{k}": v for k, v in terms_sum.items()},
                    "grad_norm": gnorm,
                    "lr": sched.get_last_lr()[0],
                    "step_time": dt,
                    "samples_per_s": global_batch / dt,
                }
                if s.learnable:
                    rec["shift/a"] = float(shift.a.detach().float().mean())
                    rec["shift/b"] = float(shift.b.detach().float().mean())
                if torch.cuda.is_available():
                    rec["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            bar.update(task, completed=step, description=f"{m.objective} loss {loss_sum:.4f}")
            if step % tr.checkpoint_every == 0 or step == stop_at or stop.requested:
                last_good = (step, save_checkpoint(step))
            if stop.requested:
                acc.print(f"stopped at step {step} on request; resume with --resume auto")
                return run

    if counter.step >= tr.steps and acc.is_main_process:
        # LoRA runs export the adapter (diffusers format) to lora/, full runs a complete model folder to model/
        name = "lora" if lora is not None else "model"

        if ema is None or tr.export == "live":
            write_export(backbone, recipe, run / name, model_dir)
        else:
            if tr.export == "both":
                write_export(backbone, recipe, run / f"{name}-live", model_dir)
            with ema.swapped():
                write_export(backbone, recipe, run / name, model_dir)
        if s.learnable:
            write_text(run / "shift.json", json.dumps({"a": shift.a.tolist(), "b": shift.b.tolist()}))
    acc.wait_for_everyone()
    return run
