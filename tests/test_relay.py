"""The launcher relay (distributed/relay.py): a failed rank told by rank, node and signal, with the
exit code that says so; the requeue code passed through. Real torchrun and accelerate launches of
a two-rank script where rank 1 is killed (as the kernel's out-of-memory killer would), then the
verdict's rules one by one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tunefleet.distributed.relay import Failure, node_rank, verdict
from tunefleet.launch.core.layout import EXIT_REQUEUE

VICTIM = """import os, signal, sys, time
if int(os.environ["RANK"]) == 1:
    time.sleep(1)
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(120)
"""


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_a_rank_killed_by_sigkill_is_named_and_the_exit_code_says_so(launcher: str, tmp_path: Path) -> None:
    script = tmp_path / "victim.py"
    script.write_text(VICTIM)
    if launcher == "torchrun":
        args = ["torchrun", "--nproc_per_node", "2", "--master_port", _port(), str(script)]
    else:
        args = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
        args += [
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            _port(),
            str(script),
        ]
    env = dict(os.environ, ACCELERATE_USE_CPU="true")
    proc = subprocess.run(
        [sys.executable, "-m", "tunefleet.distributed.relay", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 128 + signal.SIGKILL, proc.stderr[-3000:]
    assert "error: rank 1 (node 0, local rank 1, pid " in proc.stderr
    assert "was killed by SIGKILL (signal 9); the launcher then stopped rank(s) 0" in proc.stderr
    assert "out-of-memory killer" in proc.stderr and "resumes from the newest checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


def _failure(rank: int, exitcode: int, t: float = 0.0) -> Failure:
    return Failure(rank=rank, local_rank=rank % 2, pid=100 + rank, exitcode=exitcode, timestamp=t)


def test_verdicts() -> None:
    told = verdict([_failure(0, EXIT_REQUEUE), _failure(1, EXIT_REQUEUE)], node_rank="1", host="h")
    assert told.code == EXIT_REQUEUE and told.message is None  # a stop signal: run again
    # the killed rank is the cause, not the ranks the launcher stopped after it (SIGTERM), whatever
    # the order torch lists them in
    told = verdict([_failure(2, -signal.SIGTERM), _failure(3, -signal.SIGKILL)], node_rank="1", host="h")
    assert told.code == 137 and told.message is not None
    assert told.message.startswith("error: rank 3 (node 1, local rank 1, pid 103 on h) was killed by SIGKILL")
    assert "dmesg" in told.message
    told = verdict([_failure(0, -signal.SIGSEGV)], node_rank="0", host="h")
    assert told.code == 139 and told.message is not None and "native code" in told.message
    # a rank's own error: its exit code (it printed its error), not 1
    told = verdict([_failure(0, -signal.SIGTERM), _failure(1, 3)], node_rank="0", host="h")
    assert told.code == 3 and told.message is None
    told = verdict([_failure(0, 1, t=5), _failure(1, 2, t=4)], node_rank="0", host="h")
    assert told.code == 2
    told = verdict([_failure(0, -signal.SIGTERM)], node_rank="0", host="h")
    assert told.code == 143 and told.message is not None and "before it could checkpoint" in told.message
    assert verdict([], node_rank="0", host="h").code == 1


def test_node_rank_from_the_launcher_arguments() -> None:
    assert node_rank(["accelerate", "launch", "--machine_rank", "3", "x.py"]) == "3"
    assert node_rank(["torchrun", "--node_rank=2", "x.py"]) == "2"
    assert node_rank(["torchrun", "--nproc_per_node", "2", "x.py"]) == "0"


def test_usage_without_a_launcher() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tunefleet.distributed.relay", "mpirun"], capture_output=True, text=True
    )
    assert (
        proc.returncode == 2
        and "usage: python -m tunefleet.distributed.relay {accelerate|torchrun}" in proc.stderr
    )
