"""`tunefleet launch`: N processes through `accelerate launch`, on this machine or on each of several.

`prepare_launch` is pure apart from reading the recipe and looking at the output directory: it
resolves the recipe on the asked hardware (`compat.resolve`, refusing what is known to break),
renders the accelerate/DeepSpeed configs, the launched (fully resolved) recipe and the command,
and returns them with the notes. `write_launch_files` writes them into `<output_dir>/launch/`
(`launch/node-<R>/` on each of several machines); `run_launch` runs the command
(`command.run_command`: own process group, signals forwarded) and returns the run's exit code.
`start_nodes` lets the machines of a multi-machine launch meet first (`launch/join.py`). No torch.

The ranks read the launched `recipe.yaml`, so what is launched is exactly what was printed.
Starting over (`--overwrite`) moves the old run aside here (on node 0 only), before the new
files are written; the ranks then find a fresh directory.
"""

from __future__ import annotations

import dataclasses
import shlex
import socket
from pathlib import Path
from typing import Any

from tunefleet.launch.command import build_launch_command, format_command, run_command
from tunefleet.launch.core import recipe as recipe_mod
from tunefleet.launch.core import rundir
from tunefleet.launch.core.args import StartOptions
from tunefleet.launch.core.errors import TunefleetError
from tunefleet.launch.core.hardware import Hardware
from tunefleet.launch.core.layout import ENV_EXIT_FILE, ENV_START, LAUNCH_DIR, atomic_write
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
    checkpoint: str | None = None
    """The checkpoint a resume continues from."""
    decided: rundir.Start | None = None
    """How the ranks start (handed to them in ENV_START when they are started, not written into
    command.txt: rerunning that line later scans the output directory anew)."""
    data_fingerprint: str = ""
    """The bytes of the data this machine sees (preflight's), compared between machines at the join."""


def hardware(
    *,
    nproc: int | None,
    gpus: int | None,
    visible_gpus: int,
    main_port: int,
    nnodes: int = 1,
    node_rank: int = 0,
    main_address: str | None = None,
) -> Hardware:
    """`--nproc N`: N CPU processes; `--gpus N`: N GPU processes; neither: every visible GPU, else 1
    CPU process. Per machine: with `nnodes` machines the world is nnodes times as large."""
    if nproc is not None and gpus is not None:
        raise TunefleetError(
            "--nproc and --gpus exclude each other", "--nproc N for CPU processes, --gpus N for GPUs"
        )
    for flag, value, what in (
        ("--nproc", nproc, "process"),
        ("--gpus", gpus, "process"),
        ("--nnodes", nnodes, "machine"),
    ):
        if value is not None and value < 1:
            raise TunefleetError(f"{flag} {value}: at least 1 {what}", f"use e.g. {flag} 2")
    if nnodes > 1 and not main_address:
        raise TunefleetError(
            f"--nnodes {nnodes} needs --main-address (the address of node 0, reachable from every node)",
            "pass --main-address HOST --main-port PORT, the same on every machine",
        )
    if nnodes == 1 and node_rank != 0:
        raise TunefleetError(f"--node-rank {node_rank} without --nnodes", "pass --nnodes N on every machine")
    if nproc is not None:
        per_node, use_cpu = nproc, True
    elif gpus is not None:
        per_node, use_cpu = gpus, False
    else:
        per_node, use_cpu = (visible_gpus, False) if visible_gpus > 0 else (1, True)
    return Hardware(
        num_processes=per_node * nnodes,
        num_machines=nnodes,
        machine_rank=node_rank,
        main_process_ip=main_address if nnodes > 1 else None,
        main_process_port=main_port,
        use_cpu=use_cpu,
    )


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
    if hw.num_machines > 1:  # output_dir is shared: one directory per machine
        config_dir /= f"node-{hw.machine_rank}"
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
        checkpoint=checked.start.checkpoint,
        # the ranks continue from what this scan decided (an old run is moved aside before they start)
        decided=checked.start if checked.start.mode != "overwrite" else rundir.Start("fresh", None),
        data_fingerprint=checked.data_fingerprint,
    )


def write_launch_files(plan: LaunchPlan, lock: Any = None) -> None:
    """Move an old run aside (`--overwrite`, node 0 only; the output directory's `lock` follows into
    the new one), then write the files into the launch directory."""
    if plan.start == "overwrite" and plan.hw.machine_rank == 0:
        moved = rundir.move_aside(Path(plan.recipe.output_dir))
        if lock is not None:
            lock.follow(moved)
        print(f"moved the previous run aside: {moved}", flush=True)
    for name, text in plan.files.items():
        atomic_write(plan.config_dir / name, text)
    (plan.config_dir / EXIT_FILE).unlink(missing_ok=True)


def start_nodes(plan: LaunchPlan, *, join_timeout_s: float, lock: Any = None) -> None:
    """Several machines: meet the other nodes (`join.py`), then write this node's files. Node 0
    writes (and moves an old run aside) before it lets the others go, so that they never write
    into a directory about to be moved."""
    from tunefleet.launch import join

    hw = plan.hw
    start = (
        f"resume {Path(plan.checkpoint).name}" if plan.start == "resume" and plan.checkpoint else plan.start
    )
    me = join.Member(
        node_rank=hw.machine_rank,
        nodes=hw.num_machines,
        procs_per_node=hw.procs_per_machine,
        use_cpu=hw.use_cpu,
        recipe=recipe_mod.to_dict(plan.recipe),
        start=start,
        main_address=str(hw.main_process_ip),
        main_port=int(hw.main_process_port),
        data=plan.data_fingerprint,
    )
    address, port = str(hw.main_process_ip), hw.main_process_port
    print(
        f"node {hw.machine_rank} of {hw.num_machines}: "
        + (
            f"waiting for the other nodes on port {port} (up to {join_timeout_s:g} s)"
            if hw.machine_rank == 0
            else f"joining node 0 at {address}:{port} (up to {join_timeout_s:g} s)"
        ),
        flush=True,
    )
    if hw.machine_rank == 0:
        join.host(
            me,
            port=port,
            address=address,
            timeout_s=join_timeout_s,
            ready=lambda: write_launch_files(plan, lock),
        )
    else:
        join.join(me, address=address, port=port, timeout_s=join_timeout_s)
        write_launch_files(plan)
    print(f"node {hw.machine_rank}: all {hw.num_machines} nodes are here, starting", flush=True)


def run_launch(plan: LaunchPlan, lock: Any = None) -> int:
    """Run the command; return the run's exit code (rank 0's, when the launcher hid it behind 1). The
    ranks write under the launcher's `lock` of the output directory."""
    env = dict(plan.env)
    if lock is not None:
        env.update(lock.env())
    if plan.decided is not None:
        env[ENV_START] = plan.decided.to_env(plan.recipe.output_dir)
    code = run_command(plan.argv, env)
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
    nodes = (
        f" on {hw.num_machines} machines (this is node {hw.machine_rank}; node 0 at "
        f"{hw.main_process_ip}:{hw.main_process_port})"
        if hw.num_machines > 1
        else ""
    )
    lines = [
        f"tunefleet launch: parallel.strategy={plan.recipe.parallel.strategy}, {hw.num_processes} {where} "
        f"process(es){nodes}, output_dir={plan.recipe.output_dir} ({start})"
    ]
    lines += [f"  note: {n}" for n in plan.notes]
    lines += [f"  note: {plan.start_note}"] if plan.start_note else []
    if plan.decided is not None and plan.decided.weights_only:
        lines.append(
            f"  note: {Path(str(plan.checkpoint)).name} has no optimizer state: its weights continue with a "
            "fresh optimizer (--resume-weights-only)"
        )
    lines += [f"  changed since the checkpoint (harmless): {n}" for n in plan.resume_notes]
    lines += [f"  warning: {w}" for w in plan.warnings]
    lines += [f"  {'would write' if dry_run else 'wrote'} {plan.config_dir / name}" for name in plan.files]
    lines += ["", plan.files[COMMAND_FILE].splitlines()[-1]]
    return "\n".join(lines)
