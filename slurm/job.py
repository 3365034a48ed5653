"""`tunefleet slurm`: from a recipe and a cluster request to a restartable SLURM job.

Everything is checked before a file is written: the recipe and its `--set` overrides, the batch
math on this node count (`plan_batch` with world = nodes x processes per node), the output
directory (a finished run, or a checkpoint of a different training, is refused) and the sbatch
options. `build_job` returns the file texts; `write_job` writes them:

- `<output_dir>/recipe.yaml`: the resolved recipe (overrides baked in, output_dir absolute).
  Every node and every restart trains from this one file;
- the sbatch script (`<output_dir>/slurm.sbatch` unless `--out`), which runs `tunefleet
  prepare` once in the batch shell, then one launcher per node.

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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunefleet.launch import recipe as recipe_mod
from tunefleet.launch.batch import BatchPlan, plan_batch
from tunefleet.launch.errors import TunefleetError
from tunefleet.launch.recipe import Recipe
from tunefleet.slurm import status as status_mod
from tunefleet.slurm.sbatch import DEFAULT_CHECKPOINT_S, ClusterSpec, Launch, render_sbatch

RESOLVED_RECIPE = "recipe.yaml"
"""The same file name the trainer writes its resolved recipe to."""

SCRIPT_FILE = "slurm.sbatch"
CONFIG_DIR = "slurm"
"""`<output_dir>/slurm/`: the accelerate (and DeepSpeed) configs of a GPU job."""


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


def measured_checkpoint_s(out: Path) -> tuple[int, str]:
    """Seconds from a stop signal to a complete checkpoint, as an earlier attempt measured them."""
    from tunefleet.distributed import checkpoint as ckpt

    saves = []
    for path in ckpt.complete_checkpoints(out):
        try:
            saves.append(float(ckpt.read_manifest(path)["save_s"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if not saves:
        return DEFAULT_CHECKPOINT_S, f"default {DEFAULT_CHECKPOINT_S} s (no earlier checkpoint in {out})"
    step_s = max(status_mod.step_times_s(status_mod.read_metrics(out)), default=0.0)
    seconds = max(1, math.ceil(max(saves) + step_s))
    return seconds, (
        f"measured {seconds} s: slowest save {max(saves):.2f} s of {len(saves)} checkpoint(s) "
        f"+ slowest step {step_s:.2f} s"
    )


def _accelerate_configs(
    recipe: Recipe, spec: ClusterSpec, world_size: int, out: Path, launch: Launch
) -> tuple[Recipe, dict[Path, str], Launch, dict[str, str]]:
    """GPU nodes: the recipe resolved for the hardware (compat matrix), the accelerate/DeepSpeed
    files for `<out>/slurm/`, the launch using them, and the variables the trainer checks."""
    from tunefleet.launch import compat, templates
    from tunefleet.launch.command import launch_env

    hw = templates.Hardware(
        num_processes=world_size,
        num_machines=spec.nodes,
        # the script passes --main_process_ip (the first node of the allocation), which wins
        main_process_ip="set-by-the-sbatch-script" if spec.nodes > 1 else None,
        use_cpu=False,
    )
    recipe = compat.resolve(recipe, hw)
    config_dir = out / CONFIG_DIR
    files = {
        config_dir / name: text for name, text in templates.render_files(recipe, hw, str(config_dir)).items()
    }
    launch = dataclasses.replace(launch, accelerate_config=str(config_dir / templates.ACCELERATE_FILE))
    return recipe, files, launch, launch_env(recipe, hw)


def _check_output_dir(out: Path, recipe: Recipe) -> str | None:
    """Refuse what the trainer on the nodes would refuse, before anything is written."""
    from tunefleet.distributed import rundir

    try:
        mode, checkpoint = rundir.decide_start(
            out, rundir.inspect_output_dir(out), overwrite=False, no_resume=False
        )
        if checkpoint:
            rundir.check_resume(checkpoint, recipe)
    except TunefleetError as exc:
        raise TunefleetError(
            exc.problem,
            "choose a new output_dir (--set output_dir=...), or move the old run aside yourself",
        ) from None
    return checkpoint if mode == "resume" else None


def build_job(
    recipe_file: str | Path,
    overrides: list[str],
    spec: ClusterSpec,
    *,
    script_path: str | Path | None = None,
    python: str = "python",
    measure_checkpoint: bool = True,
) -> Job:
    """Load and check everything; return the texts to write. With `measure_checkpoint`,
    `spec.checkpoint_s` is replaced by what an earlier attempt measured (or the default)."""
    recipe = recipe_mod.load(recipe_file, overrides)
    out = Path(os.path.abspath(os.path.expanduser(recipe.output_dir)))
    recipe = dataclasses.replace(recipe, output_dir=str(out))
    procs = spec.procs_per_node if spec.procs_per_node is not None else (spec.gpus_per_node or 1)
    batch = plan_batch(
        micro_batch_size=recipe.batch.micro_batch_size,
        global_batch_size=recipe.batch.global_batch_size,
        max_length=recipe.data.max_length,
        world_size=spec.nodes * procs,
        procs_per_node=procs,
    )
    launch = Launch(python=python, prepare=True)
    config_files: dict[Path, str] = {}
    if spec.gpus_per_node > 0:  # accelerate launch, with the configs `tunefleet launch` renders
        recipe, config_files, launch, env = _accelerate_configs(recipe, spec, batch.world_size, out, launch)
        spec = dataclasses.replace(spec, env={**env, **spec.env})
    resume_from = _check_output_dir(out, recipe)
    if measure_checkpoint:
        checkpoint_s, note = measured_checkpoint_s(out)
        spec = dataclasses.replace(spec, checkpoint_s=checkpoint_s)
    else:
        note = f"given: {spec.checkpoint_s} s"
    recipe_path = out / RESOLVED_RECIPE
    script = Path(os.path.abspath(script_path)) if script_path else out / SCRIPT_FILE
    text = render_sbatch(
        spec,
        recipe_path=str(recipe_path),
        output_dir=str(out),
        launch=launch,
    )
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
        batch=batch,
        checkpoint_note=note,
        resume_from=resume_from,
        config_files=config_files,
    )


def write_job(job: Job) -> None:
    from tunefleet.slurm.submit import write_script

    job.recipe_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = job.recipe_path.with_name(f".{job.recipe_path.name}.tmp")
    tmp.write_text(job.recipe_text, encoding="utf-8")
    tmp.replace(job.recipe_path)
    for path, text in job.config_files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    write_script(job.script_text, job.script_path)


def submit_job(job: Job) -> str:
    """Submit the written script; record the job id for `tunefleet status`; return it."""
    from tunefleet.slurm.submit import submit

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
