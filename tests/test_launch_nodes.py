"""`tunefleet launch --nnodes`: several machines without a scheduler, tested as two launchers on
loopback, each one "machine" with one gloo process.

The two nodes meet first (launch/join.py), then accelerate's static rendezvous forms one world of
two ranks; the losses must equal one process with the same global batch. A node that never joins,
a node that runs another recipe, and SIGUSR1 (both machines exit 75) are tested with the same real
launchers.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.launched import BASE, DEMO, TOL, env, losses, max_diff, sets
from tunefleet.launch import join
from tunefleet.launch.core import checkpoints as ckpt
from tunefleet.launch.core.errors import TunefleetError

TIMEOUT_S = 480


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_argv(out: Path, rank: int, port: int, *overrides: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tunefleet.launch.cli",
        "launch",
        str(DEMO),
        "--nproc",
        "1",
        "--nnodes",
        "2",
        "--node-rank",
        str(rank),
        "--main-address",
        "127.0.0.1",
        "--main-port",
        str(port),
        *sets(f"output_dir={out}", *overrides),
        *extra,
    ]


def start_nodes(
    out: Path, *overrides: str, node1: tuple[str, ...] = (), extra: tuple[str, ...] = ()
) -> list[subprocess.Popen]:
    """Node 1 first (it waits for node 0, as a machine started early would), then node 0."""
    port = free_port()
    procs = []
    for rank, more in ((1, node1), (0, ())):
        log = out.parent / f"{out.name}-node{rank}.log"
        with log.open("w") as f:
            procs.append(
                subprocess.Popen(
                    node_argv(out, rank, port, *overrides, *more, extra=extra),
                    env=env(),
                    stdout=f,
                    stderr=subprocess.STDOUT,
                )
            )
        time.sleep(1.0)
    return procs[::-1]  # [node 0, node 1]


def wait_all(procs: list[subprocess.Popen], out: Path) -> list[int]:
    try:
        return [p.wait(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def log(out: Path, rank: int) -> str:
    return (out.parent / f"{out.name}-node{rank}.log").read_text()


@pytest.mark.slow
def test_two_machines_train_like_one_process(tmp_path: Path) -> None:
    from tunefleet.distributed import sft
    from tunefleet.launch.core import recipe as R

    out = tmp_path / "nodes"
    procs = start_nodes(out, "parallel.strategy=ddp")
    ref = tmp_path / "one-process"
    assert sft.run(R.load(DEMO, [*BASE, f"output_dir={ref}"])) == 0  # meanwhile, in this process
    codes = wait_all(procs, out)
    assert codes == [0, 0], log(out, 0)[-4000:] + log(out, 1)[-4000:]
    diff = max_diff(losses(out), losses(ref))
    print(f"\n2 machines x 1 process vs 1 process: max |loss difference| = {diff:.2e}")
    assert diff <= TOL
    effect = json.loads((out / "plan.json").read_text())["in_effect"]
    assert (effect["distributed_type"], effect["world_size"], effect["backend"]) == ("MULTI_CPU", 2, "gloo")
    assert ckpt.read_manifest(out / "checkpoint-4").world_size == 2
    for rank in (0, 1):
        config = (out / "launch" / f"node-{rank}" / "accelerate.yaml").read_text()
        assert f"machine_rank: {rank}" in config and "num_machines: 2" in config, config
        assert "rdzv_backend: static" in config
        assert "all 2 nodes are here, starting" in log(out, rank)
    command = (out / "launch" / "node-1" / "command.txt").read_text().splitlines()[-1]
    assert "--num_machines 2 --num_processes 2 --machine_rank 1 --main_process_ip 127.0.0.1" in command


@pytest.mark.slow
def test_sigusr1_on_one_machine_stops_both_with_75(tmp_path: Path) -> None:
    """The ranks agree on a stop signal at the step boundary: SIGUSR1 to node 0's launcher
    checkpoints the whole world, and both machines' launchers exit 75."""
    out = tmp_path / "stopped"
    procs = start_nodes(
        out, "parallel.strategy=ddp", "train.max_steps=200", "train.save_steps=1", "checkpoint.keep_last=1"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while ckpt.latest(out) is None:
            assert all(p.poll() is None for p in procs), log(out, 0)[-4000:] + log(out, 1)[-4000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        procs[0].send_signal(signal.SIGUSR1)
    finally:
        codes = wait_all(procs, out)
    assert codes == [75, 75], log(out, 0)[-4000:] + log(out, 1)[-4000:]
    newest = ckpt.latest(out)
    assert newest is not None and ckpt.step_of(newest) < 200 and not (out / "final").exists()


def test_a_machine_that_never_joins_is_named(tmp_path: Path) -> None:
    out = tmp_path / "alone"
    port = free_port()
    started = time.monotonic()
    node0 = subprocess.run(
        node_argv(out, 0, port, extra=("--join-timeout", "3")),
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    took_s = time.monotonic() - started
    assert node0.returncode == 2, node0.stdout + node0.stderr
    assert "node(s) 1 of 2 did not join within 3 s (node 0 waits on port" in node0.stderr
    assert "--node-rank R --main-address 127.0.0.1" in node0.stderr and "--join-timeout" in node0.stderr
    assert not out.exists(), "files were written for a run that never started"
    node1 = subprocess.run(
        node_argv(out, 1, port, extra=("--join-timeout", "3")),
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert node1.returncode == 2, node1.stdout + node1.stderr
    assert f"node 1: node 0 at 127.0.0.1:{port} did not answer within 3 s" in node1.stderr
    assert "start node 0 (`--node-rank 0`)" in node1.stderr
    print(f"\na lone node 0 gave up after {took_s:.1f} s (--join-timeout 3, imports included)")


def test_machines_that_would_run_different_jobs_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "mismatch"
    procs = start_nodes(out, node1=("peft.dropout=0.1",), extra=("--join-timeout", "120"))
    codes = wait_all(procs, out)
    assert codes == [2, 2], log(out, 0) + log(out, 1)
    assert "node 1 would run another job: peft.dropout: 0.0 on node 0, 0.1 on node 1" in log(out, 0)
    assert "node 0 refused this node: node 1 would run another job" in log(out, 1)
    assert not (out / "launch").exists() and not (out / "metrics.jsonl").exists()


def test_machines_that_name_another_address_or_see_other_data_are_refused(tmp_path: Path) -> None:
    """Node 1 names node 0 by another address (it still reaches it: torch's rendezvous would then
    hang) and reads a data file that has other bytes by the time node 0 reads it (node-local copies
    that differ): both named at the join, nothing started."""
    out, data = tmp_path / "apart", tmp_path / "train.jsonl"
    rows = (DEMO.parent / "data" / "alpaca_demo.jsonl").read_text().splitlines(keepends=True)
    data.write_text("".join(rows[:40]))
    port = free_port()
    argv = [
        node_argv(out, rank, port, f"data.path={data}", extra=("--join-timeout", "120")) for rank in (0, 1)
    ]
    argv[1][argv[1].index("--main-address") + 1] = "localhost"
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    with logs[1].open("w") as f:
        node1 = subprocess.Popen(argv[1], env=env(), stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while "joining node 0" not in logs[1].read_text():  # node 1 has read its data
        assert node1.poll() is None and time.monotonic() < deadline, logs[1].read_text()
        time.sleep(0.2)
    data.write_text("".join(rows[40:80]))
    with logs[0].open("w") as f:
        node0 = subprocess.Popen(argv[0], env=env(), stdout=f, stderr=subprocess.STDOUT)
    codes = wait_all([node0, node1], out)
    text = logs[0].read_text()
    assert codes == [2, 2], text + logs[1].read_text()
    assert f"--main-address/--main-port: 127.0.0.1:{port} on node 0, localhost:{port} on node 1" in text
    assert "data: fingerprint " in text and "hold other bytes on that machine" in text
    assert "node 0 refused this node: node 1 would run another job" in logs[1].read_text()
    assert not (out / "launch").exists()


def test_node_options_are_checked_before_anything_starts(tmp_path: Path) -> None:
    def launch(*args: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "tunefleet.launch.cli", "launch", str(DEMO), "--nproc", "1", *args]
        return subprocess.run(
            [*argv, "--set", f"output_dir={tmp_path / 'x'}"],
            env=env(),
            capture_output=True,
            text=True,
            timeout=120,
        )

    missing_port = launch("--nnodes", "2", "--node-rank", "1", "--main-address", "127.0.0.1")
    assert missing_port.returncode == 2 and "--nnodes 2 needs --main-port" in missing_port.stderr
    missing_address = launch("--nnodes", "2", "--main-port", "29500")
    assert missing_address.returncode == 2 and "--nnodes 2 needs --main-address" in missing_address.stderr
    bad_rank = launch("--nnodes", "2", "--node-rank", "2", "--main-address", "h", "--main-port", "29500")
    assert bad_rank.returncode == 2 and "machine_rank 2 is not in 0..1" in bad_rank.stderr
    dry = launch(
        "--nnodes", "2", "--node-rank", "1", "--main-address", "10.0.0.1", "--main-port", "29500", "--dry-run"
    )
    assert dry.returncode == 0, dry.stderr
    assert "2 CPU (gloo) process(es) on 2 machines (this is node 1; node 0 at 10.0.0.1:29500)" in dry.stdout
    assert f"would write {tmp_path / 'x' / 'launch' / 'node-1' / 'accelerate.yaml'}" in dry.stdout
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- the meeting itself


def _member(rank: int, **changes: object) -> join.Member:
    fields: dict = dict(
        node_rank=rank, nodes=2, procs_per_node=1, use_cpu=True, recipe={"peft": {"r": 8}}, start="fresh"
    )
    return join.Member(**{**fields, **changes})


def test_meeting_ignores_strays_and_names_differences() -> None:
    """In one process: a stray connection (a port scan) does not count as a node; node 1 joins;
    node 0 calls `ready` before the go; a node that finds another output directory is refused."""
    port = free_port()
    ready: list[bool] = []
    host = threading.Thread(
        target=join.host,
        args=(_member(0),),
        kwargs=dict(port=port, address="127.0.0.1", timeout_s=60, ready=lambda: ready.append(True)),
    )
    host.start()
    time.sleep(0.5)
    with socket.create_connection(("127.0.0.1", port)) as stray:
        stray.sendall(b"GET / HTTP/1.0\r\n\r\n")
    join.join(_member(1), address="127.0.0.1", port=port, timeout_s=60)  # returns on the go
    host.join(timeout=30)
    assert ready == [True] and not host.is_alive()

    elsewhere = _member(1, start="resume checkpoint-4")
    assert join.differences(_member(0), elsewhere) == [
        "output directory: node 0 finds fresh, node 1 finds resume checkpoint-4 "
        "(is output_dir on storage both mount at the same path?)"
    ]
    assert join.differences(_member(0), _member(1, recipe={"peft": {"r": 16}})) == [
        "peft.r: 8 on node 0, 16 on node 1"
    ]
    assert join.differences(_member(0, data="aa"), _member(1, data="bb"))[0].startswith(
        "data: fingerprint aa on node 0, bb on node 1"
    )
    assert join.differences(_member(0, main_port=1), _member(1, main_port=2)) == [
        "--main-address/--main-port: :1 on node 0, :2 on node 1 (give every node the same address of node 0)"
    ]


def test_node_0_names_a_port_in_use() -> None:
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(TunefleetError, match=f"node 0 cannot listen on port {port}"):
            join.host(_member(0), port=port, address="127.0.0.1", timeout_s=5, ready=lambda: None)
