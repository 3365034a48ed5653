"""The job's Python on a real SLURM cluster (slurmctld + 4 emulated CPU nodes on this machine).

`.venv/bin/tunefleet slurm ... --submit` is run as a user who never activated the venv would run
it: from a shell whose PATH holds no venv, without --env-setup or --python. The job must find
tunefleet on both nodes and train. Then a job whose --env-setup takes the venv off PATH before
`--python python` is looked up: the script's own check must stop it in seconds, before `tunefleet
prepare` and srun, with the fix in the log.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import datetime
from importlib import metadata
from pathlib import Path

import pytest

from tests.short_run import DEMO
from tests.slurm_cluster import SlurmCluster
from tunefleet.launch.core.layout import EXIT_REFUSED

pytest_plugins = ["tests.conftest_slurm"]
pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TUNEFLEET = Path(sys.executable).parent / "tunefleet"
"""The console script a user who ran `make demo` types: `.venv/bin/tunefleet`."""
PYTHON = TUNEFLEET.read_text().splitlines()[0].removeprefix("#!")
"""The interpreter it runs in (its shebang: `.venv/bin/python3`), which the job must run too."""
SHORT = ["data.limit=32", "data.max_length=64", "train.max_steps=2", "train.save_steps=0"]
BARE_PATH = "/usr/local/bin:/usr/bin:/bin"
"""A PATH without the venv (the slurm client programs are in /usr/bin)."""


def _submit(out: Path, cluster: SlurmCluster, *args: str, path: str) -> tuple[str, str]:
    env = {k: v for k, v in cluster.env.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(PATH=path, OMP_NUM_THREADS="1")
    argv = [str(TUNEFLEET), "slurm", str(DEMO), "--nodes", "2", "--gpus-per-node", "0", "--time", "10"]
    for item in [f"output_dir={out}", *SHORT]:
        argv += ["--set", item]
    proc = subprocess.run([*argv, *args, "--submit"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"submitted job (\d+)", proc.stdout)
    assert match, proc.stdout
    return match.group(1), proc.stdout


def test_job_submitted_without_the_venv_on_path_trains(tmp_path: Path, slurm_cluster: SlurmCluster) -> None:
    out = tmp_path / "run"
    job, printed = _submit(out, slurm_cluster, path=BARE_PATH)
    assert f"python   {PYTHON} (must import tunefleet" in printed
    info = slurm_cluster.wait(job, "COMPLETED", timeout_s=300)
    log = (out / f"slurm-{job}.out").read_text()
    assert info["NodeList"] == "n[1-2]", log
    versions = f"tunefleet {metadata.version('tunefleet')}, torch {metadata.version('torch')}"
    assert f"tunefleet: python {PYTHON}: {versions}" in log, log
    assert "No module named" not in log and (out / "final" / "adapter_model.safetensors").is_file(), log


def test_job_whose_python_cannot_run_tunefleet_stops_in_seconds(
    tmp_path: Path, slurm_cluster: SlurmCluster
) -> None:
    """Accepted on the login node (`python` is the venv's there), but --env-setup takes the venv
    off PATH in the job: the check fails before anything starts, and the log says what to do."""
    out = tmp_path / "run"
    venv_path = f"{Path(sys.executable).parent}:{BARE_PATH}"
    job, _ = _submit(
        out, slurm_cluster, "--python", "python", "--env-setup", f"export PATH={BARE_PATH}", path=venv_path
    )
    info = slurm_cluster.wait(job, "FAILED", timeout_s=180)
    took_s = (
        datetime.fromisoformat(info["EndTime"]) - datetime.fromisoformat(info["StartTime"])
    ).total_seconds()
    log = (out / f"slurm-{job}.out").read_text()
    assert info["ExitCode"] == f"{EXIT_REFUSED}:0" and info["Restarts"] == "0", (info, log)
    assert (
        "the job's Python cannot run tunefleet" in log and "fix: run `tunefleet slurm` with the Python" in log
    )
    assert took_s < 60, f"the check took {took_s:.0f} s"
    # nothing started: no tokenised cache, no launcher, no training output
    assert "tokenised" not in log and not (out / ".cache").exists(), log
    assert not (out / "metrics.jsonl").exists()
    print(f"\nthe job's Python check failed the job {took_s:.0f} s after it started running")


def test_submitting_shell_has_no_venv() -> None:
    """The shell of the tests above really has no venv: the plain `python3` there lacks tunefleet."""
    result = subprocess.run(
        ["python3", "-c", "import tunefleet"],
        env={"PATH": BARE_PATH, "HOME": os.environ.get("HOME", "/root")},
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "No module named 'tunefleet'" in result.stderr
