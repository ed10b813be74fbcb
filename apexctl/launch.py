"""``--launch N``: re-run the same ``apexctl`` command under ``accelerate launch`` on N local processes.

The command is ``python -m accelerate.commands.launch --multi_gpu --num_processes N --num_machines 1
--mixed_precision no --dynamo_backend no --main_process_port P -m apexctl ARGS``, where ARGS is this command's own
argument list without ``--launch N`` (``distill`` also gets ``--set hardware.processes=N``). ``--multi_gpu`` is
what gives several processes on CPU too (``--cpu`` alone starts one); the commands build their process group with
``cpu=True`` there, so the processes talk over gloo. Precision comes from the recipe (the launcher's ``no`` is only
its default). Multi-node runs use ``accelerate launch`` directly (README).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from apexctl.errors import ApexError, BadInput

# the argument list `apexctl` was started with (set by apexctl.cli.main): what --launch re-runs on every rank
ARGV: list[str] | None = None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def without_launch(argv: list[str]) -> list[str]:
    """``argv`` with its ``--launch N`` / ``--launch=N`` removed."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--launch":
            skip = True
        elif not a.startswith("--launch="):
            out.append(a)
    return out


def launch_command(n: int, args: list[str], port: int | None = None) -> list[str]:
    """The ``accelerate launch`` command line that runs ``apexctl <args>`` on ``n`` processes."""
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
        *args,
    ]


def relaunch(n: int, *, run: Path | None = None, extra: list[str] | None = None, echo=print) -> int:
    """Run this ``apexctl`` command (``ARGV`` without ``--launch``, then ``extra``) on ``n`` local processes;
    returns the launcher's exit status.

    ``run``: the run folder of a ``distill``; checked first (exit 2, no processes started) that no live run holds
    it, and a stop on request is told apart from a failure by its checkpoint.
    """
    if n < 2:
        raise BadInput(f"--launch {n}: give 2 or more processes (1 process needs no launcher)")
    if run is not None:
        from apexctl.training.lock import check_free

        check_free(run)
    if ARGV is None:
        raise ApexError("--launch needs the `apexctl` command line (apexctl.cli.main), not a direct call of the app")
    cmd = launch_command(n, [*without_launch(ARGV), *(extra or [])])
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
    if rc != 0 and signalled and run is not None:
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
