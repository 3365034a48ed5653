"""The command that starts a run's processes, built purely and run by a thin function.

One builder for every place that starts ranks: `launcher_options` gives a launcher's options for
one node (torchrun, accelerate launch, or `tunefleet launch` itself) and `entrypoint_args` what
every rank runs; `tunefleet launch` (`build_launch_command`, also on each of several machines), the
SLURM script (`slurm/sbatch.py`) and `tunefleet plan` (`node_commands`) put them together. Values that a node's shell must expand (`$SLURM_NODEID`)
are `ShellVar`s; everything else is quoted. `run_command` starts a command, forwards
SIGINT/SIGTERM/SIGUSR1 and returns its exit code.

On CPU, only `--multi_gpu --num_processes N` (sic) with ACCELERATE_USE_CPU starts N ranks that
form one gloo world (measured here). `--cpu --num_processes N` starts one process, and so does a
`MULTI_CPU` config without an mpirun hostfile; `--multi_cpu` does not exist.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tunefleet.launch.core import layout
from tunefleet.launch.core.errors import TunefleetError
from tunefleet.launch.core.hardware import Hardware
from tunefleet.launch.core.recipe import Recipe
from tunefleet.launch.templates import ACCELERATE_FILE, expected_distributed_type

ENTRYPOINT = "tunefleet.distributed.sft"
"""The module every process runs (`python -m tunefleet.distributed.sft --recipe FILE`)."""
RELAY_MODULE = "tunefleet.distributed.relay"
"""What starts the launcher (`python -m tunefleet.distributed.relay accelerate launch ...`): it runs
accelerate or torchrun in-process and turns their failures into the run's exit code, naming a rank
killed by a signal (distributed/relay.py)."""

Launcher = Literal["torchrun", "accelerate"]
NodeLauncher = Literal["torchrun", "accelerate", "tunefleet"]
"""What starts one node's processes: torchrun, accelerate launch, or `tunefleet launch` (which runs
accelerate launch with the rendered configs, after the nodes have met)."""

DEFAULT_MAIN_PORT = 29500
"""The rendezvous port the per-node commands of `tunefleet plan` use (any port free on node 0)."""


@dataclass(frozen=True)
class ShellVar:
    """A value the shell of the node expands (`"$SLURM_NODEID"`), written unquoted-by-us."""

    name: str

    def __str__(self) -> str:
        return f'"${self.name}"'


Word = str | ShellVar
"""One word of a command line: a literal (quoted when printed) or a shell variable."""


def launcher_options(
    launcher: NodeLauncher,
    *,
    nodes: int,
    procs_per_node: int,
    node_rank: Word,
    main_address: Word,
    main_port: Word,
    accelerate_config: str | None = None,
    use_cpu: bool = False,
) -> list[list[Word]]:
    """The options of one node's launcher, one option with its value per group. `use_cpu` picks
    `tunefleet launch`'s `--nproc` (CPU processes) over `--gpus`."""
    if launcher == "torchrun":
        return [
            ["--nnodes", str(nodes)],
            ["--nproc_per_node", str(procs_per_node)],
            ["--node_rank", node_rank],
            ["--master_addr", main_address],
            ["--master_port", main_port],
        ]
    if launcher == "tunefleet":
        return [
            ["--nnodes", str(nodes)],
            ["--nproc" if use_cpu else "--gpus", str(procs_per_node)],
            ["--node-rank", node_rank],
            ["--main-address", main_address],
            ["--main-port", main_port],
        ]
    if accelerate_config is None:
        raise TunefleetError("accelerate launch needs a config file", "render the accelerate config first")
    return [
        ["--config_file", accelerate_config],
        ["--num_machines", str(nodes)],
        ["--num_processes", str(nodes * procs_per_node)],
        ["--machine_rank", node_rank],
        ["--main_process_ip", main_address],
        ["--main_process_port", main_port],
    ]


def entrypoint_args(
    recipe_path: str, *, module: str = ENTRYPOINT, script: str | None = None, extra: Sequence[str] = ()
) -> list[list[Word]]:
    """What every rank runs: `-m MODULE --recipe FILE` (or `SCRIPT --recipe FILE`), then `extra`
    (one word per group)."""
    program: list[Word] = ["-m", module] if script is None else [script]
    groups: list[list[Word]] = [program, ["--recipe", recipe_path]]
    return groups + [[arg] for arg in extra]


def shell_words(words: Sequence[Word]) -> str:
    """Words as shell source: literals quoted, shell variables left to expand."""
    return " ".join(str(w) if isinstance(w, ShellVar) else shlex.quote(w) for w in words)


def shell_lines(groups: Sequence[Sequence[Word]], separator: str = " ") -> str:
    """Groups of words as shell source, joined by `separator` (e.g. a backslash-newline)."""
    return separator.join(shell_words(group) for group in groups)


def node_commands(
    recipe_path: str, overrides: Sequence[str], *, nodes: int, procs_per_node: int
) -> list[str]:
    """What a user runs on each node for `tunefleet plan`: `tunefleet train` for one process,
    `tunefleet launch --gpus N` on one machine, `tunefleet launch --nnodes ...` on each of several
    machines (`$MAIN_ADDRESS`: the address of node 0, which every node must reach)."""
    sets = [w for o in overrides for w in ("--set", o)]
    if nodes == 1:
        if procs_per_node == 1:
            return [shell_words(["tunefleet", "train", recipe_path, *sets])]
        return [shell_words(["tunefleet", "launch", recipe_path, "--gpus", str(procs_per_node), *sets])]
    return [
        shell_lines(
            [
                ["tunefleet", "launch", recipe_path],
                *launcher_options(
                    "tunefleet",
                    nodes=nodes,
                    procs_per_node=procs_per_node,
                    node_rank=str(rank),
                    main_address=ShellVar("MAIN_ADDRESS"),
                    main_port=str(DEFAULT_MAIN_PORT),
                ),
                sets,
            ]
        )
        for rank in range(nodes)
    ]


FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def launch_env(recipe: Recipe, hw: Hardware) -> dict[str, str]:
    """Variables every rank inherits: what the launcher expects it to find (the entrypoint
    checks them against accelerate's state and exits on a mismatch) and the CPU switch."""
    env = {
        layout.ENV_STRATEGY: recipe.parallel.strategy,
        layout.ENV_WORLD_SIZE: str(hw.num_processes),
        layout.ENV_NUM_MACHINES: str(hw.num_machines),
        layout.ENV_DISTRIBUTED_TYPE: expected_distributed_type(recipe, hw),
        layout.ENV_USE_CPU: "1" if hw.use_cpu else "0",
    }
    if hw.use_cpu and recipe.parallel.strategy == "ddp":
        # Read by TrainingArguments and AcceleratorState: cpu=True -> MULTI_CPU over gloo (the
        # multi-GPU launcher does not set it). Never with DeepSpeed: AcceleratorState(cpu=True)
        # skips DeepSpeed and trains plain DDP without a word (measured); there the trainer's
        # use_cpu=True alone forms the gloo world.
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def build_launch_command(
    recipe_path: str,
    config_paths: Mapping[str, str],
    hw: Hardware,
    overrides: Sequence[str] = (),
    *,
    recipe: Recipe,
    module: str = ENTRYPOINT,
    script: str | None = None,
    python: str | None = None,
) -> tuple[list[str], dict[str, str]]:
    """(argv, env additions) of `accelerate launch --config_file … -m MODULE --recipe FILE [--set …]`.

    `recipe` is the resolved recipe (compat.resolve) the configs were rendered from;
    `config_paths` maps file names (templates.ACCELERATE_FILE, ...) to their written paths.
    `script` runs a file instead of `module` (tests); `python` defaults to this interpreter, so
    the launched ranks use the same environment. The env holds only the additions: run_command
    lays them over os.environ."""
    try:
        accelerate_config = config_paths[ACCELERATE_FILE]
    except KeyError:
        raise TunefleetError(
            f"no {ACCELERATE_FILE} among the rendered configs {sorted(config_paths)}",
            "render the configs with templates.render_files first",
        ) from None
    # through the relay: accelerate launch in-process, its failures told by rank and signal
    argv = [python or sys.executable, "-m", RELAY_MODULE, "accelerate", "launch"]
    if hw.num_machines > 1:  # accelerate's multi-machine options (static rendezvous on node 0)
        argv += [
            str(w)
            for group in launcher_options(
                "accelerate",
                nodes=hw.num_machines,
                procs_per_node=hw.procs_per_machine,
                node_rank=str(hw.machine_rank),
                main_address=str(hw.main_process_ip),
                main_port=str(hw.main_process_port),
                accelerate_config=accelerate_config,
            )
            for w in group
        ]
    else:
        argv += ["--config_file", accelerate_config]
    if hw.use_cpu and recipe.parallel.strategy == "ddp" and hw.num_processes > 1:
        # The config says MULTI_GPU already; the flags make the one incantation that starts N
        # CPU ranks explicit (on several machines too: measured, 2 x 2 ranks on loopback). Never
        # for DeepSpeed/FSDP: --multi_gpu would override their type.
        argv += ["--multi_gpu"] + (["--num_processes", str(hw.num_processes)] if hw.num_machines == 1 else [])
    sets = [w for o in overrides for w in ("--set", o)]
    argv += [
        str(w)
        for group in entrypoint_args(recipe_path, module=module, script=script, extra=sets)
        for w in group
    ]
    return argv, launch_env(recipe, hw)


def format_command(argv: Sequence[str], env: Mapping[str, str]) -> str:
    """One shell line that reproduces the launch (`env K=V … argv`), for printing and saving."""
    prefix = ["env", *(f"{k}={v}" for k, v in sorted(env.items()))] if env else []
    return shlex.join([*prefix, *argv])


# ----------------------------------------------------------------------------- the thin runner


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _descendants(pid: int) -> list[int]:
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _catches(pid: int, signum: int) -> bool:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


def forward_signal(child_pid: int, signum: int) -> list[int]:
    """Deliver `signum` to a launched run; returns the pids signalled.

    SIGINT/SIGTERM go to the launcher's process group: accelerate's single-process launcher
    and its child, or torchrun's agent, which passes them on to its ranks (they run in
    sessions of their own, out of reach of the group). SIGUSR1 ("checkpoint now") goes to
    every process of the tree that handles it: the training ranks. The launchers do not handle
    it, and its default action would kill them."""
    if signum != signal.SIGUSR1:
        try:
            os.killpg(child_pid, signum)
        except ProcessLookupError:
            return []
        return [child_pid]
    sent = []
    for pid in [child_pid, *_descendants(child_pid)]:
        if _catches(pid, signum):
            try:
                os.kill(pid, signum)
                sent.append(pid)
            except ProcessLookupError:
                pass
    if not sent:
        print(
            f"tunefleet: {signal.Signals(signum).name} not forwarded: no process of the run handles it (yet)",
            file=sys.stderr,
            flush=True,
        )
    return sent


def run_command(argv: Sequence[str], env: Mapping[str, str]) -> int:
    """Run the launch in its own process group, forward SIGINT/SIGTERM/SIGUSR1 to it, and return
    its exit code (128+N when it died of signal N, as a shell reports it). Main thread only."""
    proc = subprocess.Popen(list(argv), env={**os.environ, **env}, start_new_session=True)
    previous = {
        sig: signal.signal(sig, lambda signum, _frame: forward_signal(proc.pid, signum))
        for sig in FORWARDED_SIGNALS
    }
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code if code >= 0 else 128 - code
