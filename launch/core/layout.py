"""The run directory's layout and the contract between the processes of a run.

File names in `output_dir`, exit codes, the environment variables the launcher hands to the
ranks, and the two ways tunefleet writes files: `atomic_write` (a whole file or none) and
`atomic_dir` (a whole directory or none). Pure Python, no torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------- files in output_dir

RESOLVED_RECIPE = "recipe.yaml"
"""The fully resolved recipe the run trains from (every default written out)."""

RESOLVED_MARKER = "# resolved recipe"
"""How every resolved recipe tunefleet writes starts: a `recipe.yaml` that does not is the user's own
(a recipe kept in its output directory), which no command replaces."""

PLAN_FILE = "plan.json"
"""The plan the run really runs with, and what is in effect (`in_effect`)."""

METRICS_FILE = "metrics.jsonl"
"""One JSON object per logged optimizer step and per evaluation."""

LOSS_PLOT = "loss.png"
SAMPLES_FILE = "samples.jsonl"
FINAL_DIR = "final"
"""The finished run's adapter and tokenizer; its presence means the run is finished."""

LAUNCH_DIR = "launch"
"""What `tunefleet launch` wrote before the ranks started (configs, resolved recipe, command)."""

SLURM_SCRIPT = "slurm.sbatch"
SLURM_CONFIG_DIR = "slurm"
"""The accelerate (and DeepSpeed) configs of a GPU SLURM job."""

SLURM_JOB_FILE = "slurm-job.json"
"""Every job `tunefleet slurm --submit` submitted for this output directory."""

TRACKING_FILE = "tracking.json"
CACHE_DIR = ".cache"
"""Tokenised data written by `tunefleet prepare` or the first rank of a run (safe to delete)."""

# ----------------------------------------------------------------------------- exit codes

EXIT_OK = 0
EXIT_REFUSED = 2
"""A check refused the run (bad recipe, data, output directory, ...): nothing was trained."""

EXIT_DIVERGED = 3
"""The loss or the gradient norm stopped being finite: the run stopped at that step, wrote no
checkpoint after it and no final/ (`errors.DivergedError`)."""

EXIT_REQUEUE = 75
"""The trainer wrote a complete checkpoint on a stop signal and asks to run again (EX_TEMPFAIL)."""

# ----------------------------------------------------------------------------- launcher -> ranks

ENV_EXIT_FILE = "TUNEFLEET_EXIT_FILE"
"""Rank 0 writes its exit code there: accelerate's and torchrun's launchers turn any failure into 1,
which would hide EXIT_REQUEUE and EXIT_REFUSED."""

ENV_DISTRIBUTED_TYPE = "TUNEFLEET_DISTRIBUTED_TYPE"
"""accelerate's distributed type every rank must see; set only by `tunefleet launch`/`slurm`."""

ENV_WORLD_SIZE = "TUNEFLEET_WORLD_SIZE"
ENV_NUM_MACHINES = "TUNEFLEET_NUM_MACHINES"
ENV_STRATEGY = "TUNEFLEET_STRATEGY"
ENV_USE_CPU = "TUNEFLEET_USE_CPU"

ENV_START = "TUNEFLEET_START"
"""How the run starts in its output directory (fresh / resume which checkpoint), as the launcher
decided it (`rundir.Start.to_env`): the ranks use it instead of scanning the checkpoints again."""

ENV_PREPARE_WAIT_S = "TUNEFLEET_PREPARE_WAIT_S"
"""Seconds the other ranks wait without a sign of progress while the first rank tokenises the data
into the cache (default 1800)."""


# ----------------------------------------------------------------------------- writing


def move_aside(path: Path, label: str = "old") -> Path:
    """Rename `path` to `<name>.<label>-<time>` beside it (`-N` added when that name is taken: an
    earlier one is never replaced) and return the new path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.{label}-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.{label}-{stamp}-{n}")
        n += 1
    path.rename(target)
    return target


def atomic_write(path: str | os.PathLike, data: str | bytes, *, mode: int | None = None) -> Path:
    """Write `data` to `path` through a temporary file in the same directory and a rename: a
    reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, mode if mode is not None else 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """`atomic_write` of indented JSON."""
    return atomic_write(path, json.dumps(data, indent=2, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, first_wins: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `target`; rename it to `target` when the block
    ends without an error (removed otherwise). `target` must not exist yet; with `first_wins`, a
    `target` another process completed meanwhile is kept and this copy dropped."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        try:
            tmp.rename(target)
        except OSError:
            if not (first_wins and target.is_dir()):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- reading


def read_json(path: str | os.PathLike) -> tuple[Any, str | None]:
    """(the JSON in `path`, None), or (None, why it cannot be read) for a state file that is torn
    (a write cut by a kill or a full disk) or unreadable. A missing file is (None, None)."""
    path = Path(path)
    if not path.exists():
        return None, None
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except json.JSONDecodeError as exc:
        return (
            None,
            f"{path.name} is not valid JSON ({exc.msg}: line {exc.lineno}, column {exc.colno}; a torn write?)",
        )
    except ValueError as exc:  # not UTF-8
        return None, f"{path.name} is not valid JSON ({exc}; a torn write?)"
    except OSError as exc:
        return None, f"{path.name} cannot be read ({exc.strerror or exc})"


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON objects of a JSON Lines file ([] when it does not exist). A line that does not
    parse (being written right now by another process) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def read_metrics(out: str | os.PathLike) -> list[dict[str, Any]]:
    """Every row of `<out>/metrics.jsonl`: training steps (`loss`) and evaluations (`eval_loss`)."""
    return read_jsonl(Path(out) / METRICS_FILE)


def training_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of logged optimizer steps (not evaluations)."""
    return [r for r in rows if r.get("loss") is not None]
