"""The launcher's exit, told truly: `python -m tunefleet.distributed.relay accelerate launch ...`.

`accelerate launch` and `torchrun` turn any failed rank into exit code 1 and a table of torch's
(`ChildFailedError`). This runs either launcher in this process, catches that error and reads
which rank failed and how (`verdict`):

* every failed rank asked to be run again (the trainer's EXIT_REQUEUE after a stop signal): that
  code, so the workstation launcher and the SLURM script resume;
* a rank killed by a signal nobody in the run sent (SIGKILL from the kernel's out-of-memory killer,
  SIGSEGV, SIGABRT, ...): one sentence naming the rank, its node, host, pid and the signal, the
  likely cause and the fix, and exit code 128 + the signal, as a shell reports a killed process.
  The other ranks, stopped by the launcher after it (SIGTERM), are not the cause;
* a rank that failed with an error of its own: its exit code (it printed its own error).

The workstation launcher (`command.build_launch_command`) and the SLURM script's node command
(`slurm/sbatch.py`) both start the launcher through here. Imports torch's elastic errors only.
"""

from __future__ import annotations

import runpy
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tunefleet.launch.core.layout import EXIT_REQUEUE

LAUNCHERS = {"accelerate": "accelerate.commands.accelerate_cli", "torchrun": "torch.distributed.run"}
"""The first word after the module -> the launcher's module, run as `__main__`."""

NODE_RANK_FLAGS = ("--machine_rank", "--node_rank", "--node-rank")
"""How accelerate and torchrun are told this machine's node rank (the relay names it)."""


@dataclass(frozen=True)
class Failure:
    """One failed rank as the launcher saw it (torch's ProcessFailure, reduced)."""

    rank: int
    local_rank: int
    pid: int
    exitcode: int
    """Negative: killed by signal -exitcode."""
    timestamp: float


@dataclass(frozen=True)
class Verdict:
    code: int
    message: str | None = None
    """Printed to stderr (None: the failed rank printed its own error)."""


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _hint(number: int, host: str) -> str:
    if number == signal.SIGKILL:
        return (
            "a SIGKILL nobody in the run sent is usually the kernel's out-of-memory killer (see "
            f"`dmesg -T | grep -i -e oom -e killed` on {host}): lower batch.micro_batch_size or data.max_length, "
            "set train.gradient_checkpointing=true, or shard with parallel.strategy=fsdp / deepspeed-zero3 "
            "(`tunefleet plan --compare` shows what fits)"
        )
    if number in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL):
        return "a crash in native code (torch, a CUDA library or a driver): the lines above show where it was"
    if number == signal.SIGTERM:
        return (
            "it was stopped before it could checkpoint (during start-up or the final save): see who sent "
            "SIGTERM (a scheduler, a time limit, `kill`)"
        )
    return "see who sent it"


def verdict(failures: Sequence[Failure], *, node_rank: str, host: str) -> Verdict:
    """The launcher's exit code and what to tell the user, from its failed ranks."""
    if not failures:
        return Verdict(1)
    if {f.exitcode for f in failures} == {EXIT_REQUEUE}:
        return Verdict(EXIT_REQUEUE)
    killed = [f for f in failures if f.exitcode < 0 and -f.exitcode != signal.SIGTERM]
    own = [f for f in failures if f.exitcode > 0]
    if not killed and own:
        first = min(own, key=lambda f: (f.timestamp, f.rank))
        return Verdict(first.exitcode)
    first = min(killed or failures, key=lambda f: (f.timestamp, f.rank))
    number = -first.exitcode
    others = [f.rank for f in failures if f is not first]
    after = f"; the launcher then stopped rank(s) {', '.join(map(str, sorted(others)))}" if others else ""
    message = (
        f"error: rank {first.rank} (node {node_rank}, local rank {first.local_rank}, pid {first.pid} on "
        f"{host}) was killed by {_signal_name(number)} (signal {number}){after}.\n"
        f"  fix: {_hint(number, host)}; the same command resumes from the newest checkpoint"
    )
    return Verdict(128 + number, message)


def node_rank(argv: Sequence[str]) -> str:
    """This machine's node rank as the launcher's arguments give it ("0" on one machine)."""
    for i, word in enumerate(argv):
        for flag in NODE_RANK_FLAGS:
            if word == flag and i + 1 < len(argv):
                return argv[i + 1]
            if word.startswith(flag + "="):
                return word.split("=", 1)[1]
    return "0"


def failures_of(err: object) -> list[Failure]:
    found: Mapping[int, object] = getattr(err, "failures", {}) or {}
    return [
        Failure(
            rank=int(rank),
            local_rank=int(getattr(f, "local_rank", -1)),
            pid=int(getattr(f, "pid", -1)),
            exitcode=int(getattr(f, "exitcode", 1)),
            timestamp=float(getattr(f, "timestamp", 0)),
        )
        for rank, f in found.items()
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in LAUNCHERS:
        print(
            f"usage: python -m tunefleet.distributed.relay {{{'|'.join(LAUNCHERS)}}} ARGS...", file=sys.stderr
        )
        return 2
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    sys.argv = args
    try:
        runpy.run_module(LAUNCHERS[args[0]], run_name="__main__", alter_sys=True)
    except ChildFailedError as err:
        told = verdict(failures_of(err), node_rank=node_rank(args), host=socket.gethostname())
        if told.message:
            print(told.message, file=sys.stderr, flush=True)
        return told.code
    except SignalException as err:  # the launcher itself was sent TERM (preemption, scancel)
        return 128 + int(err.sigval)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
