"""``apexctl distill RECIPE --launch N``: re-run the same command under ``accelerate launch`` on N local processes.

The command is ``python -m accelerate.commands.launch --multi_gpu --num_processes N --num_machines 1
--mixed_precision no --dynamo_backend no --main_process_port P -m apexctl distill RECIPE ... --set
hardware.processes=N``. ``--multi_gpu`` is what gives several processes on CPU too (``--cpu`` alone starts one); the
trainer builds ``Accelerator(cpu=True)`` there, so the processes talk over gloo. Precision comes from the recipe
(the launcher's ``no`` is only its default). Multi-node runs use ``accelerate launch`` directly (README).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from apexctl.errors import BadInput


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_command(n: int, distill_args: list[str], port: int | None = None) -> list[str]:
    """The ``accelerate launch`` command line that runs ``apexctl distill <distill_args>`` on ``n`` processes."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(n),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port or free_port()),
        "-m",
        "apexctl",
        "distill",
        *distill_args,
        "--set",
        f"hardware.processes={n}",
    ]


def relaunch(n: int, distill_args: list[str], run: Path, *, echo=print) -> int:
    """Run ``apexctl distill`` on ``n`` local processes; returns the launcher's exit status.

    Checked here first (exit 2, no processes started): the run folder is not locked by a live run.
    """
    from apexctl.training.lock import check_free

    if n < 2:
        raise BadInput(f"--launch {n}: give 2 or more processes (1 process needs no launcher)")
    check_free(run)
    cmd = launch_command(n, distill_args)
    echo(f"launching {n} processes: accelerate launch {' '.join(cmd[3:])}")
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.Popen(cmd, env=env)
    signalled: list[float] = []

    def forward(signum, _frame) -> None:
        signalled.append(time.time())
        proc.send_signal(signum)

    # SIGINT/SIGTERM to this process go to the launcher, which passes them on to every rank: they checkpoint and stop
    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if rc != 0 and signalled:
        # torch's launcher exits 1 after passing a signal on, even when every rank stopped cleanly: the ranks'
        # checkpoint, written after the signal, is what says whether they did
        from apexctl.training import checkpoint as ckpt

        latest = ckpt.latest_checkpoint(run)
        if latest is not None and (latest[1] / ckpt.COMPLETE).stat().st_mtime >= signalled[0]:
            echo(f"stopped on request; checkpoint {latest[1]}; continue with --resume auto")
            return 0
    return rc


def is_rank_zero() -> bool:
    """True in a single process and on global rank 0 of a launched job (before any Accelerator exists)."""
    return os.environ.get("RANK", "0") == "0"
