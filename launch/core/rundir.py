"""The output directory of a run: what it holds, whether to start, resume or refuse, and how
nothing in it is ever lost (finished runs are refused, `--overwrite` moves the old run aside,
metrics are truncated to the resumed checkpoint so no step is logged twice).

`decide_start` is read-only and scans the checkpoints once (`checkpoints.scan`); the launcher
hands its decision to the ranks (`Start.to_env`), which then do not scan again. `check_resume` is
the one check that a checkpoint can be continued by this recipe on this world size. The launcher,
the SLURM job builder and every rank call both through `tunefleet.launch.preflight`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tunefleet.launch.core import checkpoints as ckpt
from tunefleet.launch.core import recipe as recipe_mod
from tunefleet.launch.core.args import StartOptions
from tunefleet.launch.core.batch import BatchPlan, batch_change
from tunefleet.launch.core.errors import RunDirError
from tunefleet.launch.core.layout import (
    FINAL_DIR,
    LAUNCH_DIR,
    METRICS_FILE,
    RESOLVED_MARKER,
    RESOLVED_RECIPE,
    atomic_write,
    move_aside,
)
from tunefleet.launch.core.recipe import Recipe

StartMode = Literal["fresh", "overwrite", "resume"]


@dataclass(frozen=True)
class RunDirState:
    """What the output directory holds before the run starts (read-only inspection, one scan)."""

    exists: bool
    finished: bool
    checkpoints: ckpt.Scan
    """The newest usable checkpoint and the newer ones passed over (`checkpoints.scan`)."""
    foreign: bool

    @property
    def checkpoint(self) -> str | None:
        return str(self.checkpoints.usable) if self.checkpoints.usable else None


@dataclass(frozen=True)
class Start:
    """How the run starts in its output directory: decided once per start (by the launcher, or by
    a rank started by hand) and handed to the ranks (`to_env` / `from_env`)."""

    mode: StartMode
    """`fresh`, `overwrite` (the old run is moved aside first) or `resume`."""

    checkpoint: str | None
    """The checkpoint a `resume` continues from."""

    note: str | None = None
    """Why newer checkpoints were passed over (each cannot be used, and why), when they were."""

    passed_over: tuple[tuple[str, str], ...] = ()
    """(path, why) of every unusable checkpoint newer than the one continued from: rank 0 moves them
    aside before the run writes those steps again (`checkpoints.move_aside`; nothing is deleted)."""

    weights_only: bool = False
    """The checkpoint's optimizer state was removed and the user allowed it (`--resume-weights-only`):
    its weights, step, sample order and schedule continue with a fresh optimizer."""

    def to_env(self, output_dir: str) -> str:
        """The decision as the launcher hands it to the ranks (ENV_START)."""
        return json.dumps({"output_dir": str(Path(output_dir).absolute()), **dataclasses.asdict(self)})

    @classmethod
    def from_env(cls, value: str | None, output_dir: str) -> Start | None:
        """The launcher's decision for `output_dir`, or None (no launcher, or another directory)."""
        if not value:
            return None
        data = json.loads(value)
        if data.pop("output_dir", None) != str(Path(output_dir).absolute()):
            return None
        data["passed_over"] = tuple(tuple(pair) for pair in data.get("passed_over", ()))
        return cls(**data)


def inspect_output_dir(path: Path) -> RunDirState:
    if not path.exists():
        return RunDirState(False, False, ckpt.Scan(None), False)
    if not path.is_dir():
        raise RunDirError(
            f"output_dir {str(path)!r} exists and is not a directory", "choose another output_dir"
        )
    # LAUNCH_DIR: the configs `tunefleet launch` writes before the ranks start
    entries = [e for e in path.iterdir() if not e.name.startswith(".") and e.name != LAUNCH_DIR]
    finished = (path / FINAL_DIR).is_dir()
    scanned = ckpt.scan(path)
    has_checkpoints = scanned.usable is not None or bool(scanned.passed_over)
    foreign = bool(entries) and not (path / RESOLVED_RECIPE).exists() and not finished and not has_checkpoints
    return RunDirState(True, finished, scanned, foreign)


def check_output_location(recipe: Recipe) -> None:
    """output_dir can be created and written, and is apart from the data: a run inside a data
    directory would be read as data by every later run on it, and a run directory holding the data
    would move it aside with `--overwrite`."""
    out = Path(recipe.output_dir).expanduser().absolute()
    for link in (out, *out.parents):
        if link.is_symlink() and not link.exists():
            raise RunDirError(
                f"output_dir {str(out)!r}: {str(link)!r} is a symbolic link to {os.readlink(link)!r}, which does not exist",
                "create the directory it points to (a storage not mounted yet?), or choose another output_dir",
            )
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


def _check_recipe_file(path: Path) -> None:
    """A `recipe.yaml` in output_dir that tunefleet did not write is the user's (one folder per
    experiment): the run would replace it with the resolved recipe."""
    file = path / RESOLVED_RECIPE
    if not file.is_file():
        return
    try:
        with file.open(encoding="utf-8", errors="replace") as f:
            head = f.read(200)
    except OSError:
        return
    if not head.startswith(RESOLVED_MARKER):
        raise RunDirError(
            f"output_dir {str(path)!r} holds a {RESOLVED_RECIPE} that tunefleet did not write (yours?): the run "
            "writes its resolved recipe there and would replace it",
            f"keep your recipe next to the output directory (e.g. {path.parent / (path.name + '.yaml')}), or choose "
            "another output_dir",
        )


def decide_start(path: Path, options: StartOptions) -> Start:
    """Fresh, overwrite or resume (which checkpoint). Refuse anything that would lose results."""
    state = inspect_output_dir(path)
    if options.resume is not None:
        return _explicit_resume(path, state, options)
    if options.weights_only and (options.overwrite or options.no_resume):
        raise RunDirError(
            "--resume-weights-only continues a checkpoint; --overwrite and --no-resume start over", "pick one"
        )
    if options.overwrite:
        if state.exists and any(path.iterdir()) and os.path.ismount(path):
            raise RunDirError(
                f"--overwrite moves the old run aside by renaming output_dir {str(path)!r}, and that is a "
                "mount point, which cannot be renamed",
                f"use a directory below the mount as output_dir (e.g. {path / 'run'}), or move the old run "
                "away yourself",
            )
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
    _check_recipe_file(path)
    scanned = state.checkpoints
    if scanned.weights_only is not None:
        return _weights_only_start(path, scanned, options)
    if scanned.usable is None and scanned.passed_over:
        raise RunDirError(
            f"output_dir {str(path)!r}: every checkpoint is damaged: {scanned.note()}; starting afresh "
            "would train from step 0 beside them",
            "restore the checkpoint's files (or its optimizer state) from a backup, or start over with "
            "--overwrite (the old run is moved aside, not deleted)",
        )
    if state.checkpoint:
        if options.no_resume:
            raise RunDirError(
                f"output_dir {str(path)!r} holds an unfinished run with checkpoint {Path(state.checkpoint).name}",
                "drop --no-resume to continue it, or pass --overwrite to start over (the old run is moved aside)",
            )
        return Start(
            "resume",
            state.checkpoint,
            scanned.note(),
            tuple((str(p), why) for p, why in scanned.passed_over),
        )
    return Start("fresh", None)


def _steps(first: int, last: int) -> str:
    return f"step {first}" if first == last else f"steps {first}-{last}"


def _weights_only_start(path: Path, scanned: ckpt.Scan, options: StartOptions) -> Start:
    """The newest checkpoint with intact weights has no optimizer state (removed to save space):
    continue its weights with a fresh optimizer when the user allowed it, otherwise refuse (continuing
    an older checkpoint would set it aside and train its steps again; starting afresh, beside it)."""
    checkpoint = scanned.weights_only
    assert checkpoint is not None
    if options.no_resume:
        raise RunDirError(
            f"output_dir {str(path)!r} holds an unfinished run with checkpoint {checkpoint.name}",
            "drop --no-resume to continue it, or pass --overwrite to start over (the old run is moved aside)",
        )
    if options.weights_only:
        weights = scanned.for_weights()
        return Start(
            "resume",
            str(checkpoint),
            weights.note(),
            tuple((str(p), why) for p, why in weights.passed_over),
            weights_only=True,
        )
    older = scanned.usable
    raise RunDirError(
        f"output_dir {str(path)!r}: {checkpoint.name} has no optimizer state ("
        + ", ".join(ckpt.optimizer_files(checkpoint))
        + " removed); "
        + (
            f"continuing from {older.name} instead would set it aside and train "
            + _steps(ckpt.step_of(older) + 1, ckpt.step_of(checkpoint))
            + " again"
            if older is not None
            else "starting afresh would train from step 0 beside it"
        ),
        f"pass --resume-weights-only to continue {checkpoint.name}'s weights with a fresh optimizer (Adam's "
        "moments restart from zero; the step, the sample order and the learning-rate schedule continue)"
        + (f", or --resume {older} to continue the older complete checkpoint" if older is not None else "")
        + ", or restore the optimizer state from a backup",
    )


def _why_not_weights_only(checkpoint: Path) -> str:
    """Why a checkpoint missing optimizer files cannot continue its weights alone."""
    if ckpt.problem(checkpoint, without_optimizer=True) is not None:
        return "files other than the optimizer state are missing or damaged"
    if not ckpt.weights_stand_alone(ckpt.read_manifest(checkpoint)):
        return (
            "DeepSpeed keeps the fp32 master weights (under ZeRO-3 the weights themselves) in its "
            "optimizer-state files"
        )
    return (
        "some of its optimizer-state files are still there (damaged, not removed): remove them all, or none"
    )


def _explicit_resume(path: Path, state: RunDirState, options: StartOptions) -> Start:
    resume = str(options.resume)
    if options.overwrite or options.no_resume:
        raise RunDirError("--resume cannot be combined with --overwrite or --no-resume", "pick one")
    if state.finished:
        raise RunDirError(
            f"output_dir {str(path)!r} already holds a finished run ({FINAL_DIR}/ exists)",
            "choose a new output_dir to continue from that checkpoint",
        )
    unfinished = ckpt.incomplete(Path(resume)) if Path(resume).is_dir() else "it is not a directory"
    if unfinished is not None and ckpt.optimizer_removed(Path(resume)):
        if options.weights_only:
            return Start("resume", resume, weights_only=True)
        raise RunDirError(
            f"--resume {resume!r} has no optimizer state ({', '.join(ckpt.optimizer_files(Path(resume)))} removed)",
            "add --resume-weights-only to continue its weights with a fresh optimizer (Adam's moments restart "
            "from zero; the step, the sample order and the learning-rate schedule continue), or restore the "
            "optimizer state from a backup",
        )
    if unfinished is not None and options.weights_only and ckpt.optimizer_files(Path(resume)):
        unfinished += f"; --resume-weights-only cannot help: {_why_not_weights_only(Path(resume))}"
    if unfinished is not None:
        raise RunDirError(
            f"--resume {resume!r} is not a complete tunefleet checkpoint ({unfinished})",
            f"pass a checkpoint-N directory that holds {ckpt.MANIFEST} and {ckpt.COMPLETE}, or drop --resume "
            "to continue from the newest usable one",
        )
    bad = ckpt.damaged_file(Path(resume))
    if bad is not None:
        usable = ckpt.scan(Path(resume).parent).usable
        older = usable is not None and ckpt.step_of(usable) < ckpt.step_of(Path(resume))
        raise RunDirError(
            f"--resume {resume!r} is damaged: {bad} differs from the checksum in its manifest",
            f"resume from an older usable checkpoint (--resume {usable})"
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
    saved = manifest.data_fingerprint
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
    breaking, harmless = recipe_mod.resume_diff(manifest.recipe, recipe)
    saved_batch = manifest.batch_plan or {"global_batch_size": manifest.recipe["batch"]["global_batch_size"]}
    batch_problem, batch_notes = batch_change(saved_batch, batch)
    if batch_problem is not None:
        breaking = [batch_problem, *breaking]
    if breaking:  # every difference at once (the global batch among them)
        raise RunDirError(
            f"the recipe differs from the one {Path(checkpoint).name} was trained with, in ways that change "
            "the training:\n    " + "\n    ".join(breaking),
            "restore those values to continue this run, or start a new run (new output_dir, or --overwrite)",
        )
    ckpt.check_layout(manifest, recipe.parallel.strategy, batch.world_size)
    return batch_notes + harmless


def truncate_metrics(path: Path, checkpoint: str | None) -> int:
    """Drop metrics rows logged after `checkpoint` (they will be logged again): no duplicated steps."""
    step = ckpt.step_of(Path(checkpoint or ckpt.dirname(0)))
    if path.exists():
        kept, torn = [], 0
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # blank, or the torn last line of a process killed while writing it
                torn += bool(line.strip())
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                kept.append(line + "\n")
        atomic_write(path, "".join(kept))
        if torn:
            print(
                f"note: {path.name}: dropped {torn} unreadable line(s) (a process killed while writing one)",
                flush=True,
            )
    return step


def set_aside_metrics(out: Path) -> Path | None:
    """An earlier attempt that never checkpointed: keep its metrics under another name, start anew."""
    path = out / METRICS_FILE
    return move_aside(path) if path.exists() else None
