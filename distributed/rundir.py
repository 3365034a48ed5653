"""The output directory of a run: what it holds, whether to start, resume or refuse, and how
nothing in it is ever lost (finished runs are refused, `--overwrite` moves the old run aside,
metrics are truncated to the resumed checkpoint so no step is logged twice).

Read-only inspection comes first (every rank can do it before anyone writes); the entrypoint then
lets rank 0 act on the decision.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tunefleet.launch import recipe as recipe_mod
from tunefleet.launch.errors import TunefleetError
from tunefleet.launch.recipe import Recipe
from tunefleet.launch.workstation import LAUNCH_DIR

RESOLVED_RECIPE = "recipe.yaml"
FINAL_DIR = "final"


@dataclass(frozen=True)
class RunDirState:
    """What the output directory holds before the run starts (read-only inspection)."""

    exists: bool
    finished: bool
    checkpoint: str | None
    foreign: bool


def inspect_output_dir(path: Path) -> RunDirState:
    if not path.exists():
        return RunDirState(False, False, None, False)
    if not path.is_dir():
        raise TunefleetError(
            f"output_dir {str(path)!r} exists and is not a directory", "choose another output_dir"
        )
    from tunefleet.distributed import checkpoint as ckpt

    # LAUNCH_DIR: the configs `tunefleet launch` writes before the ranks start
    entries = [e for e in path.iterdir() if not e.name.startswith(".") and e.name != LAUNCH_DIR]
    finished = (path / FINAL_DIR).is_dir()
    newest = ckpt.latest(path)
    checkpoint = str(newest) if newest else None
    foreign = bool(entries) and not (path / RESOLVED_RECIPE).exists() and not finished and checkpoint is None
    return RunDirState(True, finished, checkpoint, foreign)


def decide_start(
    path: Path, state: RunDirState, *, overwrite: bool, no_resume: bool, resume: str | None = None
) -> tuple[str, str | None]:
    """Return ("fresh" | "overwrite" | "resume", checkpoint). Refuse anything that would lose results."""
    if resume is not None:
        from tunefleet.distributed import checkpoint as ckpt

        if overwrite or no_resume:
            raise TunefleetError("--resume cannot be combined with --overwrite or --no-resume", "pick one")
        if not ckpt.is_complete(Path(resume)):
            raise TunefleetError(
                f"--resume {resume!r} is not a complete tunefleet checkpoint (no {ckpt.COMPLETE} marker or "
                "files missing)",
                f"pass a checkpoint-N directory that holds {ckpt.MANIFEST} and {ckpt.COMPLETE}, or drop --resume "
                "to continue from the newest complete one",
            )
        if state.finished:
            raise TunefleetError(
                f"output_dir {str(path)!r} already holds a finished run ({FINAL_DIR}/ exists)",
                "choose a new output_dir to continue from that checkpoint",
            )
        return "resume", str(resume)
    if overwrite:
        return ("overwrite" if state.exists and any(path.iterdir()) else "fresh"), None
    if state.foreign:
        raise TunefleetError(
            f"output_dir {str(path)!r} holds files that are not a tunefleet run",
            "choose an empty or new output_dir (or pass --overwrite to move the existing one aside)",
        )
    if state.finished:
        raise TunefleetError(
            f"output_dir {str(path)!r} already holds a finished run ({FINAL_DIR}/ exists)",
            "choose a new output_dir, or pass --overwrite to start over (the old run is moved aside, not deleted)",
        )
    if state.checkpoint:
        if no_resume:
            raise TunefleetError(
                f"output_dir {str(path)!r} holds an unfinished run with checkpoint {Path(state.checkpoint).name}",
                "drop --no-resume to continue it, or pass --overwrite to start over (the old run is moved aside)",
            )
        return "resume", state.checkpoint
    return "fresh", None


def check_resume(checkpoint: str, recipe: Recipe) -> list[str]:
    """Refuse to continue a checkpoint under a recipe that changes the training; list harmless changes."""
    from tunefleet.distributed import checkpoint as ckpt

    saved = ckpt.read_manifest(Path(checkpoint))
    breaking, harmless = recipe_mod.resume_diff(saved["recipe"], recipe)
    if breaking:
        raise TunefleetError(
            f"the recipe differs from the one {Path(checkpoint).name} was trained with, in ways that change "
            "the training:\n    " + "\n    ".join(breaking),
            "restore those values to continue this run, or start a new run (new output_dir, or --overwrite)",
        )
    return harmless


def move_aside(path: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.old-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.old-{stamp}-{n}")
        n += 1
    path.rename(target)
    return target


def truncate_metrics(path: Path, checkpoint: str | None) -> int:
    """Drop metrics rows logged after `checkpoint` (they will be logged again): no duplicated steps."""
    step = int(Path(checkpoint or "checkpoint-0").name.rsplit("-", 1)[-1])
    if path.exists():
        import json

        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)
    return step
