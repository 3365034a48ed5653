"""`tunefleet slurm`: from a recipe and a cluster request to a restartable SLURM job.

Everything is checked before a file is written: the recipe and its `--set` overrides, the batch
math on this node count (`plan_batch` with world = nodes x processes per node), the output
directory (a finished run, or a checkpoint of a different training, is refused) and the sbatch
options. `build_job` returns the file texts; `write_job` writes them:

- `<output_dir>/recipe.yaml`: the resolved recipe (overrides baked in, output_dir absolute).
  Every node and every restart trains from this one file;
- the sbatch script (`<output_dir>/slurm.sbatch` unless `--out`), which checks that the job's
  Python imports tunefleet and torch at this machine's versions, runs `tunefleet prepare` once in
  the batch shell, then one launcher per node.

The job's Python is the interpreter running `tunefleet slurm` (`sys.executable`, absolute: a venv
works without being activated), or `--python`, which must be one executable found here that
imports tunefleet at the same versions (`job_python`).

`submit_job` records the job id in `<output_dir>/slurm-job.json` for `tunefleet status`.

The signal lead (how long before the time limit SLURM warns the job) is the checkpoint time an
earlier attempt in this output directory measured, the largest `save_s` of its checkpoint
manifests plus its slowest step (the trainer stops at a step boundary), rounded up; without an
earlier attempt it is DEFAULT_CHECKPOINT_S. `signal_margin_s` (>= 60 s) comes on top.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from tunefleet.launch.command import launch_env
from tunefleet.launch.core import checkpoints as ckpt
from tunefleet.launch.core import recipe as recipe_mod
from tunefleet.launch.core.args import StartOptions
from tunefleet.launch.core.batch import BatchPlan
from tunefleet.launch.core.errors import RunDirError, TunefleetError
from tunefleet.launch.core.hardware import Hardware
from tunefleet.launch.core.layout import (
    RESOLVED_MARKER,
    RESOLVED_RECIPE,
    SLURM_CONFIG_DIR,
    SLURM_SCRIPT,
    atomic_write,
    read_metrics,
    training_rows,
)
from tunefleet.launch.core.recipe import Recipe
from tunefleet.launch.preflight import Preflight, preflight
from tunefleet.launch.templates import ACCELERATE_FILE, expected_distributed_type, render_files
from tunefleet.slurm import status as status_mod
from tunefleet.slurm.sbatch import (
    DEFAULT_CHECKPOINT_S,
    PYTHON_CHECK,
    PYTHON_CHECK_IMPORTS,
    PYTHON_FIX,
    ClusterSpec,
    Launch,
    check_spec,
    render_sbatch,
)
from tunefleet.slurm.submit import submit, write_script


@dataclass(frozen=True, kw_only=True)
class Job:
    """A job ready to be written and submitted (nothing is written yet)."""

    recipe: Recipe
    recipe_path: Path
    recipe_text: str
    script_path: Path
    script_text: str
    spec: ClusterSpec
    batch: BatchPlan
    checkpoint_note: str
    """Where checkpoint_s (and so the signal lead) came from."""
    resume_from: str | None
    """The checkpoint the job will continue from, when the output directory holds one."""
    config_files: dict[Path, str] = dataclasses.field(default_factory=dict)
    """The accelerate (and DeepSpeed) configs of a GPU job, by path."""
    notes: list[str] = dataclasses.field(default_factory=list)
    """One line per setting the compatibility matrix filled in or changed."""
    warnings: list[str] = dataclasses.field(default_factory=list)
    """Settings that run, but probably not as meant."""
    python: str = ""
    """The interpreter the job runs (checked by the script before anything starts)."""
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    """The versions of tunefleet and torch it must have (this machine's)."""


def measured_checkpoint_s(out: Path) -> tuple[int, str]:
    """Seconds from a stop signal to a complete checkpoint, as an earlier attempt measured them."""
    saves = []
    for path in ckpt.complete_checkpoints(out):
        try:
            saves.append(float(ckpt.read_manifest(path).save_s))
        except (OSError, ValueError, TypeError):
            continue
    if not saves:
        return DEFAULT_CHECKPOINT_S, f"default {DEFAULT_CHECKPOINT_S} s (no earlier checkpoint in {out})"
    step_s = max(status_mod.step_times_s(training_rows(read_metrics(out))), default=0.0)
    seconds = max(1, math.ceil(max(saves) + step_s))
    return seconds, (
        f"measured {seconds} s: slowest save {max(saves):.2f} s of {len(saves)} checkpoint(s) "
        f"+ slowest step {step_s:.2f} s"
    )


def login_versions() -> dict[str, str]:
    """The versions of tunefleet and torch in this interpreter: the job's Python must have them."""
    versions = {}
    for name in PYTHON_CHECK_IMPORTS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # not installed as a distribution: check the import only
            continue
    return versions


def job_python(python: str | None, versions: dict[str, str]) -> str:
    """The interpreter the job runs: this one (`sys.executable`, as submitit does) unless `--python`
    names another, which must be one executable found here that imports tunefleet at the same
    versions (the job checks again on the node, after `--env-setup`)."""
    if python is None:
        return os.path.abspath(sys.executable)
    found = shutil.which(python)
    if found is None:
        words = python.split()
        if len(words) > 1 and shutil.which(words[0]):
            raise TunefleetError(
                f"--python {python!r} is not one executable: the job runs it as one program name",
                f"pass the interpreter alone (--python {words[0]}); set interpreter options through "
                "variables (--env PYTHONUNBUFFERED=1)",
            )
        raise TunefleetError(f"--python {python!r}: no such executable here", PYTHON_FIX)
    wanted = [f"{name}={versions.get(name, '')}" for name in PYTHON_CHECK_IMPORTS]
    try:
        result = subprocess.run(
            [found, "-c", PYTHON_CHECK, "find", *wanted], capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TunefleetError(f"--python {python!r} ({found}) does not run: {exc}", PYTHON_FIX) from None
    if result.returncode != 0:
        lines = [line.removeprefix("tunefleet: ") for line in result.stderr.strip().splitlines()]
        said = "; ".join(lines[1:] or lines[-3:])  # the first line names the interpreter
        raise TunefleetError(f"--python {python!r} ({found}) cannot run tunefleet: {said}", PYTHON_FIX)
    return python


SCRIPT_MARKER = "# Generated by tunefleet.slurm.sbatch.render_sbatch"
"""The first lines tunefleet writes: a file that starts otherwise is not tunefleet's to replace."""


def _check_writable_output(path: Path, what: str, marker: str, inputs: list[Path]) -> None:
    """Never overwrite a file tunefleet did not write, an input of the run, or a directory."""
    if any(path.resolve() == p.expanduser().resolve() for p in inputs if p.exists()) and not _starts_with(
        path, marker
    ):
        raise TunefleetError(
            f"{what} would be written to {str(path)!r}, which is an input of this run (the recipe or its data)",
            "write it elsewhere (--out FILE, or another output_dir)",
        )
    if path.is_dir():
        raise TunefleetError(
            f"{what} would be written to {str(path)!r}, which is a directory", "pass a file path (--out FILE)"
        )
    if path.exists() and not _starts_with(path, marker):
        raise TunefleetError(
            f"{str(path)!r} exists and was not written by tunefleet: {what} would overwrite it",
            "choose another path (--out FILE), or move that file away first",
        )


def _starts_with(path: Path, marker: str) -> bool:
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            head = f.read(4096)
    except OSError:
        return False
    return any(line.startswith(marker) for line in head.splitlines()[:3])


def _cluster_hardware(spec: ClusterSpec) -> Hardware:
    """The hardware of the job: nodes x processes per node, GPUs or CPUs."""
    procs = spec.procs_per_node if spec.procs_per_node is not None else (spec.gpus_per_node or 1)
    return Hardware(
        num_processes=spec.nodes * procs,
        num_machines=spec.nodes,
        # the script passes the first node of the allocation at run time, which wins
        main_process_ip="set-by-the-sbatch-script" if spec.nodes > 1 else None,
        use_cpu=spec.gpus_per_node == 0,
    )


def _needs_accelerate(recipe: Recipe, hw: Hardware) -> bool:
    """GPU nodes, and FSDP/DeepSpeed on CPU nodes, start their ranks with `accelerate launch` and the
    rendered configs (as `tunefleet launch` does); plain torchrun would leave DeepSpeed off and turn
    FSDP into DDP (the trainer's guard stops such a run). DDP on CPU nodes runs under torchrun."""
    return not hw.use_cpu or expected_distributed_type(recipe, hw) in ("FSDP", "DEEPSPEED")


def _accelerate_configs(recipe: Recipe, hw: Hardware, out: Path) -> tuple[dict[Path, str], str]:
    """The accelerate/DeepSpeed files for `<out>/slurm/` and the accelerate config's path."""
    config_dir = out / SLURM_CONFIG_DIR
    files = {config_dir / name: text for name, text in render_files(recipe, hw, str(config_dir)).items()}
    return files, str(config_dir / ACCELERATE_FILE)


def _preflight(recipe: Recipe, hw: Hardware, options: StartOptions) -> Preflight:
    """What the trainer on the nodes will check, checked here before anything is written."""
    try:
        return preflight(recipe, hw, options)
    except RunDirError as exc:  # `tunefleet slurm` has no --overwrite and no --resume
        removed = ckpt.scan(Path(recipe.output_dir)).weights_only
        raise RunDirError(
            exc.problem,
            f"pass --resume-weights-only to continue {removed.name}'s weights with a fresh optimizer, restore "
            "its optimizer state from a backup, or choose a new output_dir (--set output_dir=...)"
            if removed is not None and not options.weights_only
            else "choose a new output_dir (--set output_dir=...), or move the old run aside yourself",
        ) from None


def build_job(
    recipe_file: str | Path,
    overrides: list[str],
    spec: ClusterSpec,
    *,
    script_path: str | Path | None = None,
    python: str | None = None,
    measure_checkpoint: bool = True,
    weights_only: bool = False,
) -> Job:
    """Load and check everything; return the texts to write. `python`: the job's interpreter (None:
    this one, see `job_python`). With `measure_checkpoint`, `spec.checkpoint_s` is replaced by what
    an earlier attempt measured (or the default). `weights_only`: the job may continue a checkpoint
    whose optimizer state was removed (`--resume-weights-only`, handed to every node and restart)."""
    check_spec(spec)  # node and process counts before any batch math is done with them
    recipe = recipe_mod.load(recipe_file, overrides)
    out = Path(os.path.abspath(os.path.expanduser(recipe.output_dir)))
    hw = _cluster_hardware(spec)
    options = StartOptions(weights_only=weights_only)
    checked = _preflight(dataclasses.replace(recipe, output_dir=str(out)), hw, options)
    recipe = checked.recipe
    versions = login_versions()
    launch = Launch(
        python=job_python(python, versions),
        expect_versions=versions,
        prepare=True,
        module_args=tuple(options.argv()),  # it allows, it does not force: safe on every restart
    )
    config_files: dict[Path, str] = {}
    if _needs_accelerate(recipe, hw):  # accelerate launch, with the configs `tunefleet launch` renders
        config_files, accelerate_config = _accelerate_configs(recipe, hw, out)
        launch = dataclasses.replace(launch, accelerate_config=accelerate_config)
        spec = dataclasses.replace(spec, env={**launch_env(recipe, hw), **spec.env})
    if measure_checkpoint:
        checkpoint_s, note = measured_checkpoint_s(out)
        spec = dataclasses.replace(spec, checkpoint_s=checkpoint_s)
    else:
        note = f"given: {spec.checkpoint_s} s"
    recipe_path = out / RESOLVED_RECIPE
    script = Path(os.path.abspath(script_path)) if script_path else out / SLURM_SCRIPT
    data_paths = [s.data.path for s in recipe_mod.data_sources(recipe.data)] + [recipe.data.eval_path or ""]
    inputs = [Path(recipe_file), *(Path(p) for p in data_paths if p)]
    _check_writable_output(script, "the sbatch script (--out)", SCRIPT_MARKER, inputs)
    _check_writable_output(recipe_path, "the resolved recipe", RESOLVED_MARKER, inputs)
    text = render_sbatch(spec, recipe_path=str(recipe_path), output_dir=str(out), launch=launch)
    header = (
        f"# resolved recipe for SLURM, written by tunefleet slurm {time.strftime('%Y-%m-%d %H:%M:%S')} "
        f"from {os.path.abspath(recipe_file)}: every node and every restart trains from this file\n"
    )
    return Job(
        recipe=recipe,
        recipe_path=recipe_path,
        recipe_text=header + recipe_mod.dump(recipe),
        script_path=script,
        script_text=text,
        spec=spec,
        batch=checked.batch,
        checkpoint_note=note,
        resume_from=checked.start.checkpoint,
        config_files=config_files,
        notes=checked.notes,
        warnings=checked.warnings,
        python=launch.python,
        versions=versions,
    )


def write_job(job: Job) -> None:
    atomic_write(job.recipe_path, job.recipe_text)
    for path, text in job.config_files.items():
        atomic_write(path, text)
    write_script(job.script_text, job.script_path)


def submit_job(job: Job) -> str:
    """Submit the written script; record the job id for `tunefleet status`; return it."""
    job_id = submit(job.script_path)
    spec = job.spec
    entry: dict[str, Any] = {
        "job_id": job_id,
        "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "script": str(job.script_path),
        "recipe": str(job.recipe_path),
        "nodes": spec.nodes,
        "procs_per_node": job.batch.world_size // spec.nodes,
        "restart": spec.restart,
        "max_restarts": spec.max_restarts,
        "job_name": spec.job_name,
        "output": spec.output or str(Path(job.recipe.output_dir) / "slurm-%j.out"),
    }
    status_mod.record_job(Path(job.recipe.output_dir), entry)
    return job_id
