"""Render the sbatch script of a tunefleet run: options in, script text out (no torch, no I/O).

Modelled on submitit's `_make_sbatch_string`: one pure function builds the whole script from
typed options; `tunefleet.slurm.submit` writes and submits it. Two quoting regimes meet here:

* `#SBATCH` lines are parsed by sbatch, not by a shell: no variable is expanded there and only
  double quotes and backslashes are special. They carry literal values only, each checked
  against a safe character set; anything else is refused with a `ClusterSpecError`.
* Everything that reaches bash is `shlex.quote`d, except `env_setup` lines, which are shell
  code the user writes on purpose (`module load ...`, `source .../activate`).

The script runs one launcher per node (`srun --ntasks-per-node=1`); the per-node command is
single-quoted and run by `bash -c` inside the job step, so `$SLURM_NODEID` is the rank of the
node that runs it. srun runs in the background so the USR1 trap can run while the step trains.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import posixpath
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

from tunefleet.launch.command import RELAY_MODULE, ShellVar, entrypoint_args, launcher_options, shell_lines
from tunefleet.launch.command import Launcher as ResolvedLauncher
from tunefleet.launch.core.errors import TunefleetError
from tunefleet.launch.core.layout import EXIT_REFUSED, EXIT_REQUEUE

PREEMPT_SIGNAL = "USR1"
"""Signal SLURM sends to the batch shell before the time limit; the script forwards it."""

DEFAULT_CHECKPOINT_S = 60
"""Seconds reserved for the checkpoint when no earlier attempt has measured it (`tunefleet slurm`
uses the largest `save_s` of the output directory's checkpoints plus one step once there are some)."""

MIN_SIGNAL_MARGIN_S = 60
"""SLURM checks time limits every 30 s, so the signal can arrive ~30 s late: keep >= 60 s spare."""

PORT_BASE = 12000
PORT_SPAN = 20000
"""Rendezvous port = PORT_BASE + job id % PORT_SPAN: below the Linux ephemeral range (32768+)."""

DEFAULT_MODULE = "tunefleet.distributed.sft"
"""The Python module each process runs (`-m`)."""

GPU_JOB_CPUS_PER_GPU = 8
"""CPUs per GPU a GPU job requests when `cpus_per_task` is not set: the training process, its data
loading and the NCCL / pin-memory threads. Without a request many clusters give the whole task one
core, shared by every rank of the node. Nodes with fewer cores per GPU: set cpus_per_task (sbatch
refuses a request no node can meet at submission)."""

GPU_JOB_MEM_PER_GPU_GB = 32
"""Host memory per GPU (GB) a GPU job requests when `mem` is not set. Loading is the peak: without
a request many clusters grant a small default per core, and ranks that each read the checkpoint
into host RAM are killed while loading. `tunefleet plan` shows the host RAM per node at load."""

SECRET_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
"""Read from the environment at run time; never written into a generated script."""

RestartMode = Literal["requeue", "dependency", "none"]
Launcher = Literal["auto", "torchrun", "accelerate"]


class ClusterSpecError(TunefleetError):
    """The cluster spec, or a value passed to the sbatch renderer, cannot be used."""


@dataclass(kw_only=True, frozen=True, slots=True)
class ClusterSpec:
    nodes: int = 1
    """Number of nodes; one launcher task runs on each."""

    gpus_per_node: int = 0
    """GPUs requested per node (`--gpus-per-node`); 0 for CPU nodes (gloo, torchrun)."""

    gpu_type: str | None = None
    """GPU type for `--gpus-per-node=TYPE:N` (e.g. `a100`); None asks for any GPU."""

    procs_per_node: int | None = None
    """Training processes per node; None means one per GPU, or 1 on CPU nodes."""

    cpus_per_task: int | None = None
    """CPUs for the one task per node (shared by its processes); None requests
    GPU_JOB_CPUS_PER_GPU per GPU on GPU nodes, one per process on CPU nodes."""

    mem: str | None = None
    """Memory per node, SLURM syntax (`64G`, `500000M`; `0` = all of it); None requests
    GPU_JOB_MEM_PER_GPU_GB per GPU on GPU nodes and keeps the cluster's default on CPU nodes."""

    time: str = "24:00:00"
    """Time limit, SLURM syntax: `MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS`."""

    partition: str | None = None
    """Partition (comma-separated list allowed); None uses the cluster's default."""

    account: str | None = None
    """Account charged for the job."""

    qos: str | None = None
    """Quality of service."""

    constraint: str | None = None
    """Node feature constraint (`--constraint`, e.g. `a100&ib`)."""

    exclusive: bool = False
    """Request whole nodes (`--exclusive`)."""

    job_name: str = "tunefleet"
    """Job name shown by squeue."""

    output: str | None = None
    """Log file (`--output`, `%j` = job id); None writes `<output_dir>/slurm-%j.out`. Opened in
    append mode so a requeued run adds to the log of the first."""

    error: str | None = None
    """Separate stderr file (`--error`); None sends stderr to the output file."""

    chdir: str | None = None
    """Working directory of the job (`--chdir`); None keeps the directory sbatch ran in."""

    env_setup: Sequence[str] = ()
    """Shell lines run before the launch, verbatim (`module load cuda/12.4`,
    `source /opt/venv/bin/activate`). One line per item; never put secrets here."""

    env: Mapping[str, str] = field(default_factory=dict)
    """Variables exported before the launch (values are quoted). Secrets are refused: the job
    inherits HF_TOKEN, WANDB_API_KEY, ... from the submitting environment at run time."""

    extra_sbatch: Sequence[str] = ()
    """Escape hatch: extra `#SBATCH` options, verbatim (`--reservation=big`). Options that a
    field above sets are refused (set the field)."""

    restart: RestartMode = "requeue"
    """After the trainer checkpoints on the preemption signal (exit EXIT_REQUEUE):
    `requeue` the same job (`--requeue`, `scontrol requeue`); `dependency` submits a successor
    (`--dependency=afterany`) for clusters that forbid requeue; `none` just stops."""

    max_restarts: int = 3
    """Stop requeuing once SLURM_RESTART_COUNT (or the chain index) reaches this."""

    checkpoint_s: int = DEFAULT_CHECKPOINT_S
    """Seconds the trainer needs from the signal to a complete checkpoint (finish the step, save)."""

    signal_margin_s: int = MIN_SIGNAL_MARGIN_S
    """Extra seconds of warning on top of `checkpoint_s` (>= 60: the signal can come ~30 s late)."""

    @property
    def signal_lead_s(self) -> int:
        """Seconds before the time limit at which SLURM signals the batch shell."""
        return self.checkpoint_s + self.signal_margin_s


@dataclass(kw_only=True, frozen=True, slots=True)
class Launch:
    launcher: Launcher = "auto"
    """`torchrun` or `accelerate` (launch); `auto` takes torchrun on CPU nodes, accelerate on GPUs."""

    accelerate_config: str | None = None
    """Path of the accelerate config file (needed by `accelerate`); rendered elsewhere."""

    module: str = DEFAULT_MODULE
    """Python module each process runs (`-m`)."""

    module_args: Sequence[str] = ()
    """Extra arguments after `--recipe FILE` (quoted)."""

    python: str = "python"
    """Python interpreter on the nodes after `env_setup` (it runs the launcher in-process). One
    executable: a path, or a name looked up on the node's PATH. `tunefleet slurm` passes the
    interpreter it runs in unless told otherwise."""

    expect_versions: Mapping[str, str] = field(default_factory=dict)
    """Distribution name -> version the job's Python must have (`tunefleet`, `torch`: those of the
    login node). The script checks them, and that tunefleet and torch import, before anything
    starts; an empty mapping checks the imports only."""

    prepare: bool = False
    """Run `tunefleet prepare RECIPE` in the batch shell before the launch: the data is tokenised
    once (cached in the output directory) instead of by the ranks while the others wait."""


def cluster_spec_from_dict(raw: Mapping[str, Any]) -> ClusterSpec:
    """Build a ClusterSpec from YAML data; an unknown key is refused with the closest valid one."""
    if not isinstance(raw, Mapping):
        raise ClusterSpecError(
            f"a cluster spec is a mapping of keys, got {type(raw).__name__}", "write it as `key: value` lines"
        )
    valid = [f.name for f in dataclasses.fields(ClusterSpec)]
    for key in raw:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ClusterSpecError(f"unknown cluster key {key!r}{hint}", f"valid keys: {', '.join(valid)}")
    data = dict(raw)
    for key in ("env_setup", "extra_sbatch"):
        if isinstance(data.get(key), list):
            data[key] = tuple(data[key])
    spec = ClusterSpec(**data)
    check_spec(spec)
    return spec


# ----------------------------------------------------------------------------- validation

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
_PARTITION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*(,[A-Za-z0-9_][A-Za-z0-9_.+-]*)*")
_CONSTRAINT = re.compile(r"[A-Za-z0-9_.,&|\[\]*:()!+-]+")
# `#SBATCH` paths: no whitespace, quotes, backslash, `#` (starts a comment), `$` (never expanded).
_SBATCH_PATH = re.compile(r"[A-Za-z0-9_./%@+,:=~-]+")
_MEM = re.compile(r"[0-9]+[KMGT]?")
_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VERSION = re.compile(r"[A-Za-z0-9_.+!-]+")
_SECRET_WORDS = r"(?:TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|SECRET_KEY)"
_SECRET_NAME = re.compile(rf"[A-Za-z0-9_]*{_SECRET_WORDS}", re.IGNORECASE)
# `NAME=literal` for a secret-looking NAME; `NAME="$(cat file)"` or `NAME=$OTHER` reads at run time.
_SECRET_ASSIGNMENT = re.compile(rf"\b[A-Za-z0-9_]*{_SECRET_WORDS}=(?![\"']?\$)", re.IGNORECASE)
_SECRET_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")  # a Hugging Face token

# the options a field sets, refused in extra_sbatch (set the field instead)
_FIELD_OPTIONS = {
    "nodes": ("--nodes", "-N", "--ntasks-per-node", "--ntasks", "-n"),
    "gpus_per_node": ("--gpus-per-node", "--gpus", "-G", "--gres"),
    "cpus_per_task": ("--cpus-per-task", "-c"),
    "mem": ("--mem",),
    "time": ("--time", "-t"),
    "partition": ("--partition", "-p"),
    "account": ("--account", "-A"),
    "qos": ("--qos", "-q"),
    "constraint": ("--constraint", "-C"),
    "exclusive": ("--exclusive",),
    "job_name": ("--job-name", "-J"),
    "output": ("--output", "-o", "--open-mode"),
    "error": ("--error", "-e"),
    "chdir": ("--chdir", "-D"),
    "checkpoint_s": ("--signal",),
    "restart": ("--requeue", "--no-requeue", "--dependency", "-d"),
}
_MANAGED_OPTIONS = {flag: name for name, flags in _FIELD_OPTIONS.items() for flag in flags}

_FIELD_FLAGS = {
    "nodes": "--nodes",
    "gpus_per_node": "--gpus-per-node (and --gpu-type)",
    "cpus_per_task": "--cpus-per-task",
    "mem": "--mem",
    "time": "--time",
    "partition": "--partition",
    "account": "--account",
    "qos": "--qos",
    "constraint": "--constraint",
    "exclusive": "--exclusive",
    "job_name": "--job-name",
    "checkpoint_s": "--checkpoint-s",
    "restart": "--restart",
}
"""The `tunefleet slurm` option that sets each field (the log and the working directory have none)."""


def _managed_fix(field_name: str) -> str:
    flag = _FIELD_FLAGS.get(field_name)
    if flag:
        return f"use tunefleet slurm's {flag} option (or the cluster spec's {field_name!r} key)"
    return (
        f"leave it to tunefleet: the job log is <output_dir>/slurm-%j.out (append mode across restarts); "
        f"in a cluster spec file set {field_name!r}"
    )


def _fail(where: str, problem: str, fix: str) -> NoReturn:
    raise ClusterSpecError(f"{where}: {problem}", fix)


def _check_int(value: Any, where: str, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        _fail(where, f"expected an integer, got {value!r}", f"set {where} to an integer >= {minimum}")
    if value < minimum:
        _fail(where, f"must be >= {minimum}, got {value}", f"set {where} to at least {minimum}")


def _check_text(value: Any, where: str) -> str:
    """Any string without control characters (newlines would end a line of the script)."""
    if not isinstance(value, str):
        _fail(where, f"expected a string, got {type(value).__name__} {value!r}", f"write {where} as text")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        _fail(
            where,
            f"contains a newline or control character: {value!r}",
            "remove the control characters (paths and names must be one line)",
        )
    if not value:
        _fail(where, "is empty", f"set {where} or leave it out")
    return value


def _check_pattern(value: Any, where: str, pattern: re.Pattern[str], allowed: str) -> None:
    _check_text(value, where)
    if not pattern.fullmatch(value):
        _fail(where, f"{value!r} cannot be written on an #SBATCH line safely", f"use only {allowed}")


def _check_secret_free(text: str, where: str) -> None:
    if _SECRET_ASSIGNMENT.search(text) or _SECRET_VALUE.search(text):
        _fail(
            where,
            "looks like it writes a secret into the script",
            "export HF_TOKEN / WANDB_API_KEY in the shell you submit from (or read them from a "
            'file at run time, e.g. HF_TOKEN="$(cat ~/.hf_token)"): the job inherits them',
        )


def _time_limit_s(value: str) -> int | None:
    """Seconds of a SLURM time limit, None when unlimited."""
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    match = _TIME.fullmatch(value)
    if not match:
        _fail(
            "time",
            f"{value!r} is not a SLURM time limit",
            "write MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (e.g. 04:00:00)",
        )
    days_text, a, b, c = match.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days_text is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        parts += [0] * (3 - len(parts))
        hours, minutes, seconds = parts
        total = int(days_text) * 86400 + hours * 3600 + minutes * 60 + seconds
    elif len(parts) == 1:  # MM
        total = parts[0] * 60
    elif len(parts) == 2:  # MM:SS
        total = parts[0] * 60 + parts[1]
    else:  # HH:MM:SS
        total = parts[0] * 3600 + parts[1] * 60 + parts[2]
    if total <= 0:
        _fail("time", f"{value!r} is zero", "give the job some time, e.g. 04:00:00")
    return total


def check_spec(spec: ClusterSpec) -> None:
    """Every field of the spec, before any of it is written into a script (or a batch is planned)."""
    _check_resources(spec)
    _check_names_and_paths(spec)
    _check_restart(spec)
    _check_environment(spec)
    _check_extra_sbatch(spec)


def _check_resources(spec: ClusterSpec) -> None:
    _check_int(spec.nodes, "nodes", 1)
    _check_int(spec.gpus_per_node, "gpus_per_node", 0)
    if spec.procs_per_node is not None:
        _check_int(spec.procs_per_node, "procs_per_node", 1)
    if spec.cpus_per_task is not None:
        _check_int(spec.cpus_per_task, "cpus_per_task", 1)
    _check_int(spec.max_restarts, "max_restarts", 0)
    _check_int(spec.checkpoint_s, "checkpoint_s", 0)
    _check_int(spec.signal_margin_s, "signal_margin_s", MIN_SIGNAL_MARGIN_S)
    if spec.gpu_type is not None:
        _check_pattern(spec.gpu_type, "gpu_type", _NAME, "letters, digits and . _ + -")
        if spec.gpus_per_node == 0:
            _fail("gpu_type", "is set but gpus_per_node is 0", "set gpus_per_node or drop gpu_type")
    if spec.mem is not None:
        _check_pattern(spec.mem, "mem", _MEM, "a number with an optional K/M/G/T suffix (e.g. 64G)")
    _check_text(spec.time, "time")
    limit_s = _time_limit_s(spec.time)
    if limit_s is not None and spec.signal_lead_s >= limit_s:
        _fail(
            "time",
            f"the limit {spec.time!r} ({limit_s} s) leaves no training time before the "
            f"preemption signal ({spec.signal_lead_s} s = checkpoint_s + signal_margin_s)",
            "raise time or lower checkpoint_s",
        )


def _check_names_and_paths(spec: ClusterSpec) -> None:
    for name in ("job_name", "account", "qos"):
        value = getattr(spec, name)
        if value is not None:
            _check_pattern(value, name, _NAME, "letters, digits and . _ + - (no spaces or quotes)")
    if spec.partition is not None:
        _check_pattern(spec.partition, "partition", _PARTITION, "letters, digits, . _ + - and commas")
    if spec.constraint is not None:
        _check_pattern(
            spec.constraint,
            "constraint",
            _CONSTRAINT,
            "letters, digits and the operators & | [ ] * : ( ) ! , (no spaces)",
        )
    for name in ("output", "error", "chdir"):
        value = getattr(spec, name)
        if value is not None:
            _check_pattern(
                value,
                name,
                _SBATCH_PATH,
                "letters, digits, / . _ - + % @ , : = ~ (no spaces, quotes, $ or #)",
            )
    if not isinstance(spec.exclusive, bool):
        _fail("exclusive", f"expected true or false, got {spec.exclusive!r}", "set exclusive: true/false")


def _check_restart(spec: ClusterSpec) -> None:
    if spec.restart not in ("requeue", "dependency", "none"):
        _fail(
            "restart",
            f"{spec.restart!r} is not one of 'requeue', 'dependency', 'none'",
            "use requeue, or dependency where the cluster forbids requeue",
        )


def _check_environment(spec: ClusterSpec) -> None:
    """Shell lines and exported variables: one line each, no secrets written into the script."""
    if isinstance(spec.env_setup, str) or not isinstance(spec.env_setup, Sequence):
        _fail("env_setup", "expected a list of shell lines", "write env_setup as a list of lines")
    for i, line in enumerate(spec.env_setup):
        _check_text(line, f"env_setup[{i}]")
        _check_secret_free(line, f"env_setup[{i}]")
    if not isinstance(spec.env, Mapping):
        _fail("env", "expected a mapping of NAME: value", "write env as NAME: value lines")
    for name, value in spec.env.items():
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            _fail("env", f"{name!r} is not a variable name", "use letters, digits and _ (not first)")
        if name in SECRET_NAMES or _SECRET_NAME.fullmatch(name):
            _fail(
                f"env.{name}",
                "is a secret and would be written into the script",
                f"export {name} in the shell you submit from: the job inherits it at run time",
            )
        if not isinstance(value, str):
            _fail(
                f"env.{name}",
                f"expected a string, got {type(value).__name__} {value!r}",
                "quote the value in YAML",
            )
        if "\x00" in value or "\n" in value or "\r" in value:
            _fail(f"env.{name}", "contains a newline or NUL", "put the value on one line")


def _check_extra_sbatch(spec: ClusterSpec) -> None:
    if isinstance(spec.extra_sbatch, str) or not isinstance(spec.extra_sbatch, Sequence):
        _fail("extra_sbatch", "expected a list of options", "write e.g. [--reservation=big]")
    for i, option in enumerate(spec.extra_sbatch):
        where = f"extra_sbatch[{i}]"
        _check_text(option, where)
        if not option.startswith("-") or any(c in option for c in "$`#"):
            _fail(
                where,
                f"{option!r} is not a plain sbatch option",
                "write one option like --reservation=big; #SBATCH lines expand no $VARIABLES",
            )
        _check_secret_free(option, where)
        flag = option.split("=", 1)[0].split(" ", 1)[0]
        if flag in _MANAGED_OPTIONS:
            _fail(
                where,
                f"{flag} is set by tunefleet from the cluster spec",
                _managed_fix(_MANAGED_OPTIONS[flag]),
            )


def _resolve_launcher(spec: ClusterSpec, launch: Launch) -> Literal["torchrun", "accelerate"]:
    if launch.launcher not in ("auto", "torchrun", "accelerate"):
        _fail(
            "launch.launcher",
            f"{launch.launcher!r} is not one of 'auto', 'torchrun', 'accelerate'",
            "use torchrun on CPU nodes, accelerate on GPU nodes",
        )
    launcher = launch.launcher
    if launcher == "auto":  # a rendered FSDP/DeepSpeed config needs accelerate on CPU nodes too
        launcher = "accelerate" if spec.gpus_per_node > 0 or launch.accelerate_config else "torchrun"
    if launcher == "accelerate":
        if spec.gpus_per_node == 0 and launch.accelerate_config is None:
            _fail(
                "launch.launcher",
                "accelerate on CPU nodes without an FSDP/DeepSpeed config starts one process per node "
                "(measured), not procs_per_node",
                "use torchrun on CPU nodes (launcher: auto), or pass the rendered accelerate config",
            )
        if launch.accelerate_config is None:
            _fail(
                "launch.accelerate_config",
                "accelerate launch needs a config file",
                "pass the path of the accelerate config rendered for this run",
            )
        _check_text(launch.accelerate_config, "launch.accelerate_config")
    if not _MODULE.fullmatch(_check_text(launch.module, "launch.module")):
        _fail("launch.module", f"{launch.module!r} is not a Python module name", "write e.g. my_pkg.train")
    _check_text(launch.python, "launch.python")
    if not isinstance(launch.expect_versions, Mapping):
        _fail(
            "launch.expect_versions", "expected a mapping of name: version", "pass e.g. {'torch': '2.13.0'}"
        )
    for name, version in launch.expect_versions.items():
        if (
            name not in PYTHON_CHECK_IMPORTS
            or not isinstance(version, str)
            or not _VERSION.fullmatch(version)
        ):
            _fail(
                f"launch.expect_versions.{name}",
                f"{version!r} is not a version of one of {sorted(PYTHON_CHECK_IMPORTS)}",
                "pass versions as importlib.metadata.version() gives them",
            )
    if isinstance(launch.module_args, str) or not isinstance(launch.module_args, Sequence):
        _fail("launch.module_args", "expected a list of arguments", "write module_args as a list")
    for i, arg in enumerate(launch.module_args):
        if not isinstance(arg, str) or "\x00" in arg or "\n" in arg:
            _fail(f"launch.module_args[{i}]", f"{arg!r} is not a one-line string", "pass text arguments")
    return launcher


# ----------------------------------------------------------------------------- rendering

PYTHON_CHECK_IMPORTS = {"tunefleet": "tunefleet.launch.cli", "torch": "torch"}
"""Distribution -> the module the job imports from it (`tunefleet prepare` runs tunefleet.launch.cli)."""

# The job's Python must run tunefleet: checked before anything starts in the job (mode `import`)
# and, by `tunefleet slurm`, on the login node (mode `find`: locate only, no torch import there).
# Plain Python 3 on purpose: it may be run by an interpreter that has nothing installed.
PYTHON_CHECK = f"""import importlib, importlib.util, sys
IMPORTS = {json.dumps(PYTHON_CHECK_IMPORTS)}
mode, found, problems = sys.argv[1], [], []
for arg in sys.argv[2:]:
    name, _, wanted = arg.partition("=")
    try:
        if mode == "import":
            importlib.import_module(IMPORTS[name])
        elif importlib.util.find_spec(IMPORTS[name]) is None:
            raise ModuleNotFoundError("No module named %r" % IMPORTS[name])
        from importlib.metadata import version
        have = version(name)
    except Exception as exc:
        problems.append("cannot import %s: %s: %s" % (name, type(exc).__name__, exc))
        continue
    found.append("%s %s" % (name, have))
    if wanted and have != wanted:
        problems.append("%s is %s here, but %s where this job was written" % (name, have, wanted))
out = sys.stderr if problems else sys.stdout
print("tunefleet: python %s: %s" % (sys.executable, ", ".join(found) or "neither tunefleet nor torch"), file=out)
for problem in problems:
    print("tunefleet: " + problem, file=sys.stderr)
sys.exit(3 if problems else 0)
"""

PYTHON_FIX = (
    "run `tunefleet slurm` with the Python the nodes should use (the job runs that interpreter), "
    "or pass --python PATH (run after the --env-setup lines)"
)
"""What to do when the job's Python cannot run tunefleet (printed by the script and the login check)."""


def _sbatch_options(spec: ClusterSpec, output_dir: str) -> list[str]:
    options: dict[str, str | None] = {
        "--job-name": spec.job_name,
        "--nodes": str(spec.nodes),
        "--ntasks-per-node": "1",
        "--time": spec.time,
        "--output": spec.output or posixpath.join(output_dir, "slurm-%j.out"),
        "--open-mode": "append",
        "--signal": f"B:{PREEMPT_SIGNAL}@{spec.signal_lead_s}",
        "--requeue" if spec.restart == "requeue" else "--no-requeue": None,
    }
    if spec.gpus_per_node:
        options["--gpus-per-node"] = _gpus(spec)
    cpus = _cpus_per_task(spec)
    if cpus is not None:
        options["--cpus-per-task"] = str(cpus)
    for flag, value in (
        ("--mem", _mem(spec)),
        ("--partition", spec.partition),
        ("--account", spec.account),
        ("--qos", spec.qos),
        ("--constraint", spec.constraint),
        ("--error", spec.error),
        ("--chdir", spec.chdir),
    ):
        if value is not None:
            options[flag] = value
    if spec.exclusive:
        options["--exclusive"] = None
    _check_pattern(
        options["--output"],
        "output (from output_dir)",
        _SBATCH_PATH,
        "letters, digits, / . _ - + % @ , : = ~ in output_dir, or set output explicitly",
    )
    return [
        f"#SBATCH {flag}" if value is None else f"#SBATCH {flag}={value}"
        for flag, value in sorted(options.items())
    ]


def _cpus_per_task(spec: ClusterSpec) -> int | None:
    """CPUs of the one task per node: as set, else GPU_JOB_CPUS_PER_GPU per GPU (or per process,
    if more), else one per gloo process on CPU nodes (None for one process: SLURM's default)."""
    if spec.cpus_per_task is not None:
        return spec.cpus_per_task
    procs = _procs_per_node(spec)
    if spec.gpus_per_node:
        return GPU_JOB_CPUS_PER_GPU * max(spec.gpus_per_node, procs)
    return procs if procs > 1 else None


def _mem(spec: ClusterSpec) -> str | None:
    """Memory per node: as set, else GPU_JOB_MEM_PER_GPU_GB per GPU on GPU nodes."""
    if spec.mem is not None:
        return spec.mem
    if spec.gpus_per_node:
        return f"{GPU_JOB_MEM_PER_GPU_GB * spec.gpus_per_node}G"
    return None


def _procs_per_node(spec: ClusterSpec) -> int:
    if spec.procs_per_node is not None:
        return spec.procs_per_node
    return spec.gpus_per_node or 1


def _gpus(spec: ClusterSpec) -> str:
    return f"{spec.gpu_type}:{spec.gpus_per_node}" if spec.gpu_type else str(spec.gpus_per_node)


def _node_command(spec: ClusterSpec, launch: Launch, launcher: ResolvedLauncher, recipe_path: str) -> str:
    """The command one node runs, as bash source: `$SLURM_NODEID` is left for the node to expand."""
    groups = [
        ["torchrun" if launcher == "torchrun" else "accelerate launch"],
        *launcher_options(
            launcher,
            nodes=spec.nodes,
            procs_per_node=_procs_per_node(spec),
            node_rank=ShellVar("SLURM_NODEID"),
            main_address=ShellVar("TUNEFLEET_HEAD_NODE"),
            main_port=ShellVar("TUNEFLEET_PORT"),
            accelerate_config=launch.accelerate_config,
        ),
        *entrypoint_args(recipe_path, module=launch.module, extra=launch.module_args),
    ]
    # the launcher's name stays unquoted: `accelerate launch` is two words
    body = groups[0][0] + " \\\n  " + shell_lines(groups[1:], " \\\n  ")
    # USR1 would kill the launcher (its default action); the ignore is inherited by the worker
    # processes, and the trainer installs its own USR1 handler to checkpoint.
    q = shlex.quote
    # through the relay (distributed/relay.py): the requeue code comes through, a killed rank is named
    return f'\ntrap "" {PREEMPT_SIGNAL}\nexec {q(launch.python)} -m {RELAY_MODULE} {body}\n'


def _prepare_lines(launch: Launch, recipe_path: str) -> list[str]:
    if not launch.prepare:
        return []
    q = shlex.quote
    return [
        "# Tokenise the data once, here, before the processes start; the ranks load it from the cache",
        "# in the output directory (a cache hit on every restart).",
        f"{q(launch.python)} -m tunefleet.launch.cli prepare {q(recipe_path)} || {{",
        '  prepare_rc=$?; echo "tunefleet: tunefleet prepare failed (exit $prepare_rc)" >&2; exit "$prepare_rc"',
        "}",
        "",
    ]


def render_sbatch(
    spec: ClusterSpec, *, recipe_path: str, output_dir: str, launch: Launch | None = None
) -> str:
    """The sbatch script that trains `recipe_path` on the cluster described by `spec`.

    `output_dir` holds the SLURM log unless `spec.output` is set; pass absolute paths (the job
    runs in the submit directory, or `spec.chdir`). `launch` picks the launcher and module.
    The script is made of the sections below, in this order.
    """
    launch = launch or Launch()
    check_spec(spec)
    recipe_path = _check_text(recipe_path, "recipe_path")
    output_dir = _check_text(output_dir, "output_dir")
    launcher = _resolve_launcher(spec, launch)
    lines = [
        *_header_lines(spec, launcher, output_dir),
        *_environment_lines(spec),
        *_python_check_lines(launch),
        *_rendezvous_lines(spec),
        *_signal_lines(spec),
        *_prepare_lines(launch, recipe_path),
        *_step_lines(spec, launch, launcher, recipe_path),
        *_restart_lines(spec),
    ]
    return "\n".join(lines) + "\n"


def _header_lines(spec: ClusterSpec, launcher: ResolvedLauncher, output_dir: str) -> list[str]:
    procs = _procs_per_node(spec)
    device = f"{spec.gpus_per_node} GPU(s)" if spec.gpus_per_node else "CPU"
    return [
        "#!/bin/bash",
        "# Generated by tunefleet.slurm.sbatch.render_sbatch: regenerate it rather than edit it.",
        f"# {spec.nodes} node(s) x {procs} process(es) on {device} = {spec.nodes * procs} processes, "
        f"launched by {launcher}.",
        "# Secrets (HF_TOKEN, WANDB_API_KEY, ...) are not written here: the job inherits them from",
        "# the environment sbatch was run in.",
        *_sbatch_options(spec, output_dir),
        *[f"#SBATCH {option}" for option in spec.extra_sbatch],
        "",
    ]


def _environment_lines(spec: ClusterSpec) -> list[str]:
    if not (spec.env_setup or spec.env):
        return []
    return [
        "# Environment",
        *spec.env_setup,
        *[f"export {name}={shlex.quote(value)}" for name, value in spec.env.items()],
        "",
    ]


def _python_check_lines(launch: Launch) -> list[str]:
    """Fail in seconds, before `tunefleet prepare` and srun, when the job's Python cannot run
    tunefleet: not found, tunefleet or torch missing, or other versions than the login node's."""
    q = shlex.quote
    wanted = [
        f"{name}={launch.expect_versions[name]}" if name in launch.expect_versions else name
        for name in PYTHON_CHECK_IMPORTS
    ]
    return [
        "# The job's Python must import tunefleet and torch, at the versions of the login node.",
        f"TUNEFLEET_PYTHON_CHECK={q(PYTHON_CHECK)}",
        f'{q(launch.python)} -c "$TUNEFLEET_PYTHON_CHECK" import {" ".join(q(w) for w in wanted)} || {{',
        "  check_rc=$?",
        '  echo "tunefleet: the job\'s Python cannot run tunefleet (exit $check_rc): nothing was started" >&2',
        f"  echo {q(f'tunefleet: fix: {PYTHON_FIX}')} >&2",
        f"  exit {EXIT_REFUSED}",
        "}",
        "",
    ]


def _rendezvous_lines(spec: ClusterSpec) -> list[str]:
    restart_var = "TUNEFLEET_RESTART_COUNT" if spec.restart == "dependency" else "SLURM_RESTART_COUNT"
    return [
        f"requeue_exit_code={EXIT_REQUEUE}  # the trainer checkpointed and asks to run again",
        f"max_restarts={spec.max_restarts}",
        f'restart_count="${{{restart_var}:-0}}"',
        'echo "tunefleet: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, restart $restart_count'
        ' (max_restarts $max_restarts)"',
        "",
        "# Rendezvous: the first host of the allocation, a port derived from the job id.",
        'TUNEFLEET_HEAD_NODE="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        f'TUNEFLEET_PORT="$(( {PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN} ))"',
        "export TUNEFLEET_HEAD_NODE TUNEFLEET_PORT",
        "",
    ]


def _signal_lines(spec: ClusterSpec) -> list[str]:
    """Traps: USR1 (the time limit is near) is forwarded to the step; TERM waits for the checkpoint."""
    return [
        f"# SLURM sends {PREEMPT_SIGNAL} to this shell {spec.signal_lead_s} s before the time limit "
        f"(checkpoint {spec.checkpoint_s} s",
        f"# + margin {spec.signal_margin_s} s); srun forwards it to every process of the step.",
        "preempted=0",
        "forward_signal() {",
        "  preempted=1",
        f'  echo "tunefleet: {PREEMPT_SIGNAL} received: asking the trainer to checkpoint"',
        f'  if [ -n "${{step_pid:-}}" ]; then kill -{PREEMPT_SIGNAL} "$step_pid"; fi',
        "}",
        f"trap forward_signal {PREEMPT_SIGNAL}",
        "# Preemption, scancel and the time limit send TERM to the steps (the trainer checkpoints) and",
        "# to this shell: stay until the step has ended (a preemption is recognised below).",
        "terminated=0",
        "on_term() {",
        "  terminated=1",
        '  echo "tunefleet: TERM received: waiting for the trainer to checkpoint"',
        "}",
        "trap on_term TERM",
        "",
    ]


def _step_lines(spec: ClusterSpec, launch: Launch, launcher: ResolvedLauncher, recipe_path: str) -> list[str]:
    """The job step (one launcher per node, in the background) and how its end is read."""
    srun = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if spec.gpus_per_node:
        srun.append(f"--gpus-per-node={_gpus(spec)}")
    cpus = _cpus_per_task(spec)
    if cpus is not None:
        # since Slurm 22.05 srun no longer inherits the job's --cpus-per-task: without it the step
        # gets one CPU per task and every rank of the node shares it
        srun.append(f"--cpus-per-task={cpus}")
    return [
        "# One task per node. The command is single-quoted: $SLURM_NODEID expands on each node",
        "# inside the step (in this shell it is always 0, which would make every node rank 0).",
        f"{' '.join(srun)} bash -c {shlex.quote(_node_command(spec, launch, launcher, recipe_path))} &",
        "step_pid=$!",
        "# A trap runs only when `wait` returns; wait again until srun itself has ended.",
        'while kill -0 "$step_pid" 2>/dev/null; do wait "$step_pid"; done',
        'wait "$step_pid"',
        "step_rc=$?",
        'echo "tunefleet: job step ended with exit code $step_rc"',
        "# Partition preemption sends TERM to the step (the trainer checkpoints) and requeues the job",
        "# only if it still runs when GraceTime ends; a preempted job that ended first runs again here.",
        'if [ "$step_rc" -ne 0 ] && [ "$preempted" -eq 0 ]; then',
        '  job_line="$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null)"',
        '  preempt_time="$(printf "%s" "$job_line" | grep -o "PreemptTime=[^ ]*" | cut -d= -f2)"',
        '  start_time="$(printf "%s" "$job_line" | grep -o " StartTime=[^ ]*" | cut -d= -f2)"',
        '  if [[ "$preempt_time" == [0-9]* && ! "$preempt_time" < "$start_time" ]]; then',
        "    preempted=1",
        '    echo "tunefleet: the job was preempted at $preempt_time"',
        "  fi",
        "fi",
        "",
    ]


def _restart_lines(spec: ClusterSpec) -> list[str]:
    """Exit, requeue the job, or submit its successor, by the step's exit code and the signals seen."""
    lines = [
        "# Run again when the trainer asked to (requeue exit code) or when the step ended after the",
        "# preemption signal: with several nodes, --kill-on-bad-exit can end the step with another",
        "# node's kill status first. The trainer resumes from its last complete checkpoint.",
        'if [ "$step_rc" -eq 0 ]; then exit 0; fi',
        'if [ "$terminated" -eq 1 ] && [ "$preempted" -eq 0 ]; then',
        '  echo "tunefleet: stopped by TERM (scancel or the time limit): not restarting from here"',
        '  exit "$step_rc"',
        "fi",
        'if [ "$step_rc" -ne "$requeue_exit_code" ] && [ "$preempted" -eq 0 ]; then exit "$step_rc"; fi',
    ]
    if spec.restart == "none":
        return lines + [
            'echo "tunefleet: checkpointed; restart is off (restart: none): resubmit to go on"',
            'exit "$requeue_exit_code"',
        ]
    lines += [
        'if [ "$restart_count" -ge "$max_restarts" ]; then',
        '  echo "tunefleet: not running again: restart $restart_count reached max_restarts'
        ' $max_restarts" >&2',
        '  exit "$requeue_exit_code"',
        "fi",
    ]
    if spec.restart == "requeue":
        lines += [
            'echo "tunefleet: requeuing job $SLURM_JOB_ID (restart $((restart_count + 1)))"',
            'scontrol requeue "$SLURM_JOB_ID" || echo "tunefleet: scontrol requeue failed" >&2',
        ]
    else:
        lines += [
            "# $0 is SLURM's copy of this script; the successor starts once this job has ended.",
            'next_job="$(sbatch --parsable --dependency="afterany:$SLURM_JOB_ID" \\',
            '  --export="ALL,TUNEFLEET_RESTART_COUNT=$((restart_count + 1))" "$0")" \\',
            '  && echo "tunefleet: submitted job $next_job to continue (restart $((restart_count + 1)))" \\',
            '  || echo "tunefleet: submitting the next job failed" >&2',
        ]
    return lines + ['exit "$requeue_exit_code"']
