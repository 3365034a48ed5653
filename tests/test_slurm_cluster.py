"""Generated sbatch scripts on a real SLURM cluster (slurmctld + 4 emulated nodes on this machine).

Each job runs the generated script unchanged, with a tiny probe module in place of the trainer
(`Launch(module="slurm_probe")`): torchrun, the exit-code relay, srun, the USR1 trap and
`scontrol requeue` are all real.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster
from tunefleet.launch.core.layout import EXIT_REQUEUE
from tunefleet.slurm.sbatch import ClusterSpec, Launch, render_sbatch
from tunefleet.slurm.submit import SubmitError, submit, test_only, write_script

pytest_plugins = ["tests.conftest_slurm"]  # the same registration as tests/conftest.py; loaded once
pytestmark = pytest.mark.slurm

PROBE = '''\
"""Stands in for the trainer on the SLURM test cluster: records what each process sees."""
import json, os, signal, socket, sys, time
from pathlib import Path

out = Path(os.environ["PROBE_OUT"])
mode = os.environ["PROBE_MODE"]
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
record = {
    "rank": rank, "world_size": world, "local_rank": int(os.environ["LOCAL_RANK"]),
    "group_rank": int(os.environ["GROUP_RANK"]), "node_id": int(os.environ["SLURM_NODEID"]),
    "hostname": socket.gethostname(), "argv": sys.argv[1:],
    "restart": os.environ.get("SLURM_RESTART_COUNT"), "chain": os.environ.get("TUNEFLEET_RESTART_COUNT"),
}


def barrier(prefix):  # a file barrier, standing in for the collective checkpoint save
    deadline = time.time() + 20
    while time.time() < deadline and not all((out / f"{prefix}-{r}").exists() for r in range(world)):
        time.sleep(0.05)


if mode == "ranks":
    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo")
    total = torch.tensor([float(rank)])
    dist.all_reduce(total)
    record.update(sum=total.item(), dist_world_size=dist.get_world_size())
    dist.destroy_process_group()
    (out / f"rank-{rank}.json").write_text(json.dumps(record))
elif mode == "trainer":  # wait for the preemption signal, checkpoint, ask for a requeue
    if all((out / f"checkpoint-{r}").exists() for r in range(world)):
        (out / f"resumed-{rank}.json").write_text(json.dumps(record))
        sys.exit(0)
    signals = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: signals.append(signum))
    (out / f"ready-{rank}").write_text(json.dumps(record))
    deadline = time.time() + 120
    while not signals and time.time() < deadline:
        time.sleep(0.05)
    if not signals:
        sys.exit(3)
    (out / f"checkpoint-{rank}").write_text(json.dumps(record))
    barrier("checkpoint")
    sys.exit(75)
elif mode == "always75":  # checkpoints and asks to run again, every time
    with open(out / "runs.jsonl", "a") as f:
        f.write(json.dumps(record) + "\\n")
    sys.exit(75)
elif mode == "once75":
    if (out / "checkpoint").exists():
        (out / "resumed.json").write_text(json.dumps(record))
        sys.exit(0)
    (out / "checkpoint").write_text(json.dumps(record))
    sys.exit(75)
'''


@pytest.fixture
def job_dir(tmp_path: Path, slurm_cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory with the probe module; sbatch/scontrol in this process talk to the test cluster."""
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "slurm_probe.py").write_text(PROBE)
    (tmp_path / "out").mkdir()
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _spec(job_dir: Path, mode: str, **overrides) -> ClusterSpec:
    options = dict(
        nodes=1,
        procs_per_node=1,
        time="10",
        checkpoint_s=0,
        job_name=f"probe-{mode}",
        chdir=str(job_dir),
        env_setup=[f"source {sys.prefix}/bin/activate"]
        if sys.prefix != sys.base_prefix
        else [f"export PATH={Path(sys.executable).parent}:$PATH"],
        env={
            "PYTHONPATH": str(job_dir / "probe"),
            "PROBE_OUT": str(job_dir / "out"),
            "PROBE_MODE": mode,
            "OMP_NUM_THREADS": "1",
        },
    )
    options.update(overrides)
    return ClusterSpec(**options)


def _submit(job_dir: Path, spec: ClusterSpec, recipe: str = "recipe.yaml") -> str:
    text = render_sbatch(
        spec,
        recipe_path=str(job_dir / recipe),
        output_dir=str(job_dir / "logs"),
        launch=Launch(module="slurm_probe"),
    )
    return submit(write_script(text, job_dir / "job.sbatch"))


def _wait_for_files(paths: list[Path], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, f"not written within {timeout_s} s: {[str(p) for p in paths]}"
        time.sleep(0.1)


def test_generated_scripts_pass_sbatch_test_only(job_dir: Path) -> None:
    specs = [
        _spec(job_dir, "ranks", nodes=2, procs_per_node=2),
        _spec(
            job_dir,
            "ranks",
            nodes=4,
            partition="high",
            exclusive=True,
            mem="1000M",
            time="1-00:00:00",
            extra_sbatch=["--comment=tunefleet-test"],
        ),
        _spec(job_dir, "ranks", nodes=3, restart="dependency", cpus_per_task=2, time="02:30:00"),
        _spec(
            job_dir,
            "ranks",
            restart="none",
            output=str(job_dir / "logs" / "%x-%j.log"),
            error=str(job_dir / "logs" / "%x-%j.err"),
        ),
    ]
    for i, spec in enumerate(specs):
        text = render_sbatch(
            spec,
            recipe_path=str(job_dir / "recipe.yaml"),
            output_dir=str(job_dir / "logs"),
            launch=Launch(module="slurm_probe"),
        )
        answer = test_only(write_script(text, job_dir / f"test-only-{i}.sbatch"))
        assert re.search(r"Job \d+ to start at", answer), answer
        assert f"nodes n[1-{spec.nodes}]" in answer or spec.nodes == 1, answer
    # A request this cluster cannot meet is refused with sbatch's own message.
    too_big = render_sbatch(_spec(job_dir, "ranks", nodes=5), recipe_path="r.yaml", output_dir=str(job_dir))
    with pytest.raises(SubmitError, match="Node count specification invalid|Requested node configuration"):
        test_only(write_script(too_big, job_dir / "too-big.sbatch"))


def test_two_node_job_ranks(job_dir: Path, slurm_cluster: SlurmCluster) -> None:
    # A hostile recipe path: spaces, quotes, $(...) and backquotes must reach the probe verbatim.
    recipe = "my recipe 'v2' \"x\" $(touch pwned) `touch pwned2`.yaml"
    started = time.monotonic()
    job_id = _submit(job_dir, _spec(job_dir, "ranks", nodes=2, procs_per_node=2, cpus_per_task=2), recipe)
    info = slurm_cluster.wait(job_id, "COMPLETED", timeout_s=120)
    print(f"2-node x 2-process torchrun job: {time.monotonic() - started:.1f} s from sbatch to COMPLETED")
    records = [json.loads(p.read_text()) for p in sorted((job_dir / "out").glob("rank-*.json"))]
    assert sorted(r["rank"] for r in records) == [0, 1, 2, 3], slurm_cluster.output(info)
    assert {r["world_size"] for r in records} == {4}
    assert {r["dist_world_size"] for r in records} == {4}
    assert {r["sum"] for r in records} == {6.0}  # the gloo all_reduce crossed both nodes
    by_node = {}
    for r in records:
        assert r["group_rank"] == r["node_id"], r  # torchrun --node_rank came from this node's SLURM_NODEID
        by_node.setdefault(r["node_id"], set()).add((r["rank"], r["hostname"]))
    assert sorted(by_node) == [0, 1], "every node claimed the same node rank"
    assert by_node[0] == {(0, "n1"), (1, "n1")} and by_node[1] == {(2, "n2"), (3, "n2")}
    assert {tuple(r["argv"]) for r in records} == {("--recipe", str(job_dir / recipe))}
    assert not list(job_dir.rglob("pwned*")), "a value was executed by the shell"
    assert info["NodeList"] == "n[1-2]" and info["Restarts"] == "0"


def test_signal_checkpoint_requeue_resume(job_dir: Path, slurm_cluster: SlurmCluster) -> None:
    out = job_dir / "out"
    spec = _spec(job_dir, "trainer", nodes=2, max_restarts=2)
    job_id = _submit(job_dir, spec)
    _wait_for_files([out / "ready-0", out / "ready-1"], timeout_s=60)
    started = time.monotonic()
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job_id)  # what --signal=B:USR1@lead sends
    info = slurm_cluster.wait(job_id, "COMPLETED", timeout_s=120)
    print(f"USR1 -> checkpoint -> requeue -> resumed run COMPLETED: {time.monotonic() - started:.1f} s")
    log = slurm_cluster.output(info, tail=None)  # the whole log: a restart adds pages of torch noise
    assert int(info["Restarts"]) >= 1, log
    assert info["ExitCode"] == "0:0", log
    assert (out / "checkpoint-0").exists() and (out / "checkpoint-1").exists()
    resumed = [json.loads((out / f"resumed-{r}.json").read_text()) for r in (0, 1)]
    assert {r["restart"] for r in resumed} == {"1"}
    assert "USR1 received" in log and f"job {job_id} (restart 1)" in log, log
    assert log.count("job step ended with exit code 0") == 1, log  # append mode kept the first run's log


def test_max_restarts_stops_requeuing(job_dir: Path, slurm_cluster: SlurmCluster) -> None:
    job_id = _submit(job_dir, _spec(job_dir, "always75", max_restarts=1))
    info = slurm_cluster.wait(job_id, "FAILED", timeout_s=120)
    log = slurm_cluster.output(info, tail=None)  # the whole log: a restart adds pages of torch noise
    runs = [json.loads(line) for line in (job_dir / "out" / "runs.jsonl").read_text().splitlines()]
    assert [r["restart"] for r in runs] == [None, "1"], log  # the trainer's 75 survived torchrun
    assert info["Restarts"] == "1", info
    assert info["ExitCode"] == f"{EXIT_REQUEUE}:0", info
    assert "not running again: restart 1 reached max_restarts 1" in log, log


def test_dependency_chain_continues_in_a_new_job(job_dir: Path, slurm_cluster: SlurmCluster) -> None:
    job_id = _submit(job_dir, _spec(job_dir, "once75", restart="dependency"))
    first = slurm_cluster.wait(job_id, "FAILED", timeout_s=90)
    log = slurm_cluster.output(first, tail=None)
    match = re.search(r"submitted job (\d+) to continue", log)
    assert match, log
    second = slurm_cluster.wait(match.group(1), "COMPLETED", timeout_s=90)
    resumed = json.loads((job_dir / "out" / "resumed.json").read_text())
    assert resumed["chain"] == "1" and first["Requeue"] == "0", (first, resumed)
    assert second["JobName"] == first["JobName"] and second["ExitCode"] == "0:0"
