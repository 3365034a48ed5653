"""The sbatch renderer: golden scripts, `bash -n` over option combinations, hostile values, and the
generated script run by bash against stand-in srun/scontrol/sbatch/python (no cluster needed;
tests/test_slurm_cluster.py runs the same scripts on a real one).

Regenerate the golden files with `UPDATE_GOLDEN=1 pytest tests/test_sbatch.py`.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tunefleet.launch.core.errors import TunefleetError
from tunefleet.launch.core.layout import EXIT_REFUSED, EXIT_REQUEUE
from tunefleet.slurm.sbatch import (
    GPU_JOB_CPUS_PER_GPU,
    GPU_JOB_MEM_PER_GPU_GB,
    PYTHON_CHECK,
    PYTHON_CHECK_IMPORTS,
    ClusterSpec,
    ClusterSpecError,
    Launch,
    cluster_spec_from_dict,
    render_sbatch,
)
from tunefleet.slurm.submit import write_script

GOLDEN = Path(__file__).parent / "golden" / "slurm"
HOSTILE_PATH = '/data/my runs/it\'s "quoted" $(touch pwned) `touch pwned2` $HOME;rm -rf x.yaml'

CASES: dict[str, tuple[ClusterSpec, dict]] = {
    "cpu_2x2_torchrun": (
        ClusterSpec(
            nodes=2,
            procs_per_node=2,
            time="02:00:00",
            env_setup=["source /work/venv/bin/activate"],
            env={"OMP_NUM_THREADS": "1"},
        ),
        dict(recipe_path="/work/recipes/demo.yaml", output_dir="/scratch/runs/demo"),
    ),
    "gpu_4x8_accelerate_full": (
        ClusterSpec(
            nodes=4,
            gpus_per_node=8,
            gpu_type="h100",
            cpus_per_task=64,
            mem="0",
            time="2-00:00:00",
            partition="gpu,gpu-long",
            account="proj-42",
            qos="high",
            constraint="ib&h100",
            exclusive=True,
            job_name="llama3-8b-lora",
            output="/scratch/logs/%x-%j.out",
            error="/scratch/logs/%x-%j.err",
            chdir="/scratch/work",
            env_setup=["module purge", "module load cuda/12.4 nccl", "conda activate tunefleet"],
            env={"NCCL_DEBUG": "WARN", "HF_HOME": "/scratch/hf cache"},
            extra_sbatch=["--reservation=big-run", "--mail-type=END,FAIL"],
            checkpoint_s=300,
            signal_margin_s=90,
            max_restarts=10,
        ),
        dict(
            recipe_path="/scratch/recipes/llama3-8b.yaml",
            output_dir="/scratch/runs/llama3",
            launch=Launch(accelerate_config="/scratch/runs/llama3/accelerate.yaml"),
        ),
    ),
    "gpu_dependency_chain_torchrun": (
        ClusterSpec(nodes=1, gpus_per_node=2, restart="dependency", max_restarts=5, time="240"),
        dict(recipe_path="recipes/qlora.yaml", output_dir="runs/qlora", launch=Launch(launcher="torchrun")),
    ),
    "cpu_2x1_prepare_dependency": (
        ClusterSpec(nodes=2, time="01:00:00", restart="dependency", checkpoint_s=7),
        dict(
            recipe_path="/scratch/runs/demo/recipe.yaml",
            output_dir="/scratch/runs/demo",
            # what `tunefleet slurm` passes: its own interpreter and the versions it has
            launch=Launch(
                prepare=True,
                python="/scratch/venv/bin/python",
                expect_versions={"tunefleet": "0.1.0", "torch": "2.13.0+cpu"},
            ),
        ),
    ),
    "cpu_single_no_restart": (
        ClusterSpec(restart="none"),
        dict(recipe_path="/home/me/r.yaml", output_dir="/home/me/out"),
    ),
    "hostile_values_quoted": (
        ClusterSpec(nodes=2, env={"RUN_NOTE": "it's $(touch pwned)\t`x`"}),
        dict(
            recipe_path=HOSTILE_PATH,
            output_dir="/data/runs",
            launch=Launch(
                module="my_pkg.train", module_args=["--note", "a b 'c' $(d)"], python="/opt/py 3/python"
            ),
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str) -> None:
    spec, kwargs = CASES[name]
    text = render_sbatch(spec, **kwargs)
    path = GOLDEN / f"{name}.sbatch"
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}: run with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{path} differs: review the change, then run with UPDATE_GOLDEN=1"


def test_render_is_pure_and_writes_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    spec, kwargs = CASES["gpu_4x8_accelerate_full"]
    first = render_sbatch(spec, **kwargs)
    monkeypatch.setenv("HF_TOKEN", "hf_secretsecretsecretsecretsecret1234")
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.chdir("/")
    second = render_sbatch(spec, **kwargs)
    assert first == second
    assert "hf_secret" not in second and "0123456789abcdef" not in second


def test_sbatch_lines_are_literal_and_sorted() -> None:
    for spec, kwargs in CASES.values():
        lines = [line for line in render_sbatch(spec, **kwargs).splitlines() if line.startswith("#SBATCH")]
        assert all("$" not in line and "'" not in line and '"' not in line for line in lines)
        managed = lines[: len(lines) - len(spec.extra_sbatch)]
        assert managed == sorted(managed)
        assert "#SBATCH --open-mode=append" in lines and "#SBATCH --ntasks-per-node=1" in lines


def test_signal_lead_and_requeue_options() -> None:
    text = render_sbatch(ClusterSpec(checkpoint_s=240), recipe_path="r.yaml", output_dir="o")
    assert "#SBATCH --signal=B:USR1@300" in text and "#SBATCH --requeue" in text
    chain = render_sbatch(ClusterSpec(restart="dependency"), recipe_path="r.yaml", output_dir="o")
    assert "#SBATCH --no-requeue" in chain and '--dependency="afterany:$SLURM_JOB_ID"' in chain
    assert "scontrol requeue" not in chain


_COMBOS = list(
    itertools.product(
        [1, 3],  # nodes
        [0, 4],  # gpus_per_node
        ["requeue", "dependency", "none"],
        [(), ("module load x", "source /v/bin/activate")],
        [False, True],  # exclusive + partition/account/...
    )
)


@pytest.mark.parametrize("nodes,gpus,restart,env_setup,extras", _COMBOS)
def test_bash_syntax(
    nodes: int, gpus: int, restart: str, env_setup: tuple, extras: bool, tmp_path: Path
) -> None:
    more = (
        dict(
            exclusive=True,
            partition="p1,p2",
            account="a",
            qos="q",
            constraint="x|y",
            mem="10G",
            cpus_per_task=8,
            extra_sbatch=("--comment=c",),
            env={"A": "b c"},
        )
        if extras
        else {}
    )
    spec = ClusterSpec(nodes=nodes, gpus_per_node=gpus, restart=restart, env_setup=env_setup, **more)
    launch = Launch(accelerate_config="/c/acc.yaml", prepare=extras) if gpus else Launch(prepare=extras)
    text = render_sbatch(spec, recipe_path=HOSTILE_PATH, output_dir="/o", launch=launch)
    result = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # the per-node command, as srun's bash -c receives it, parses too
    srun_line = next(line for line in text.split("\nsrun ")[1:])
    node_command = shlex.split("srun " + srun_line.split(" &\n")[0])[-1]
    assert '"$SLURM_NODEID"' in node_command
    assert subprocess.run(["bash", "-n", "-c", node_command], capture_output=True).returncode == 0


@pytest.mark.parametrize(
    "spec_fields, match",
    [
        (dict(job_name="my job"), "job_name: 'my job' cannot be written"),
        (dict(job_name="x\n#SBATCH --account=stolen"), "job_name: contains a newline"),
        (dict(partition="gpu;rm"), "partition"),
        (dict(account="a$(id)"), "account"),
        (dict(qos='"high"'), "qos"),
        (dict(constraint="a b"), "constraint"),
        (dict(output="/logs/my run/%j.out"), "output"),
        (dict(output="/logs/$USER/%j.out"), "output"),
        (dict(error="/logs/#x.err"), "error"),
        (dict(chdir="/work/it's"), "chdir"),
        (dict(mem="lots"), "mem"),
        (dict(time="forever"), "time: 'forever' is not a SLURM time limit"),
        (dict(time="1", checkpoint_s=60), "leaves no training time"),
        (dict(signal_margin_s=30), "signal_margin_s: must be >= 60"),
        (dict(nodes=0), "nodes: must be >= 1"),
        (dict(nodes=True), "nodes: expected an integer"),
        (dict(gpu_type="a100"), "gpus_per_node is 0"),
        (dict(restart="sometimes"), "restart"),
        (dict(env={"HF_TOKEN": "hf_x"}), "env.HF_TOKEN: is a secret"),
        (dict(env={"MY_API_KEY": "k"}), "is a secret"),
        (dict(env={"BAD NAME": "v"}), "not a variable name"),
        (dict(env={"A": "line1\nline2"}), "newline"),
        (dict(env_setup=["export HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyz0123456789"]), "secret"),
        (dict(env_setup=["export WANDB_API_KEY=0123abcd"]), "secret"),
        (dict(env_setup=["module load a\nmodule load b"]), "newline"),
        (dict(env_setup="source x"), "list of shell lines"),
        (dict(extra_sbatch=["--nodes=8"]), "--nodes is set by tunefleet from the cluster spec"),
        (dict(extra_sbatch=["-p gpu"]), "-p is set by tunefleet from the cluster spec"),
        (dict(extra_sbatch=["--comment=$USER"]), "expand no"),
        (dict(extra_sbatch=["reservation=x"]), "not a plain sbatch option"),
        (dict(extra_sbatch=["--comment=x\n#SBATCH --qos=y"]), "newline"),
    ],
)
def test_hostile_or_invalid_spec_refused(spec_fields: dict, match: str) -> None:
    with pytest.raises(ClusterSpecError, match=match.replace("$", r"\$").replace("(", r"\(")) as info:
        render_sbatch(ClusterSpec(**spec_fields), recipe_path="r.yaml", output_dir="/o")
    assert isinstance(info.value, TunefleetError) and info.value.fix


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(recipe_path="/a\nb.yaml", output_dir="/o"), "recipe_path: contains a newline"),
        (dict(recipe_path="r.yaml", output_dir="/my runs"), "output_dir"),
        (dict(recipe_path="", output_dir="/o"), "recipe_path: is empty"),
        (
            dict(recipe_path="r.yaml", output_dir="/o", launch=Launch(launcher="accelerate")),
            "accelerate on CPU",
        ),
        (dict(recipe_path="r.yaml", output_dir="/o", launch=Launch(module="x; rm -rf /")), "launch.module"),
        (dict(recipe_path="r.yaml", output_dir="/o", launch=Launch(module_args=["a\nb"])), "module_args"),
        (
            dict(
                recipe_path="r.yaml", output_dir="/o", launch=Launch(expect_versions={"torch": "1; rm -rf /"})
            ),
            "launch.expect_versions.torch",
        ),
        (
            dict(recipe_path="r.yaml", output_dir="/o", launch=Launch(expect_versions={"numpy": "2.0"})),
            "launch.expect_versions.numpy",
        ),
    ],
)
def test_hostile_render_arguments_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ClusterSpecError, match=match):
        render_sbatch(ClusterSpec(), **kwargs)


def test_secret_check_spares_lookalikes() -> None:
    spec = ClusterSpec(
        env={"TOKENIZERS_PARALLELISM": "false"},
        env_setup=["export TOKENIZERS_PARALLELISM=false", 'export HF_TOKEN="$(cat ~/.hf_token)"'],
    )
    text = render_sbatch(spec, recipe_path="r.yaml", output_dir="/o")
    assert 'export HF_TOKEN="$(cat ~/.hf_token)"' in text


def test_accelerate_needs_its_config() -> None:
    with pytest.raises(ClusterSpecError, match="accelerate launch needs a config file"):
        render_sbatch(ClusterSpec(gpus_per_node=8), recipe_path="r.yaml", output_dir="/o")


def test_cluster_spec_from_dict_rejects_unknown_keys() -> None:
    spec = cluster_spec_from_dict({"nodes": 2, "gpus_per_node": 4, "env_setup": ["module load cuda"]})
    assert spec.nodes == 2 and spec.env_setup == ("module load cuda",)
    with pytest.raises(
        ClusterSpecError, match="unknown cluster key 'gpus_per_nodes' \\(did you mean 'gpus_per_node'"
    ):
        cluster_spec_from_dict({"gpus_per_nodes": 4})
    with pytest.raises(ClusterSpecError, match="partition"):
        cluster_spec_from_dict({"partition": "a b"})


# ----------------------------------------------------------------------------- the script, run by bash

STUB_SRUN = r"""#!/bin/bash
# stand-in srun: run the command once per node (SLURM_NODEID=0..N-1), like one task per node
if [[ -n "${STUB_TERM_BATCH_SHELL:-}" ]]; then kill -TERM "$PPID"; fi  # what scancel/preemption send
while [[ "$1" == -* ]]; do echo "srun-option $1" >> "$STUB_LOG"; shift; done
pids=()
for ((i = 0; i < STUB_NODES; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
rc=0
for pid in "${pids[@]}"; do wait "$pid"; r=$?; (( r > rc )) && rc=$r; done
exit $rc
"""
STUB_SCONTROL = r"""#!/bin/bash
if [[ "$1 $2" == "show hostnames" ]]; then for ((i = 1; i <= STUB_NODES; i++)); do echo "n$i"; done; exit 0; fi
if [[ "$1 $2" == "show job" ]]; then
  echo "JobId=4242 JobState=RUNNING StartTime=${STUB_START_TIME:-2026-01-01T10:00:00} PreemptTime=${STUB_PREEMPT_TIME:-None} Partition=normal"
  exit 0
fi
echo "scontrol $*" >> "$STUB_LOG"
"""
STUB_SBATCH = r"""#!/bin/bash
echo "sbatch $*" >> "$STUB_LOG"; echo 5151
"""
STUB_PYTHON = r"""#!/bin/bash
# stand-in for the python that checks itself, runs `tunefleet prepare` (in the batch shell) and the launcher
if [[ "$1 $3" == "-c import" ]]; then echo "check-call ${*:4}" >> "$STUB_LOG"; exit "${STUB_CHECK_RC:-0}"; fi
if [[ "$2" == "tunefleet.launch.cli" ]]; then echo "prepare-call $3 $4" >> "$STUB_LOG"; exit "${STUB_PREPARE_RC:-0}"; fi
# the launcher: record argv (NUL-separated) and the environment
printf '%s\0' "$@" > "$STUB_DIR/node-$SLURM_NODEID.argv"
printf '%s\0' "$TUNEFLEET_HEAD_NODE" "$TUNEFLEET_PORT" "${HF_TOKEN:-}" > "$STUB_DIR/node-$SLURM_NODEID.env"
exit "${STUB_RC:-0}"
"""


def _run_script(
    tmp_path: Path,
    spec: ClusterSpec,
    *,
    rc: int = 0,
    restart_count: int | None = None,
    recipe_path: str = HOSTILE_PATH,
    launch: Launch | None = None,
    extra_env: dict[str, str] | None = None,
) -> tuple[int, str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (
        ("srun", STUB_SRUN),
        ("scontrol", STUB_SCONTROL),
        ("sbatch", STUB_SBATCH),
        ("python", STUB_PYTHON),
        ("/opt/py 3/python", STUB_PYTHON),
    ):
        stub = bin_dir / Path(name).name
        stub.write_text(text)
        stub.chmod(0o755)
    script = write_script(
        render_sbatch(spec, recipe_path=recipe_path, output_dir=str(tmp_path / "logs"), launch=launch),
        tmp_path / "job.sbatch",
    )
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "STUB_LOG": str(tmp_path / "calls.log"),
        "STUB_DIR": str(tmp_path),
        "STUB_NODES": str(spec.nodes),
        "STUB_RC": str(rc),
        "HF_TOKEN": "hf_from_the_environment",
        # what SLURM sets in the batch shell: this shell runs on node 0
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": f"n[1-{spec.nodes}]",
        "SLURM_NODEID": "0",
        **(extra_env or {}),
    }
    if restart_count is not None:
        env["SLURM_RESTART_COUNT" if spec.restart != "dependency" else "TUNEFLEET_RESTART_COUNT"] = str(
            restart_count
        )
    result = subprocess.run(
        ["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
    )
    calls = (tmp_path / "calls.log").read_text() if (tmp_path / "calls.log").exists() else ""
    return result.returncode, result.stdout + result.stderr, calls


def _argv(tmp_path: Path, node: int) -> list[str]:
    return (tmp_path / f"node-{node}.argv").read_bytes().decode().split("\0")[:-1]


def test_each_node_gets_its_own_rank_and_values_arrive_verbatim(tmp_path: Path) -> None:
    spec = ClusterSpec(nodes=3, procs_per_node=2)
    rc, out, calls = _run_script(tmp_path, spec, launch=Launch(module_args=["--note", "a 'b' $(c)"]))
    assert rc == 0, out
    for node in range(3):
        argv = _argv(tmp_path, node)
        assert argv[:3] == ["-m", "tunefleet.distributed.relay", "torchrun"], argv
        flags = dict(zip(argv[3:13:2], argv[4:13:2], strict=True))
        assert flags["--node_rank"] == str(node), "the node rank was expanded in the batch shell"
        assert flags["--nnodes"] == "3" and flags["--nproc_per_node"] == "2"
        assert flags["--master_addr"] == "n1" and flags["--master_port"] == str(12000 + 4242 % 20000)
        assert argv[13:] == [
            "-m",
            "tunefleet.distributed.sft",
            "--recipe",
            HOSTILE_PATH,
            "--note",
            "a 'b' $(c)",
        ]
        env = (tmp_path / f"node-{node}.env").read_bytes().decode().split("\0")
        assert env[2] == "hf_from_the_environment"  # secrets arrive from the environment at run time
    assert "srun-option --ntasks-per-node=1" in calls and "srun-option --kill-on-bad-exit=1" in calls
    assert not list(tmp_path.rglob("pwned*")), "a value was executed by the shell"
    assert "requeue" not in calls


def test_accelerate_command_per_node(tmp_path: Path) -> None:
    spec = ClusterSpec(nodes=2, gpus_per_node=4)
    rc, out, calls = _run_script(tmp_path, spec, launch=Launch(accelerate_config="/cfg/it's acc.yaml"))
    assert rc == 0, out
    for node in range(2):
        argv = _argv(tmp_path, node)
        assert argv[2:4] == ["accelerate", "launch"]
        flags = dict(zip(argv[4:16:2], argv[5:16:2], strict=True))
        assert flags == {
            "--config_file": "/cfg/it's acc.yaml",
            "--num_machines": "2",
            "--num_processes": "8",
            "--machine_rank": str(node),
            "--main_process_ip": "n1",
            "--main_process_port": str(12000 + 4242 % 20000),
        }
        assert argv[16:] == ["-m", "tunefleet.distributed.sft", "--recipe", HOSTILE_PATH]
    assert "srun-option --gpus-per-node=4" in calls
    # Slurm >= 22.05: the step gets the job's CPUs only when srun asks for them
    assert f"srun-option --cpus-per-task={4 * GPU_JOB_CPUS_PER_GPU}" in calls


def _sbatch_lines(spec: ClusterSpec) -> dict[str, str]:
    text = render_sbatch(spec, recipe_path="/r.yaml", output_dir="/o", launch=Launch(accelerate_config="/a"))
    return dict(
        line.removeprefix("#SBATCH ").split("=", 1)
        for line in text.splitlines()
        if line.startswith("#SBATCH --") and "=" in line
    )


def test_gpu_jobs_request_cpus_and_memory_per_node() -> None:
    """Without a request many clusters give the task one core and a small memory share: the ranks
    of a node would share one core, and ranks loading the checkpoint run out of host memory."""
    lines = _sbatch_lines(ClusterSpec(nodes=2, gpus_per_node=4))
    assert lines["--cpus-per-task"] == str(4 * GPU_JOB_CPUS_PER_GPU)
    assert lines["--mem"] == f"{4 * GPU_JOB_MEM_PER_GPU_GB}G"
    # more processes than GPUs: CPUs follow the processes
    assert _sbatch_lines(ClusterSpec(gpus_per_node=2, procs_per_node=4))["--cpus-per-task"] == str(
        4 * GPU_JOB_CPUS_PER_GPU
    )
    # set values win, and srun passes the same CPU count
    spec = ClusterSpec(gpus_per_node=8, cpus_per_task=20, mem="500G")
    lines = _sbatch_lines(spec)
    assert (lines["--cpus-per-task"], lines["--mem"]) == ("20", "500G")
    text = render_sbatch(spec, recipe_path="/r.yaml", output_dir="/o", launch=Launch(accelerate_config="/a"))
    assert "srun --ntasks-per-node=1 --kill-on-bad-exit=1 --gpus-per-node=8 --cpus-per-task=20 " in text
    # CPU jobs: one CPU per gloo process, memory left to the cluster
    cpu = _sbatch_lines(ClusterSpec(procs_per_node=2))
    assert cpu["--cpus-per-task"] == "2" and "--mem" not in cpu
    assert "--cpus-per-task" not in _sbatch_lines(ClusterSpec())


def test_requeue_on_exit_code(tmp_path: Path) -> None:
    rc, out, calls = _run_script(tmp_path, ClusterSpec(max_restarts=2), rc=EXIT_REQUEUE, restart_count=1)
    assert rc == EXIT_REQUEUE and "scontrol requeue 4242" in calls, out
    assert "restart 1 (max_restarts 2)" in out


def test_no_requeue_at_max_restarts(tmp_path: Path) -> None:
    rc, out, calls = _run_script(tmp_path, ClusterSpec(max_restarts=2), rc=EXIT_REQUEUE, restart_count=2)
    assert rc == EXIT_REQUEUE and "requeue" not in calls
    assert "not running again: restart 2 reached max_restarts 2" in out


@pytest.mark.parametrize("restart", ["requeue", "dependency", "none"])
def test_failure_is_not_requeued(tmp_path: Path, restart: str) -> None:
    rc, out, calls = _run_script(tmp_path, ClusterSpec(restart=restart), rc=1)
    assert rc == 1 and "requeue" not in calls and "sbatch" not in calls, out


def test_dependency_chain_submits_successor(tmp_path: Path) -> None:
    rc, out, calls = _run_script(
        tmp_path, ClusterSpec(restart="dependency"), rc=EXIT_REQUEUE, restart_count=0
    )
    assert rc == EXIT_REQUEUE, out
    assert "sbatch --parsable --dependency=afterany:4242 --export=ALL,TUNEFLEET_RESTART_COUNT=1" in calls
    assert "submitted job 5151 to continue" in out and "scontrol requeue" not in calls


def test_restart_none_stops(tmp_path: Path) -> None:
    rc, out, calls = _run_script(tmp_path, ClusterSpec(restart="none"), rc=EXIT_REQUEUE)
    assert rc == EXIT_REQUEUE and calls.count("srun-option") == 2 and "requeue" not in calls


def test_write_script_creates_log_dirs(tmp_path: Path) -> None:
    spec = ClusterSpec(output=str(tmp_path / "logs" / "%x-%j.out"), error=str(tmp_path / "errs" / "%j.err"))
    text = render_sbatch(spec, recipe_path="r.yaml", output_dir=str(tmp_path))
    path = write_script(text, tmp_path / "sub" / "job.sbatch")
    assert path.read_text() == text and os.access(path, os.X_OK)
    assert (tmp_path / "logs").is_dir() and (tmp_path / "errs").is_dir()


def test_spec_is_frozen_and_documented() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ClusterSpec().nodes = 2  # type: ignore[misc]
    source = Path(__import__("tunefleet.slurm.sbatch", fromlist=["x"]).__file__).read_text()
    for f in dataclasses.fields(ClusterSpec):
        block = source.split(f"    {f.name}: ", 1)[1].split("\n", 2)[1]
        assert block.strip().startswith('"""'), f"ClusterSpec.{f.name} has no docstring"


def test_prepare_runs_once_before_the_launch(tmp_path: Path) -> None:
    rc, out, calls = _run_script(tmp_path, ClusterSpec(nodes=2), launch=Launch(prepare=True))
    assert rc == 0, out
    lines = calls.splitlines()
    assert lines.count(f"prepare-call prepare {HOSTILE_PATH}") == 1, calls
    assert lines.index(f"prepare-call prepare {HOSTILE_PATH}") < lines.index(
        "srun-option --ntasks-per-node=1"
    )
    assert not list(tmp_path.rglob("pwned*"))


def test_python_check_runs_before_prepare_and_launch(tmp_path: Path) -> None:
    launch = Launch(prepare=True, expect_versions={"torch": "2.13.0+cpu"})
    rc, out, calls = _run_script(tmp_path, ClusterSpec(nodes=2), launch=launch)
    assert rc == 0, out
    lines = calls.splitlines()
    assert lines[0] == "check-call tunefleet torch=2.13.0+cpu", calls
    assert lines.index(f"prepare-call prepare {HOSTILE_PATH}") > 0


def test_failed_python_check_stops_everything(tmp_path: Path) -> None:
    rc, out, calls = _run_script(
        tmp_path, ClusterSpec(), launch=Launch(prepare=True), extra_env={"STUB_CHECK_RC": "3"}
    )
    assert rc == EXIT_REFUSED and "the job's Python cannot run tunefleet (exit 3)" in out, out
    assert "fix: run `tunefleet slurm` with the Python the nodes should use" in out
    assert calls.splitlines() == ["check-call tunefleet torch"], calls  # no prepare, no srun, no requeue


def test_python_check_program_with_real_interpreters(tmp_path: Path) -> None:
    """The check the script runs, run by this interpreter (passes; fails on another version) and
    by one without tunefleet (the system Python 3, when there is one)."""
    from importlib.metadata import version

    have = {name: version(name) for name in PYTHON_CHECK_IMPORTS}
    ok = subprocess.run(
        [sys.executable, "-c", PYTHON_CHECK, "import", *(f"{n}={v}" for n, v in have.items())],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert (
        f"tunefleet: python {sys.executable}: tunefleet {have['tunefleet']}, torch {have['torch']}"
        in ok.stdout
    )
    other = subprocess.run(
        [sys.executable, "-c", PYTHON_CHECK, "find", "tunefleet", "torch=1.0.0"],
        capture_output=True,
        text=True,
    )
    assert other.returncode == 3
    assert f"torch is {have['torch']} here, but 1.0.0 where this job was written" in other.stderr
    bare = shutil.which("python3", path="/usr/bin:/bin")
    if bare is None or subprocess.run([bare, "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip("no Python 3 without torch on this machine")
    missing = subprocess.run(
        [bare, "-c", PYTHON_CHECK, "import", "tunefleet", "torch"], capture_output=True, text=True
    )
    assert missing.returncode == 3
    assert "cannot import tunefleet: ModuleNotFoundError: No module named 'tunefleet'" in missing.stderr


def test_failed_prepare_stops_before_the_launch(tmp_path: Path) -> None:
    rc, out, calls = _run_script(
        tmp_path, ClusterSpec(), launch=Launch(prepare=True), extra_env={"STUB_PREPARE_RC": "2"}
    )
    assert rc == 2 and "tunefleet prepare failed (exit 2)" in out
    assert "srun-option" not in calls and "requeue" not in calls


@pytest.mark.parametrize(
    ("preempt_time", "requeued"),
    [("2026-01-01T10:05:00", True), ("2026-01-01T09:59:00", False), ("None", False)],
    ids=["preempted-now", "preempted-in-an-earlier-attempt", "not-preempted"],
)
def test_partition_preemption_is_detected_and_requeued(
    tmp_path: Path, preempt_time: str, requeued: bool
) -> None:
    """The step ends with 143 (TERM) before GraceTime is over: only PreemptTime >= StartTime of this
    attempt (scontrol show job) makes the script run again; a plain failure is never requeued."""
    rc, out, calls = _run_script(
        tmp_path, ClusterSpec(), rc=143, extra_env={"STUB_PREEMPT_TIME": preempt_time}
    )
    assert ("scontrol requeue 4242" in calls) == requeued, (out, calls)
    assert rc == (EXIT_REQUEUE if requeued else 143)
    assert ("the job was preempted at" in out) == requeued


def test_term_without_preemption_is_not_restarted(tmp_path: Path) -> None:
    """scancel (or the time limit) sends TERM to the batch shell: it waits for the trainer's
    checkpoint, then stops without requeuing itself."""
    rc, out, calls = _run_script(
        tmp_path, ClusterSpec(), rc=EXIT_REQUEUE, extra_env={"STUB_TERM_BATCH_SHELL": "1"}
    )
    assert "TERM received" in out and "not restarting from here" in out, out
    assert rc == EXIT_REQUEUE and "requeue" not in calls
