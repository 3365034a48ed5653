"""The output directory of a run: what it holds, whether to start, resume or refuse, and how
nothing in it is ever lost (finished runs are refused, `--overwrite` moves the old run aside,
metrics are truncated to the resumed checkpoint so no step is logged twice).

`decide_start` is read-only (every rank can call it before anyone writes); `check_resume` is the
one check that a checkpoint can be continued by this recipe on this world size. The launcher,
the SLURM job builder and every rank call both through `tunefleet.launch.preflight`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tunefleet.launch.core import checkpoints as ckpt
from tunefleet.launch.core import recipe as recipe_mod
from tunefleet.launch.core.args import StartOptions
from tunefleet.launch.core.batch import BatchPlan, check_batch_change
from tunefleet.launch.core.errors import RunDirError
from tunefleet.launch.core.layout import FINAL_DIR, LAUNCH_DIR, METRICS_FILE, RESOLVED_RECIPE, atomic_write
from tunefleet.launch.core.recipe import Recipe

StartMode = Literal["fresh", "overwrite", "resume"]


@dataclass(frozen=True)
class RunDirState:
    """What the output directory holds before the run starts (read-only inspection)."""

    exists: bool
    finished: bool
    checkpoint: str | None
    foreign: bool


@dataclass(frozen=True)
class Start:
    """How the run starts in its output directory."""

    mode: StartMode
    """`fresh`, `overwrite` (the old run is moved aside first) or `resume`."""

    checkpoint: str | None
    """The checkpoint a `resume` continues from."""

    note: str | None = None
    """Why the newest complete checkpoint was passed over (damaged), when it was."""


def inspect_output_dir(path: Path) -> RunDirState:
    if not path.exists():
        return RunDirState(False, False, None, False)
    if not path.is_dir():
        raise RunDirError(
            f"output_dir {str(path)!r} exists and is not a directory", "choose another output_dir"
        )
    # LAUNCH_DIR: the configs `tunefleet launch` writes before the ranks start
    entries = [e for e in path.iterdir() if not e.name.startswith(".") and e.name != LAUNCH_DIR]
    finished = (path / FINAL_DIR).is_dir()
    newest = ckpt.latest(path)
    checkpoint = str(newest) if newest else None
    foreign = bool(entries) and not (path / RESOLVED_RECIPE).exists() and not finished and checkpoint is None
    return RunDirState(True, finished, checkpoint, foreign)


def check_output_location(recipe: Recipe) -> None:
    """output_dir can be created and written, and is apart from the data: a run inside a data
    directory would be read as data by every later run on it, and a run directory holding the data
    would move it aside with `--overwrite`."""
    out = Path(recipe.output_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise RunDirError(
            f"output_dir {str(out)!r} exists and is not a directory", "choose another output_dir"
        )
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirError(
            f"output_dir {str(out)!r} is below {str(existing)!r}, which is a file, not a directory",
            "choose an output_dir whose parents are directories",
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "output_dir" if existing == out else f"{str(existing)!r}, where output_dir would be created,"
        raise RunDirError(
            f"{what} {'' if existing != out else repr(str(out)) + ' '}is not writable by this user",
            "choose a directory you can write to (or fix its permissions)",
        )
    named = [(s.where, s.data.path) for s in recipe_mod.data_sources(recipe.data)]
    for key, value in [*named, ("data.eval_path", recipe.data.eval_path)]:
        if not value:
            continue
        data = Path(value).expanduser().absolute()
        if not data.exists():
            continue  # a dataset name, or a file the data loader will report
        if data.is_dir() and (out == data or data in out.parents):
            raise RunDirError(
                f"output_dir {str(out)!r} is inside the data directory {key}={str(data)!r}: its "
                "checkpoints and adapters would be read as data by every later run on that directory",
                "put output_dir outside the data (e.g. runs/NAME next to it)",
            )
        if out in data.parents:
            raise RunDirError(
                f"output_dir {str(out)!r} holds {key}={str(data)!r}: --overwrite would move the data "
                "aside with the old run",
                "put output_dir outside the data (e.g. runs/NAME next to it)",
            )


def decide_start(path: Path, options: StartOptions) -> Start:
    """Fresh, overwrite or resume (which checkpoint). Refuse anything that would lose results."""
    state = inspect_output_dir(path)
    if options.resume is not None:
        return _explicit_resume(path, state, options)
    if options.overwrite:
        return Start("overwrite" if state.exists and any(path.iterdir()) else "fresh", None)
    if state.foreign:
        raise RunDirError(
            f"output_dir {str(path)!r} holds files that are not a tunefleet run",
            "choose an empty or new output_dir (or pass --overwrite to move the existing one aside)",
        )
    if state.finished:
        raise RunDirError(
            f"output_dir {str(path)!r} already holds a finished run ({FINAL_DIR}/ exists)",
            "choose a new output_dir, or pass --overwrite to start over (the old run is moved aside, not deleted)",
        )
    if state.checkpoint:
        if options.no_resume:
            raise RunDirError(
                f"output_dir {str(path)!r} holds an unfinished run with checkpoint {Path(state.checkpoint).name}",
                "drop --no-resume to continue it, or pass --overwrite to start over (the old run is moved aside)",
            )
        return _newest_undamaged(path)
    return Start("fresh", None)


def _newest_undamaged(path: Path) -> Start:
    """The newest complete checkpoint whose files match their checksums; a damaged newer one is
    passed over, and said so."""
    damaged: list[str] = []
    for checkpoint in reversed(ckpt.complete_checkpoints(path)):
        bad = ckpt.damaged_file(checkpoint)
        if bad is None:
            note = (
                f"{'; '.join(damaged)}: continuing from {checkpoint.name}, the newest complete checkpoint "
                "whose files match their checksums"
                if damaged
                else None
            )
            return Start("resume", str(checkpoint), note)
        damaged.append(f"{checkpoint.name} is damaged ({bad} differs from the checksum in its manifest)")
    raise RunDirError(
        f"output_dir {str(path)!r}: every checkpoint is damaged: {'; '.join(damaged)}",
        "restore the files from a backup, or start over with --overwrite (the old run is moved aside)",
    )


def _explicit_resume(path: Path, state: RunDirState, options: StartOptions) -> Start:
    resume = str(options.resume)
    if options.overwrite or options.no_resume:
        raise RunDirError("--resume cannot be combined with --overwrite or --no-resume", "pick one")
    if not ckpt.is_complete(Path(resume)):
        raise RunDirError(
            f"--resume {resume!r} is not a complete tunefleet checkpoint (no {ckpt.COMPLETE} marker or "
            "files missing)",
            f"pass a checkpoint-N directory that holds {ckpt.MANIFEST} and {ckpt.COMPLETE}, or drop --resume "
            "to continue from the newest complete one",
        )
    if state.finished:
        raise RunDirError(
            f"output_dir {str(path)!r} already holds a finished run ({FINAL_DIR}/ exists)",
            "choose a new output_dir to continue from that checkpoint",
        )
    bad = ckpt.damaged_file(Path(resume))
    if bad is not None:
        older = [
            c
            for c in ckpt.complete_checkpoints(Path(resume).parent)
            if ckpt.step_of(c) < ckpt.step_of(Path(resume))
        ]
        raise RunDirError(
            f"--resume {resume!r} is damaged: {bad} differs from the checksum in its manifest",
            f"resume from an older complete checkpoint (--resume {older[-1]})"
            if older
            else "restore the checkpoint's files, or start over",
        )
    return Start("resume", resume)


def check_resume(
    checkpoint: str | Path, recipe: Recipe, batch: BatchPlan, data_fingerprint: str
) -> list[str]:
    """The one resume check: refuse to continue `checkpoint` under a recipe that changes the
    training, over data that changed since, or with a strategy / world size that cannot read its
    files. Returns one line per harmless change (world size, micro batch, logging, ...)."""
    manifest = ckpt.read_manifest(Path(checkpoint))
    saved = manifest.get("data_fingerprint")
    if saved is not None and saved != data_fingerprint:
        raise RunDirError(
            f"the data changed since {Path(checkpoint).name} was written: "
            + ", ".join(f"{s.where}={s.data.path!r}" for s in recipe_mod.data_sources(recipe.data))
            + (f" / data.eval_path={recipe.data.eval_path!r}" if recipe.data.eval_path else "")
            + f" no longer has the bytes it trained on (fingerprint {saved} -> {data_fingerprint}); resuming "
            "would continue its sample order over other rows",
            "restore the data the run started with, or start a new run on the new data (a new output_dir, "
            "or --overwrite)",
        )
    breaking, harmless = recipe_mod.resume_diff(manifest["recipe"], recipe)
    if breaking:  # every difference at once (the global batch among them)
        raise RunDirError(
            f"the recipe differs from the one {Path(checkpoint).name} was trained with, in ways that change "
            "the training:\n    " + "\n    ".join(breaking),
            "restore those values to continue this run, or start a new run (new output_dir, or --overwrite)",
        )
    notes = check_batch_change(manifest.get("batch_plan", {}), batch)
    ckpt.check_layout(manifest, recipe.parallel.strategy, batch.world_size)
    return notes + harmless


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
    step = ckpt.step_of(Path(checkpoint or f"{ckpt.PREFIX}0"))
    if path.exists():
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write(path, "".join(kept))
    return step


def set_aside_metrics(out: Path) -> Path | None:
    """An earlier attempt that never checkpointed: keep its metrics under another name, start anew."""
    path = out / METRICS_FILE
    if not path.exists():
        return None
    target = out / f"{METRICS_FILE}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    path.rename(target)
    return target
