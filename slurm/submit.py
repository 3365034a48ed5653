"""Write, check and submit a script rendered by `tunefleet.slurm.sbatch` (the thin runner)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tunefleet.launch.core.errors import TunefleetError
from tunefleet.launch.core.layout import atomic_write


class SubmitError(TunefleetError):
    """sbatch is missing or refused the script."""


_LOG_OPTION = re.compile(r"^#SBATCH --(?:output|error)=(\S+)$", re.MULTILINE)


def write_script(text: str, path: str | os.PathLike) -> Path:
    """Write the script (mode 0755) and create the log directories it names: SLURM cannot open a
    log in a missing directory, and the job then fails without a word. A relative log path is
    taken from the current directory, where sbatch will run."""
    written = atomic_write(path, text, mode=0o755)
    for log in _LOG_OPTION.findall(text):
        directory = os.path.dirname(log)
        if directory and "%" not in directory:
            Path(directory).mkdir(parents=True, exist_ok=True)
    return written


def _sbatch(args: Sequence[str]) -> subprocess.CompletedProcess:
    if shutil.which("sbatch") is None:
        raise SubmitError(
            "sbatch is not on PATH", "run this on a SLURM login node (or load the slurm module)"
        )
    result = subprocess.run(["sbatch", *args], capture_output=True, text=True)
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip()
        raise SubmitError(
            f"sbatch {' '.join(args)} failed: {message}",
            "fix the cluster spec (partition, account, resources) and render again",
        )
    return result


def test_only(path: str | os.PathLike, *, sbatch_args: Sequence[str] = ()) -> str:
    """Ask the scheduler whether and when the script would start, without submitting it
    (`sbatch --test-only`); returns sbatch's answer."""
    result = _sbatch(["--test-only", *sbatch_args, str(path)])
    return (result.stderr + result.stdout).strip()


test_only.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def submit(path: str | os.PathLike, *, sbatch_args: Sequence[str] = ()) -> str:
    """Submit the script; returns the job id. `sbatch_args` go before the script
    (e.g. `--dependency=afterany:123` to chain after a job)."""
    result = _sbatch(["--parsable", *sbatch_args, str(path)])
    job_id = result.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SubmitError(
            f"sbatch printed {result.stdout.strip()!r} instead of a job id",
            "check `squeue --me` whether the job was queued; a site wrapper around sbatch may print more",
        )
    return job_id
