"""Command-line arguments shared by several commands (`tunefleet train`, `tunefleet launch`,
`tunefleet plan`, `tunefleet slurm` and `python -m tunefleet.distributed.sft`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass


def add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set train.max_steps=100 (repeatable)",
    )


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """`--set` and how to treat an output directory that already holds a run."""
    add_overrides(p)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an output_dir that holds a run (the old one is moved aside, not deleted)",
    )
    p.add_argument(
        "--no-resume", action="store_true", help="refuse to continue an unfinished run found in output_dir"
    )
    p.add_argument(
        "--resume",
        metavar="CHECKPOINT",
        default=None,
        help="continue from this complete checkpoint (default: the newest one in output_dir)",
    )
    p.add_argument(
        "--resume-weights-only",
        action="store_true",
        help="allow continuing a checkpoint whose optimizer state was removed: its weights, step, sample "
        "order and learning-rate schedule, with a fresh optimizer (a checkpoint that still has its "
        "optimizer state resumes it as usual)",
    )


@dataclass(frozen=True, kw_only=True)
class StartOptions:
    """What to do with an output directory that already holds a run (the run arguments above)."""

    overwrite: bool = False
    """Move the old run aside and start over."""

    no_resume: bool = False
    """Refuse to continue an unfinished run."""

    resume: str | None = None
    """Continue from this checkpoint instead of the newest one."""

    weights_only: bool = False
    """Allow continuing a checkpoint whose optimizer state was removed, with a fresh optimizer (it
    permits, it does not force: a rerun of the same command after a later stop resumes in full)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> StartOptions:
        return cls(
            overwrite=args.overwrite,
            no_resume=args.no_resume,
            resume=args.resume,
            weights_only=args.resume_weights_only,
        )

    def argv(self) -> list[str]:
        """The same options as command-line arguments (handed on to the ranks)."""
        out = ["--resume", self.resume] if self.resume else []
        out += ["--resume-weights-only"] if self.weights_only else []
        return out + (["--no-resume"] if self.no_resume else [])
