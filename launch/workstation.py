"""`tunefleet launch`: one machine, N processes, through `accelerate launch`.

`prepare_launch` is pure apart from reading the recipe and looking at the output directory: it
resolves the recipe on the asked hardware (`compat.resolve`, refusing what is known to break),
renders the accelerate/DeepSpeed configs, the launched (fully resolved) recipe and the command,
and returns them with the notes. `write_launch_files` writes them into `<output_dir>/launch/`;
`run_launch` runs the command (`command.run_command`: own process group, signals forwarded)
and returns the run's exit code. No torch here.

The ranks read `<output_dir>/launch/recipe.yaml`, so what is launched is exactly what was
printed. Starting over (`--overwrite`) moves the old run aside here, before the new files are
written; the ranks then find a fresh directory.
"""

from __future__ import annotations

import dataclasses
import shlex
import socket
from pathlib import Path

from tunefleet.launch.command import build_launch_command, format_command, run_command
from tunefleet.launch.core import recipe as recipe_mod
from tunefleet.launch.core import rundir
from tunefleet.launch.core.args import StartOptions
from tunefleet.launch.core.errors import TunefleetError
from tunefleet.launch.core.hardware import Hardware
from tunefleet.launch.core.layout import ENV_EXIT_FILE, LAUNCH_DIR, atomic_write
from tunefleet.launch.core.recipe import Recipe
from tunefleet.launch.preflight import preflight
from tunefleet.launch.templates import render_files

RECIPE_FILE = "recipe.yaml"
COMMAND_FILE = "command.txt"
EXIT_FILE = "exit_code"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LaunchPlan:
    recipe: Recipe
    """The resolved recipe the ranks run (compat.resolve on `hw`)."""
    hw: Hardware
    notes: list[str]
    """One line per setting compat filled in or changed."""
    config_dir: Path
    """`<output_dir>/launch`."""
    files: dict[str, str]
    """File name -> text, written into config_dir (accelerate.yaml, deepspeed.json, recipe.yaml, command.txt)."""
    argv: list[str]
    env: dict[str, str]
    """Variables added to the environment of the launch."""
    start: str
    """What the ranks will find in output_dir: `fresh`, `resume`, or `overwrite` (moved aside first)."""
    resume_notes: list[str] = dataclasses.field(default_factory=list)
    """Harmless changes since the checkpoint a resume continues from."""
    warnings: list[str] = dataclasses.field(default_factory=list)
    """Settings that run, but probably not as meant."""
    start_note: str | None = None
    """Why the newest checkpoint was passed over (damaged), when it was."""


def hardware(*, nproc: int | None, gpus: int | None, visible_gpus: int, main_port: int) -> Hardware:
    """`--nproc N`: N CPU processes; `--gpus N`: N GPU processes; neither: every visible GPU, else 1 CPU process."""
    if nproc is not None and gpus is not None:
        raise TunefleetError(
            "--nproc and --gpus exclude each other", "--nproc N for CPU processes, --gpus N for GPUs"
        )
    for flag, value in (("--nproc", nproc), ("--gpus", gpus)):
        if value is not None and value < 1:
            raise TunefleetError(f"{flag} {value}: at least 1 process", f"use e.g. {flag} 2")
    if nproc is not None:
        return Hardware(num_processes=nproc, use_cpu=True, main_process_port=main_port)
    if gpus is not None:
        return Hardware(num_processes=gpus, use_cpu=False, main_process_port=main_port)
    if visible_gpus > 0:
        return Hardware(num_processes=visible_gpus, use_cpu=False, main_process_port=main_port)
    return Hardware(num_processes=1, use_cpu=True, main_process_port=main_port)


def free_port() -> int:
    """An unused TCP port on this machine (the rendezvous port when --main-port is not given)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare_launch(
    recipe_path: str,
    overrides: list[str],
    hw: Hardware,
    *,
    options: StartOptions | None = None,
    python: str | None = None,
) -> LaunchPlan:
    """Everything `tunefleet launch` writes and runs, computed without starting anything."""
    options = options or StartOptions()
    checked = preflight(recipe_mod.load(recipe_path, overrides), hw, options)
    recipe = checked.recipe
    config_dir = Path(recipe.output_dir).absolute() / LAUNCH_DIR
    files = render_files(recipe, hw, str(config_dir))
    origin = shlex.join([recipe_path, *(arg for o in overrides for arg in ("--set", o))])
    files[RECIPE_FILE] = f"# launched by: tunefleet launch {origin}\n" + recipe_mod.dump(recipe)
    paths = {name: str(config_dir / name) for name in files}
    argv, env = build_launch_command(paths[RECIPE_FILE], paths, hw, recipe=recipe, python=python)
    argv += options.argv()
    env[ENV_EXIT_FILE] = str(config_dir / EXIT_FILE)
    files[COMMAND_FILE] = "".join(f"# note: {n}\n" for n in checked.notes) + format_command(argv, env) + "\n"
    return LaunchPlan(
        recipe=recipe,
        hw=hw,
        notes=checked.notes,
        config_dir=config_dir,
        files=files,
        argv=argv,
        env=env,
        start=checked.start.mode,
        resume_notes=checked.resume_notes,
        warnings=checked.warnings,
        start_note=checked.start.note,
    )


def write_launch_files(plan: LaunchPlan) -> None:
    """Move an old run aside (`--overwrite`), then write the files into `<output_dir>/launch/`."""
    if plan.start == "overwrite":
        moved = rundir.move_aside(Path(plan.recipe.output_dir))
        print(f"moved the previous run aside: {moved}", flush=True)
    for name, text in plan.files.items():
        atomic_write(plan.config_dir / name, text)
    (plan.config_dir / EXIT_FILE).unlink(missing_ok=True)


def run_launch(plan: LaunchPlan) -> int:
    """Run the command; return the run's exit code (rank 0's, when the launcher hid it behind 1)."""
    code = run_command(plan.argv, plan.env)
    exit_file = plan.config_dir / EXIT_FILE
    if code != 0 and exit_file.is_file():
        try:
            ranks_code = int(exit_file.read_text().strip())
        except ValueError:
            return code
        return ranks_code or code
    return code


def summary(plan: LaunchPlan, *, dry_run: bool = False) -> str:
    """What is printed before the launch (and by --dry-run)."""
    hw = plan.hw
    where = "CPU (gloo)" if hw.use_cpu else "GPU"
    start = {
        "fresh": "new run",
        "resume": "continues its newest checkpoint",
        "overwrite": "the old run is moved aside",
    }.get(plan.start, plan.start)
    lines = [
        f"tunefleet launch: parallel.strategy={plan.recipe.parallel.strategy}, {hw.num_processes} {where} "
        f"process(es), output_dir={plan.recipe.output_dir} ({start})"
    ]
    lines += [f"  note: {n}" for n in plan.notes]
    lines += [f"  note: {plan.start_note}"] if plan.start_note else []
    lines += [f"  changed since the checkpoint (harmless): {n}" for n in plan.resume_notes]
    lines += [f"  warning: {w}" for w in plan.warnings]
    lines += [f"  {'would write' if dry_run else 'wrote'} {plan.config_dir / name}" for name in plan.files]
    lines += ["", plan.files[COMMAND_FILE].splitlines()[-1]]
    return "\n".join(lines)
