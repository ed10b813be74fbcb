"""The processes of a launched job for the stages around training: ``prepare``, eval generation, ``sample``.

Under ``accelerate launch`` (or ``--launch N``, which runs it) every process runs the same command; ``job_ranks``
joins them through accelerate's ``PartialState`` (NCCL on GPUs, gloo on CPU) and gives each its device
(``cuda:LOCAL_RANK``, or the CPU). Work is cut into units whose boundaries never depend on the number of
processes (a cache shard, a generation batch); rank r takes units r, r + N, r + 2N, … . So what a unit computes —
same inputs, same batch — is the same for N = 1, 2 or 16, and a rerun after a kill redoes only unfinished units.
Outside a launched job (``WORLD_SIZE`` unset or 1) nothing is initialised: one process, every unit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch

from apexctl.errors import BadInput

T = TypeVar("T")
# A rank that finishes its share early waits at a barrier for the slowest one: with teacher synthesis that can be
# one whole shard of 100-forward images (hours), far past torch's default 30-minute collective timeout.
BARRIER_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class Ranks:
    """Rank ``rank`` of ``world`` processes, and the device this rank computes on."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes what all ranks share (manifests, summaries) and prints."""
        return self.rank == 0

    def share(self, units: list[T]) -> list[T]:
        """This rank's units: ``units[rank::world]`` (round robin, so a 1-process run takes every unit)."""
        return units[self.rank :: self.world]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """``value`` of every rank (any picklable object), in rank order, on every rank."""
        return gather_objects(value, self.world)


def gather_objects(value: Any, world: int) -> list[Any]:
    """``value`` of each of the ``world`` ranks of the default process group, in rank order, on every rank."""
    if world == 1:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, value)
    return out


def launched_world() -> int:
    """The number of processes of the launched job this process belongs to (1 outside one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def job_ranks(device: str | None = "auto") -> Ranks:
    """This process's place in the job, joining the process group when launched.

    ``device``: ``auto`` (the rank's GPU when CUDA is visible, else the CPU), ``cuda`` or ``cpu``; None = auto.
    """
    device = device or "auto"
    if device not in ("auto", "cuda", "cpu"):
        raise BadInput(f"device {device!r}: allowed auto, cuda, cpu")
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise BadInput("device 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    use_cpu = device == "cpu" or not cuda
    if launched_world() == 1:
        return Ranks(device=torch.device("cpu") if use_cpu else torch.device("cuda", torch.cuda.current_device()))
    from accelerate import PartialState

    state = PartialState(cpu=use_cpu, timeout=BARRIER_TIMEOUT)
    return Ranks(rank=state.process_index, world=state.num_processes, device=torch.device(state.device))
