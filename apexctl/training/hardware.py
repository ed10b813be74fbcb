"""The Accelerator for the recipe's ``hardware`` section, the world-size checks, and the few collectives the loop
needs (every one is a no-op on a single process)."""

from __future__ import annotations

import torch

from apexctl.errors import BadInput
from apexctl.recipe import Recipe


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
    if hw.strategy == "fsdp" and recipe.ema_decay is not None:
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


def gather(acc, value) -> list:
    """``value`` of every rank (any picklable object), in rank order, on every rank."""
    from apexctl.ranks import gather_objects

    return gather_objects(value, acc.num_processes)


def mean_over_ranks(acc, values: list[float]) -> list[float]:
    if acc.num_processes == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=acc.device)
    return (acc.reduce(t, reduction="sum") / acc.num_processes).tolist()


@torch.no_grad()
def broadcast_from_rank0(acc, module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers of ``module`` on every rank (what DDP does for the module it wraps; for the
    trained parts outside it, initialised from rank-specific RNG streams)."""
    if acc.num_processes == 1:
        return
    import torch.distributed as dist

    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=0)


def stop_everywhere(acc, requested: bool) -> bool:
    """A signal may reach only some ranks (e.g. a SIGTERM to rank 0): all ranks stop at the same step."""
    if acc.num_processes == 1:
        return requested
    flag = torch.tensor([1.0 if requested else 0.0], device=acc.device)
    return bool(acc.reduce(flag, reduction="sum").item() > 0)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
