"""The `tunefleet prepare`, `tunefleet slurm` and `tunefleet status` subcommands.

Registered by `tunefleet.launch.cli`; torch-free at import (heavy imports live in the handlers).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from tunefleet.launch.core.args import add_overrides
from tunefleet.launch.core.errors import TunefleetError


def _prepare(args: argparse.Namespace) -> int:
    from tunefleet.distributed.prepare import prepare
    from tunefleet.launch import prep_report
    from tunefleet.launch.core import recipe as recipe_mod
    from tunefleet.launch.core.lock import holding

    recipe = recipe_mod.load(args.recipe, args.overrides)
    with holding(recipe.output_dir, "tunefleet prepare " + " ".join(sys.argv[2:])[:200]):
        result = prepare(recipe)
    evaluation = f" + {result.eval_examples} eval" if result.eval_examples else ""
    what = "cache hit, nothing tokenised" if result.hit else "tokenised"
    procs = "" if result.hit else f", {result.procs} process(es)"
    print(
        f"{what}: {result.train_examples} training examples{evaluation} from {result.stats['rows']} rows "
        f"in {result.path} ({result.seconds:.1f} s{procs})"
    )
    d, fmt = recipe.data, recipe_mod.stats_format(recipe.data)
    for source in result.sources if d.mixture is not None else []:
        print(
            f"  {source['where'].removesuffix('.path')}: {source['path']} ({source['format']}): "
            f"{source['rows']} rows -> {source['examples']} examples"
        )
    for label, text in prep_report.lines(result.stats, max_length=d.max_length, fmt=fmt):
        print(f"  {label}: {text}")
    for note in result.notes:
        print(f"note: {note}")
    for warning in prep_report.warnings(result.stats, max_length=d.max_length, fmt=fmt):
        print(f"warning: {warning}")
    return 0


def _env_pairs(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise TunefleetError(f"--env {item!r} is not NAME=VALUE", "write e.g. --env OMP_NUM_THREADS=8")
        env[name] = value
    return env


def _slurm(args: argparse.Namespace) -> int:
    from tunefleet.slurm.job import build_job, submit_job, write_job
    from tunefleet.slurm.sbatch import ClusterSpec

    fields: dict[str, Any] = dict(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        gpu_type=args.gpu_type,
        procs_per_node=args.procs_per_node,
        cpus_per_task=args.cpus_per_task,
        mem=args.mem,
        time=args.time,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
        exclusive=args.exclusive,
        job_name=args.job_name,
        env_setup=tuple(args.env_setup),
        env=_env_pairs(args.env),
        extra_sbatch=tuple(args.extra_sbatch),
        restart=args.restart,
        max_restarts=args.max_restarts,
    )
    if args.checkpoint_s is not None:
        fields["checkpoint_s"] = args.checkpoint_s
    job = build_job(
        args.recipe,
        args.overrides,
        ClusterSpec(**fields),
        script_path=args.out,
        python=args.python,
        measure_checkpoint=args.checkpoint_s is None,
        weights_only=args.resume_weights_only,
    )
    write_job(job)
    b, spec = job.batch, job.spec
    print(f"recipe   {job.recipe_path} (resolved: every node and restart trains from it)")
    for note in job.notes:
        print(f"note     {note}")
    for warning in job.warnings:
        print(f"warning  {warning}")
    print(f"script   {job.script_path}")
    versions = ", ".join(f"{name} {version}" for name, version in job.versions.items())
    print(
        f"python   {job.python} (must import {versions or 'tunefleet and torch'}: checked as the job starts)"
    )
    print(
        f"world    {spec.nodes} node(s) x {b.world_size // spec.nodes} process(es) = {b.world_size}; batch: "
        f"micro {b.micro_batch_size} x accum {b.grad_accum_steps} x world {b.world_size} = global "
        f"{b.global_batch_size} samples/step"
    )
    print(
        f"signal   USR1 {spec.signal_lead_s} s before the time limit: checkpoint {job.checkpoint_note} "
        f"+ margin {spec.signal_margin_s} s"
    )
    print(
        f"restart  {spec.restart} (max {spec.max_restarts})"
        + (f"; continues from {Path(job.resume_from).name}" if job.resume_from else "")
    )
    if shutil.which("sbatch") is None:
        print("sbatch   not found here: the script was not validated (run this on a login node)")
    else:
        print(f"sbatch   --test-only: {_test_only(job.script_path)}")
    if args.submit:
        job_id = submit_job(job)
        print(f"submitted job {job_id}; follow it with: tunefleet status {job.recipe.output_dir}")
    else:
        print(
            f"submit   sbatch {job.script_path}   (or add --submit; tunefleet status then knows the job id)"
        )
    return 0


UNREACHABLE = ("unable to contact slurm controller", "connect failure", "connection refused", "timed out")


def _test_only(script: Path) -> str:
    """sbatch's answer; an unreachable controller is a warning (the script is written), not a spec problem."""
    from tunefleet.slurm.submit import SubmitError, test_only

    try:
        return test_only(script)
    except SubmitError as exc:
        if not any(word in exc.problem.lower() for word in UNREACHABLE):
            raise
        return (
            f"not checked: the SLURM controller did not answer ({exc.problem.splitlines()[-1]}); the script is "
            "written, check `scontrol ping` and run `sbatch --test-only` on it when the controller is back"
        )


def _status(args: argparse.Namespace) -> int:
    from tunefleet.slurm.status import read_status, render_status

    status = read_status(args.output_dir)
    print(json.dumps(status, indent=2) if args.json else render_status(status))
    return 0


def _add_prepare(sub: Any) -> None:
    p = sub.add_parser(
        "prepare",
        help="tokenise a recipe's data once into <output_dir>/.cache (used by every rank)",
        description="Tokenise the recipe's data into <output_dir>/.cache/tokenized-<fingerprint>/, keyed by "
        "the data bytes, the tokenizer and the recipe's data section. The trainer loads it on "
        "every rank instead of tokenising; a second run with the same inputs is a cache hit.",
    )
    p.add_argument("recipe", help="recipe YAML file")
    add_overrides(p)
    p.set_defaults(func=_prepare)


def _add_slurm(sub: Any) -> None:
    p = sub.add_parser(
        "slurm",
        help="write (and submit) a restartable sbatch script for a recipe",
        description="Check the recipe and the batch math for this node count, write the resolved recipe and "
        "an sbatch script into the output directory, validate it with `sbatch --test-only` when "
        "sbatch exists, and with --submit submit it and print the job id.",
    )
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node (0: CPU nodes, gloo)")
    p.add_argument("--gpu-type", default=None, help="GPU type for --gpus-per-node=TYPE:N (e.g. a100)")
    p.add_argument(
        "--procs-per-node",
        type=int,
        default=None,
        help="training processes per node (default: one per GPU, 1 on CPU nodes)",
    )
    p.add_argument("--partition", default=None, help="partition (default: the cluster's default)")
    p.add_argument("--time", required=True, help="time limit, SLURM syntax (MM, HH:MM:SS, D-HH:MM:SS)")
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None, help="node features (e.g. 'a100&ib')")
    p.add_argument("--exclusive", action="store_true", help="whole nodes")
    p.add_argument("--mem", default=None, help="memory per node (64G; 0 = all)")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPUs for the one task per node")
    p.add_argument("--job-name", default="tunefleet")
    p.add_argument(
        "--env-setup",
        action="append",
        default=[],
        metavar="LINE",
        help="shell line run before the launch, e.g. 'source /opt/venv/bin/activate' (repeatable)",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="variable exported in the job (repeatable; secrets are refused: export them before "
        "submitting, the job inherits them)",
    )
    p.add_argument(
        "--extra-sbatch",
        action="append",
        default=[],
        metavar="LINE",
        help="extra #SBATCH option, e.g. --extra-sbatch=--reservation=big (repeatable)",
    )
    p.add_argument(
        "--restart",
        choices=["requeue", "dependency", "none"],
        default="requeue",
        help="after a preemption checkpoint: requeue the job (default), submit a successor "
        "(dependency), or stop (none)",
    )
    p.add_argument("--max-restarts", type=int, default=3, help="stop restarting after this many (default 3)")
    p.add_argument(
        "--resume-weights-only",
        action="store_true",
        help="allow the job to continue a checkpoint whose optimizer state was removed, with a fresh "
        "optimizer (a checkpoint that still has it resumes as usual, restarts included)",
    )
    p.add_argument(
        "--checkpoint-s",
        type=int,
        default=None,
        help="seconds from the signal to a complete checkpoint (default: measured by an earlier "
        "attempt in output_dir, else 60)",
    )
    p.add_argument(
        "--python",
        default=None,
        metavar="PYTHON",
        help="the interpreter the job runs, after the --env-setup lines (default: the one running this "
        "command; `--python python` takes whatever --env-setup puts on PATH). Checked here and, "
        "before anything starts, in the job: it must import tunefleet and torch at this machine's versions",
    )
    add_overrides(p)
    p.add_argument(
        "--out",
        default=None,
        metavar="FILE",
        help="where to write the script (default <output_dir>/slurm.sbatch)",
    )
    p.add_argument(
        "--submit", action="store_true", help="submit it and record the job id for tunefleet status"
    )
    p.set_defaults(func=_slurm)


def _add_status(sub: Any) -> None:
    p = sub.add_parser(
        "status",
        help="job state, restarts, newest checkpoint, samples done and ETA of a run",
        description="Read a run's output directory (checkpoints, metrics.jsonl, plan.json, the job id recorded "
        "by `tunefleet slurm --submit`) and ask scontrol about the job when it is available.",
    )
    p.add_argument("output_dir", help="the run's output_dir")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_status)


def add_commands(sub: Any) -> None:
    """Add the three subcommands to `tunefleet`'s subparsers."""
    _add_prepare(sub)
    _add_slurm(sub)
    _add_status(sub)
