"""The real trainer on a real SLURM cluster (slurmctld + 4 emulated CPU nodes on this machine).

Every job is made by `tunefleet slurm ... --submit` (the CLI in this process) and runs the
generated script unchanged: `tunefleet prepare`, srun, torchrun, `tunefleet.distributed.sft`
with gloo, checkpoints, signals, requeues. The recipe is the demo shortened to 10 steps over
2 epochs with a checkpoint after every step; every job's per-step losses are compared with one
uninterrupted local single-process run of the same recipe.

Each worker process writes what it sees (rank, local rank, node rank, SLURM_NODEID, hostname,
restart) through a `sitecustomize` module on PYTHONPATH: an observer, nothing in the trainer is
replaced. `TUNEFLEET_TEST_SAVE_DELAY_S` slows every checkpoint down so that a signal lands in
the middle of a run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.short_run import DEMO, OVERRIDES, STEPS
from tests.slurm_cluster import SlurmCluster
from tunefleet.launch import cli
from tunefleet.launch.core import checkpoints as ckpt
from tunefleet.launch.core.layout import read_metrics, training_rows
from tunefleet.slurm import status as status_mod

pytest_plugins = ["tests.conftest_slurm"]
pytestmark = [pytest.mark.slurm, pytest.mark.slow]

JOB_TIMEOUT_S = 300

SITECUSTOMIZE = '''\
"""Test observer: every torchrun worker records what it sees, then runs unchanged."""
import json, os, socket
from pathlib import Path

if "RANK" in os.environ and os.environ.get("TUNEFLEET_RANK_PROBE"):
    keys = ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "SLURM_NODEID", "SLURM_JOB_ID",
            "SLURM_RESTART_COUNT")
    record = {k.lower(): os.environ.get(k) for k in keys}
    record["hostname"] = socket.gethostname()
    path = Path(os.environ["TUNEFLEET_RANK_PROBE"]) / f"rank-{os.environ['RANK']}-{os.getpid()}.json"
    path.write_text(json.dumps(record))
'''


def losses(out: Path) -> dict[int, float]:
    rows = training_rows(read_metrics(out))
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"duplicated or unordered steps: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def assert_same_losses(got: dict[int, float], want: dict[int, float], tol: float = 1e-5) -> None:
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1)), (sorted(got), sorted(want))
    worst = max(abs(got[s] - want[s]) for s in want)
    assert worst <= tol, {s: (got[s], want[s]) for s in want}


def newest_step(out: Path) -> int:
    newest = ckpt.latest(out)
    return ckpt.step_of(newest) if newest else 0


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], dict[int, float]]]:
    """The same recipe, uninterrupted, one local process; started at once, awaited when needed."""
    out = tmp_path_factory.mktemp("local") / "run"
    argv = [sys.executable, "-m", "tunefleet.distributed.sft", "--recipe", str(DEMO)]
    for item in [f"output_dir={out}", *OVERRIDES]:
        argv += ["--set", item]
    log = out.parent / "local.log"
    with log.open("w") as f:
        proc = subprocess.Popen(
            argv, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
    result: dict[int, float] = {}

    def get() -> dict[int, float]:
        if not result:
            assert proc.wait(timeout=JOB_TIMEOUT_S) == 0, log.read_text()[-3000:]
            result.update(losses(out))
        return result

    yield get
    if proc.poll() is None:
        proc.kill()
        proc.wait()


class Runs:
    """Submits the demo recipe with `tunefleet slurm` and reads what its jobs left behind."""

    def __init__(self, root: Path, cluster: SlurmCluster) -> None:
        self.root = root
        self.cluster = cluster
        self.probe_code = root / "probe-code"
        self.probe_code.mkdir()
        (self.probe_code / "sitecustomize.py").write_text(SITECUSTOMIZE)

    def submit(self, name: str, *args: str, save_delay_s: float = 0.0, capsys: pytest.CaptureFixture) -> str:
        out, probe = self.root / name, self.root / f"{name}-ranks"
        probe.mkdir(exist_ok=True)
        setup = (
            f"source {sys.prefix}/bin/activate"
            if sys.prefix != sys.base_prefix
            else f"export PATH={Path(sys.executable).parent}:$PATH"
        )
        argv = [
            "slurm",
            str(DEMO),
            "--gpus-per-node",
            "0",
            "--time",
            "10",
            "--env-setup",
            setup,
            "--env",
            "OMP_NUM_THREADS=1",
            "--env",
            f"PYTHONPATH={self.probe_code}",
            "--env",
            f"TUNEFLEET_RANK_PROBE={probe}",
            "--env",
            f"TUNEFLEET_TEST_SAVE_DELAY_S={save_delay_s}",
            "--job-name",
            name,
        ]
        for item in [f"output_dir={out}", *OVERRIDES]:
            argv += ["--set", item]
        argv += [*args, "--submit"]  # after the recipe overrides: a test's own --set wins
        capsys.readouterr()
        assert cli.main(argv) == 0, capsys.readouterr().err
        self.printed = capsys.readouterr().out
        match = re.search(r"submitted job (\d+)", self.printed)
        assert match, self.printed
        return match.group(1)

    def out(self, name: str) -> Path:
        return self.root / name

    def ranks(self, name: str) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted((self.root / f"{name}-ranks").glob("rank-*.json"))]

    def log(self, job_id: str, name: str) -> str:
        return (self.root / name / f"slurm-{job_id}.out").read_text(errors="replace")

    def worker_pid(self, job_id: str, name: str, rank: int) -> int:
        """The training process of `rank` in the job (found through its environment; other
        test clusters on this machine may run a job with the same id)."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                env = dict(
                    item.split("=", 1)
                    for item in (entry / "environ").read_bytes().decode().split("\0")
                    if "=" in item
                )
            except (OSError, UnicodeDecodeError):
                continue
            if (
                env.get("SLURM_JOB_ID") == job_id
                and env.get("RANK") == str(rank)
                and env.get("TUNEFLEET_RANK_PROBE") == str(self.root / f"{name}-ranks")
            ):
                return int(entry.name)
        raise AssertionError(f"no worker with RANK={rank} in job {job_id}")


@pytest.fixture
def runs(tmp_path: Path, slurm_cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> Runs:
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    monkeypatch.chdir(tmp_path)
    return Runs(tmp_path, slurm_cluster)


def test_two_node_job_trains_like_one_local_process(
    runs: Runs, slurm_cluster: SlurmCluster, reference: Callable, capsys: pytest.CaptureFixture
) -> None:
    """2 nodes x 2 gloo processes (micro batch 2, so accumulation 1): ranks, node ids and losses."""
    started = time.monotonic()
    job = runs.submit(
        "ddp", "--nodes", "2", "--procs-per-node", "2", "--set", "batch.micro_batch_size=2", capsys=capsys
    )
    assert "micro 2 x accum 1 x world 4 = global 8" in runs.printed
    info = slurm_cluster.wait(job, "COMPLETED", timeout_s=JOB_TIMEOUT_S)
    print(
        f"\n2 nodes x 2 processes, real trainer: {time.monotonic() - started:.1f} s from submit to COMPLETED"
    )
    out, log = runs.out("ddp"), runs.log(job, "ddp")
    assert info["NodeList"] == "n[1-2]" and info["Restarts"] == "0", log
    # tokenised once by `tunefleet prepare`, loaded from the cache by the ranks
    assert re.search(r"^tokenised: 40 training examples", log, re.M), log
    assert "tokenised data from the cache" in log
    ranks = runs.ranks("ddp")
    assert sorted(int(r["rank"]) for r in ranks) == [0, 1, 2, 3], ranks
    for r in ranks:
        assert r["world_size"] == "4" and r["group_rank"] == r["slurm_nodeid"], r
        assert r["hostname"] == f"n{int(r['slurm_nodeid']) + 1}", r
        assert int(r["rank"]) == 2 * int(r["group_rank"]) + int(r["local_rank"]), r
    plan = json.loads((out / "plan.json").read_text())
    assert plan["in_effect"]["world_size"] == 4 and plan["in_effect"]["backend"] == "gloo"
    assert ckpt.read_manifest(out / "checkpoint-10").world_size == 4
    assert_same_losses(losses(out), reference())
    status = status_mod.read_status(out)
    assert status["job"]["state"] == "COMPLETED" and status["job"]["restarts"] == 0
    assert (
        status["finished"]
        and status["progress"]["step"] == STEPS
        and status["progress"]["total_steps"] == STEPS
    )
    assert status["checkpoint"]["step"] == STEPS and status["progress"]["samples_seen"] == 80


def test_preempted_and_signalled_job_requeues_resumes_and_matches(
    runs: Runs, slurm_cluster: SlurmCluster, reference: Callable, capsys: pytest.CaptureFixture
) -> None:
    """Attempt 0 on n1,n2 is evicted by a high-priority job (partition preemption, TERM); attempt 1
    runs on n3,n4 and gets the time-limit signal (USR1 to the batch shell, as --signal=B:USR1
    sends it); attempt 2 finishes. The losses equal an uninterrupted run."""
    job = runs.submit("preempt", "--nodes", "2", "--max-restarts", "3", save_delay_s=1.0, capsys=capsys)
    out = runs.out("preempt")
    wait_until(lambda: newest_step(out) >= 2, JOB_TIMEOUT_S, "attempt 0 to checkpoint step 2")
    high = slurm_cluster.sbatch(
        "#!/bin/bash\nsleep 40\n",
        "--partition=high",
        "--nodes=2",
        "--nodelist=n1,n2",
        "--exclusive",
        f"--output={runs.root}/high-%j.out",
    )
    try:
        started = time.monotonic()
        slurm_cluster.wait(job, "PENDING", timeout_s=60)  # evicted and requeued by SLURM
        stopped_at = newest_step(out)
        info = slurm_cluster.wait(job, "RUNNING", timeout_s=120)
        print(f"\npartition preemption -> requeued -> running again: {time.monotonic() - started:.1f} s")
        assert info["NodeList"] == "n[3-4]" and info["Restarts"] == "1", info
        wait_until(lambda: newest_step(out) > stopped_at, JOB_TIMEOUT_S, "attempt 1 to checkpoint")
        started = time.monotonic()
        slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)
        info = slurm_cluster.wait(job, "COMPLETED", timeout_s=JOB_TIMEOUT_S)
        print(f"USR1 -> checkpoint -> requeue -> resumed run COMPLETED: {time.monotonic() - started:.1f} s")
    finally:
        slurm_cluster.run("scancel", high, check=False)
    log = runs.log(job, "preempt")
    assert info["Restarts"] == "2" and info["ExitCode"] == "0:0", log
    assert "the job was preempted at" in log and "USR1 received" in log, log
    assert log.count("resuming from") == 2 and log.count("tunefleet: requeuing job") == 2, log
    hosts: dict[str, set[str]] = {}
    for r in runs.ranks("preempt"):
        hosts.setdefault(r["slurm_restart_count"] or "0", set()).add(r["hostname"])
    assert hosts["0"] == {"n1", "n2"} and hosts["1"] == {"n3", "n4"}, hosts
    assert_same_losses(losses(out), reference())
    status = status_mod.read_status(out)
    assert status["job"]["restarts"] == 2 and status["job"]["state"] == "COMPLETED", status


def test_failing_node_ends_the_job_instead_of_hanging(
    runs: Runs, slurm_cluster: SlurmCluster, capsys: pytest.CaptureFixture
) -> None:
    """SIGKILL to the worker on node 2: srun --kill-on-bad-exit ends node 1 too; the job fails
    promptly (rank 0 would otherwise wait in a gloo collective) and is not requeued."""
    job = runs.submit("crash", "--nodes", "2", save_delay_s=1.0, capsys=capsys)
    out = runs.out("crash")
    wait_until(lambda: newest_step(out) >= 2, JOB_TIMEOUT_S, "a checkpoint")
    os.kill(runs.worker_pid(job, "crash", rank=1), 9)
    started = time.monotonic()
    info = slurm_cluster.wait(job, "FAILED", timeout_s=90)
    print(f"\nworker killed on node 2 -> job FAILED after {time.monotonic() - started:.1f} s")
    log = runs.log(job, "crash")
    assert info["Restarts"] == "0" and info["ExitCode"] != "0:0", info
    assert "requeuing" not in log and not (out / "final").exists(), log
    assert ckpt.latest(out) is not None  # the run can be continued by resubmitting


def test_dependency_chain_limit_then_fewer_nodes(
    runs: Runs, slurm_cluster: SlurmCluster, reference: Callable, capsys: pytest.CaptureFixture
) -> None:
    """`--restart dependency --max-restarts 1` on 2 nodes: signalled, the job submits its
    successor; the successor, signalled, stops at the limit. `tunefleet slurm --nodes 1` on the
    same output directory continues on one node (accumulation 2 instead of 1) to the end."""
    first = runs.submit(
        "chain",
        "--nodes",
        "2",
        "--restart",
        "dependency",
        "--max-restarts",
        "1",
        save_delay_s=1.0,
        capsys=capsys,
    )
    out = runs.out("chain")
    wait_until(lambda: newest_step(out) >= 2, JOB_TIMEOUT_S, "job 1 to checkpoint")
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", first)
    info = slurm_cluster.wait(first, "FAILED", timeout_s=120)  # exit 75: the successor goes on
    match = re.search(r"submitted job (\d+) to continue", runs.log(first, "chain"))
    assert match and info["Requeue"] == "0", runs.log(first, "chain")
    second = match.group(1)
    slurm_cluster.wait(second, "RUNNING", timeout_s=60)
    stopped_at = newest_step(out)
    wait_until(lambda: newest_step(out) > stopped_at, JOB_TIMEOUT_S, "job 2 to checkpoint")
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", second)
    slurm_cluster.wait(second, "FAILED", timeout_s=120)
    log = runs.log(second, "chain")
    assert (
        "restart 1 (max_restarts 1)" in log and "not running again: restart 1 reached max_restarts 1" in log
    )
    assert "submitted job" not in log, log
    status = status_mod.read_status(out)
    assert status["job"]["chain"] == [first, second] and status["job"]["restarts"] == 1, status
    resumed_at = newest_step(out)
    assert 2 <= resumed_at < STEPS and ckpt.read_manifest(ckpt.latest(out)).world_size == 2

    third = runs.submit("chain", "--nodes", "1", capsys=capsys)
    assert f"continues from checkpoint-{resumed_at}" in runs.printed, runs.printed
    assert "micro 4 x accum 2 x world 1 = global 8" in runs.printed
    # the signal lead comes from the checkpoint times measured by the jobs before
    assert "checkpoint measured" in runs.printed, runs.printed
    lead = int(re.search(r"#SBATCH --signal=B:USR1@(\d+)", (out / "slurm.sbatch").read_text()).group(1))
    assert 62 <= lead <= 60 + 30, lead
    slurm_cluster.wait(third, "COMPLETED", timeout_s=JOB_TIMEOUT_S)
    assert ckpt.read_manifest(out / "checkpoint-10").world_size == 1
    assert_same_losses(losses(out), reference())
    status = status_mod.read_status(out)
    assert status["job"]["job_id"] == third and status["job"]["submissions"] == 2 and status["finished"]
