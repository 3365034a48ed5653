"""The checkpoint format, owned here: the folder names, the typed manifest, what a checkpoint of
each strategy holds, and the one rule for a usable checkpoint.

A checkpoint is written into `<output_dir>/.tmp-checkpoint-<step>` (`tmp_dir_for`): every rank writes
and fsyncs its part, then (after a barrier) rank 0 writes `manifest.json` (a `Manifest`: files,
sizes and checksums, step, samples and tokens seen, the run's identity: recipe, world size,
strategy, batch plan, data fingerprint; save time) and the `COMPLETE` marker last, fsyncs, and
renames the directory to `checkpoint-<step>` (`dir_for`). Only the names here are checkpoints: a
`checkpoint-4-merged` directory a user made is not one.

`problem(path)` is the one rule for "usable": the marker, a readable manifest, every listed file at
its size and with its checksum. Resume, `tunefleet generate` and `merge`, `tunefleet status` and the
SLURM job builder all ask it, through `scan(out)`: the newest usable checkpoint and the newer ones
passed over, each with why (one scan per start; the launcher hands its result to the ranks).
`optimizer_removed(path)` is its one exception: a checkpoint that passes the rule but for its
optimizer state, every file of which is gone (removed to save space), can continue its weights with
a fresh optimizer, when the user asks for it (`--resume-weights-only`).

Nothing here deletes what tunefleet cannot prove is its own: leftovers under tunefleet's temporary
names (`.tmp-checkpoint-*`, `.deleting-checkpoint-*`) are removed at the next start; a
`checkpoint-*` directory that fails the rule is left where it is, or moved aside to a named place
(`move_aside`) when the run is about to write that step again. Retention deletes old complete
checkpoints only after a new one is complete, never the newest, renaming each to a temporary name
first so that a crash halfway leaves nothing that looks like a checkpoint.

The output directory is assumed to be on storage shared by all nodes (checked at start-up).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunefleet.launch.core import layout
from tunefleet.launch.core.errors import TunefleetError

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
DELETING_PREFIX = ".deleting-checkpoint-"
MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"
MOVED_ASIDE = "unusable"
"""`checkpoint-5` that fails the rule and would be written again becomes `checkpoint-5.unusable-<time>`."""


def dirname(step: int) -> str:
    """The folder name of the checkpoint of optimizer step `step`."""
    return f"{PREFIX}{step}"


def dir_for(out: str | os.PathLike, step: int) -> Path:
    """Where the complete checkpoint of step `step` lives in output directory `out`."""
    return Path(out) / dirname(step)


def tmp_dir_for(out: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of step `step` is written before it is complete."""
    return Path(out) / f"{TMP_PREFIX}{step}"


def is_checkpoint_name(dirname: str) -> bool:
    """`checkpoint-<digits>`: the only names that hold checkpoints."""
    return dirname.startswith(PREFIX) and dirname[len(PREFIX) :].isdigit()


def step_of(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[-1])


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems refuse fsync on directories
        pass


def fsync_tree(root: Path) -> None:
    """Flush every file under `root` (this rank's part of a checkpoint) to stable storage."""
    for dirpath, _, names in os.walk(root):
        for name in names:
            try:
                _fsync_file(Path(dirpath) / name)
            except FileNotFoundError:
                # another rank's temporary file, renamed meanwhile: that rank flushes it (seen with
                # 2 ranks sharing the directory: the walk listed `.tmpXXXX`, the open found nothing)
                continue
        _fsync_dir(Path(dirpath))


def file_list(root: Path) -> dict[str, int]:
    """Relative path -> size of every file under `root` (manifest and marker excluded)."""
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if rel not in (MANIFEST, COMPLETE):
                files[rel] = p.stat().st_size
    return dict(sorted(files.items()))


FULL_CHECKSUM_BYTES = 256 * 1024**2
"""Files up to this size are checksummed whole; larger ones (a full model's DeepSpeed or FSDP shards)
by a sample: their size, first, middle and last SAMPLE_BYTES, so a save stays cheap."""

SAMPLE_BYTES = 4 * 1024**2


def checksum(path: Path) -> str:
    """SHA-256 of a file, whole up to FULL_CHECKSUM_BYTES, else of a sample (`sample:` prefix)."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with path.open("rb") as f:
        if size <= FULL_CHECKSUM_BYTES:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            return h.hexdigest()
        h.update(str(size).encode())
        for offset in (0, size // 2, size - SAMPLE_BYTES):
            f.seek(offset)
            h.update(f.read(SAMPLE_BYTES))
    return "sample:" + h.hexdigest()


# ----------------------------------------------------------------------------- the manifest


@dataclass(frozen=True, kw_only=True)
class RunIdentity:
    """What a run fixes once at start and every one of its checkpoints records."""

    recipe: dict[str, Any]
    """The resolved recipe (`recipe.to_dict`): resume compares it with the recipe that continues."""
    recipe_hash: str
    world_size: int
    strategy: str
    """The resolved parallel.strategy (it decides the checkpoint's format: `CHECKPOINT_FORMAT`)."""
    batch_plan: dict[str, Any]
    """The run's one batch plan (`BatchPlan.to_dict()`), target included."""
    data_fingerprint: str | None
    """The bytes of the data (`data_identity.data_fingerprint`); None in manifests written before it."""


@dataclass(frozen=True, kw_only=True)
class Manifest(RunIdentity):
    """`manifest.json` of a checkpoint: written by `finalize`, read by `read_manifest`, nowhere else."""

    step: int
    epoch: float
    samples_seen: int
    tokens_seen: int | None = None
    save_s: float = 0.0
    """Seconds from the start of the save to its completion (the SLURM signal lead is set from it)."""
    created: str = ""
    files: dict[str, int] = field(default_factory=dict)
    """Relative path -> size of every file the checkpoint holds (manifest and marker excluded)."""
    checksums: dict[str, str] = field(default_factory=dict)
    """Relative path -> `checksum` (none in manifests written before checksums were recorded)."""

    @classmethod
    def for_step(
        cls,
        identity: RunIdentity,
        *,
        step: int,
        steps_per_epoch: int,
        tokens_seen: int | None,
        save_s: float,
    ) -> Manifest:
        """The manifest of the checkpoint of `step` (files and checksums: `finalize` adds them)."""
        return cls(
            **dataclasses.asdict(identity),
            step=step,
            epoch=step / steps_per_epoch,
            samples_seen=step * int(identity.batch_plan["global_batch_size"]),
            tokens_seen=tokens_seen,
            save_s=round(save_s, 3),
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Read a manifest's JSON; keys added to tunefleet later than the manifest take their
        defaults, keys this version does not know are ignored. Raises ValueError when a required one
        is missing."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("data_fingerprint", None)
        values.setdefault("batch_plan", {})
        values.setdefault("strategy", "single")
        values.setdefault("world_size", 1)
        values.setdefault("recipe_hash", "")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in values and _required(f)]
        if missing:
            raise ValueError(f"manifest without {', '.join(missing)}")
        return cls(**values)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def read_manifest(checkpoint: Path) -> Manifest:
    """The manifest of a checkpoint (OSError / ValueError when it is missing or unreadable)."""
    return Manifest.from_dict(json.loads((Path(checkpoint) / MANIFEST).read_text(encoding="utf-8")))


def finalize(tmp: Path, final: Path, manifest: Manifest) -> None:
    """Rank 0, after every rank flushed its part: manifest (sizes and checksums), marker, rename."""
    files = file_list(tmp)
    manifest = dataclasses.replace(
        manifest, files=files, checksums={rel: checksum(tmp / rel) for rel in files}
    )
    (tmp / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
    _fsync_file(tmp / MANIFEST)
    (tmp / COMPLETE).write_text("ok\n", encoding="utf-8")
    _fsync_file(tmp / COMPLETE)
    _fsync_dir(tmp)
    if final.exists():
        if problem(final) is None:  # a complete checkpoint is never rewritten
            shutil.rmtree(tmp)
            return
        move_aside(final, problem(final) or "")
    tmp.rename(final)
    _fsync_dir(final.parent)


# ----------------------------------------------------------------------------- the rule


def is_optimizer_state(rel: str) -> bool:
    """Whether a checkpoint's file (relative path) holds optimizer state: `optimizer.pt` (torch
    format), FSDP's `optimizer.bin` / `optimizer_<i>/` shards / `optimizer_<i>_rank<r>.bin`,
    DeepSpeed's `global_stepN/*optim_states.pt`."""
    first = rel.split("/", 1)[0]
    return (
        first in ("optimizer.pt", "optimizer.bin")
        or first.startswith("optimizer_")
        or rel.endswith("optim_states.pt")
    )


SCHEDULER_FILE = "scheduler.pt"
"""The learning-rate schedule's state: a resume with a fresh optimizer does without it (the schedule
is a function of the step, stepped there again)."""


def _spared_without_optimizer(rel: str) -> bool:
    """Files a resume with a fresh optimizer does not read: the optimizer state and the schedule's."""
    return is_optimizer_state(rel) or rel == SCHEDULER_FILE


WEIGHTS_ONLY_FORMATS = ("torch", "fsdp")
"""Checkpoint formats whose weights stand without the optimizer state. DeepSpeed's do not: ZeRO keeps
the fp32 master weights (under ZeRO-3 the only copy of the weights) in its optimizer-state files."""


def damaged_file(checkpoint: Path, *, without_optimizer: bool = False) -> str | None:
    """The first file of a complete checkpoint whose content no longer matches the checksum in its
    manifest (a file rewritten or corrupted at the same size), or None. `without_optimizer`: the
    optimizer state's and the schedule's files are not looked at."""
    for rel, digest in read_manifest(checkpoint).checksums.items():
        if without_optimizer and _spared_without_optimizer(rel):
            continue
        if checksum(checkpoint / rel) != digest:
            return rel
    return None


def incomplete(checkpoint: Path, *, without_optimizer: bool = False) -> str | None:
    """Why a checkpoint is not complete (marker, manifest, files at their sizes), or None.
    `without_optimizer`: the optimizer state's and the schedule's files are not looked at."""
    if not (checkpoint / COMPLETE).is_file():
        return f"it is incomplete: no {COMPLETE} marker (its write never finished)"
    try:
        manifest = read_manifest(checkpoint)
    except (OSError, ValueError, TypeError) as exc:
        return f"its {MANIFEST} is unreadable ({type(exc).__name__}: {exc})"
    for rel, size in manifest.files.items():
        if without_optimizer and _spared_without_optimizer(rel):
            continue
        f = checkpoint / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} is {f.stat().st_size:,} bytes, its manifest says {size:,}"
    return None


def problem(checkpoint: Path, *, without_optimizer: bool = False) -> str | None:
    """The one rule: why `checkpoint` cannot be used (resumed, generated or merged from), or None.
    Its marker, a readable manifest, every listed file at its size and with its checksum
    (`without_optimizer`: every file but the optimizer state's and the schedule's)."""
    found = incomplete(checkpoint, without_optimizer=without_optimizer)
    if found is not None:
        return found
    try:
        bad = damaged_file(checkpoint, without_optimizer=without_optimizer)
    except OSError as exc:
        return f"a file cannot be read ({exc})"
    return None if bad is None else f"{bad} differs from the checksum in its manifest"


def optimizer_files(checkpoint: Path) -> list[str]:
    """The files of a checkpoint's optimizer state, as its manifest lists them ([] if unreadable)."""
    try:
        return [rel for rel in read_manifest(checkpoint).files if is_optimizer_state(rel)]
    except (OSError, ValueError, TypeError):
        return []


def weights_stand_alone(manifest: Manifest) -> bool:
    """Whether the checkpoint's format keeps its weights outside the optimizer state
    (`WEIGHTS_ONLY_FORMATS`)."""
    return CHECKPOINT_FORMAT.get(manifest.strategy) in WEIGHTS_ONLY_FORMATS


def optimizer_removed(checkpoint: Path) -> bool:
    """The rule's one exception: `checkpoint` passes it but for its optimizer state, every file of
    which is gone (removed to save space, not damaged: one file left of several is damage). Its
    weights can continue with a fresh optimizer (`--resume-weights-only`) where its format allows it
    (`weights_stand_alone`)."""
    try:
        manifest = read_manifest(checkpoint)
    except (OSError, ValueError, TypeError):
        return False
    files = [rel for rel in manifest.files if is_optimizer_state(rel)]
    if not files or any((checkpoint / rel).exists() for rel in files) or not weights_stand_alone(manifest):
        return False
    return problem(checkpoint, without_optimizer=True) is None


def is_complete(checkpoint: Path) -> bool:
    """Marker, manifest and every listed file at its size: cheap (no checksum), for counting and
    retention; what may be used is `problem`'s answer."""
    return incomplete(checkpoint) is None


def checkpoint_dirs(out: Path) -> list[Path]:
    """Every `checkpoint-<step>` directory in `out`, usable or not, oldest first."""
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and is_checkpoint_name(p.name)]
    return sorted(found, key=step_of)


def complete_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in `out`, oldest first (`is_complete`: no checksums)."""
    return [p for p in checkpoint_dirs(out) if is_complete(p)]


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint (no checksums: `scan` for the one to use)."""
    found = complete_checkpoints(out)
    return found[-1] if found else None


@dataclass(frozen=True)
class Scan:
    """The checkpoints of an output directory as the one rule sees them."""

    usable: Path | None
    """The newest checkpoint without a problem, or None."""
    passed_over: tuple[tuple[Path, str], ...] = ()
    """Newer `checkpoint-*` directories that cannot be used, newest first, each with why."""
    weights_only: Path | None = None
    """The newest of those that passes the rule but for its removed optimizer state
    (`optimizer_removed`): its weights can continue with a fresh optimizer, when asked."""

    def for_weights(self) -> Scan:
        """The scan as a reader of the weights alone sees it (`tunefleet generate`, `merge`, a resume
        with a fresh optimizer): the checkpoint without optimizer state, where newer than `usable`."""
        if self.weights_only is None:
            return self
        step = step_of(self.weights_only)
        newer = tuple((p, why) for p, why in self.passed_over if step_of(p) > step)
        return Scan(self.weights_only, newer)

    def note(self) -> str | None:
        """One line on what was passed over, or None."""
        if not self.passed_over:
            return None
        why = "; ".join(
            f"{p.name} has no optimizer state (its weights can continue: --resume-weights-only)"
            if p == self.weights_only
            else f"{p.name} is damaged ({reason})"
            for p, reason in self.passed_over
        )
        if self.usable is None:
            return why
        return f"{why}: continuing from {self.usable.name}, the newest usable checkpoint"


def scan(out: Path) -> Scan:
    """The newest usable checkpoint in `out` and the newer ones passed over (each checked by
    `problem`, newest first, until one passes: older ones are not read)."""
    passed: list[tuple[Path, str]] = []
    weights_only: Path | None = None
    for checkpoint in reversed(checkpoint_dirs(out)):
        why = problem(checkpoint)
        if why is None:
            return Scan(checkpoint, tuple(passed), weights_only)
        if weights_only is None and optimizer_removed(checkpoint):
            weights_only = checkpoint
        passed.append((checkpoint, why))
    return Scan(None, tuple(passed), weights_only)


# ----------------------------------------------------------------------------- removing


def move_aside(checkpoint: Path, why: str) -> Path:
    """Rename an unusable checkpoint out of the way (`checkpoint-5.unusable-<time>`): kept, never
    deleted, and no longer taken for a checkpoint."""
    target = layout.move_aside(checkpoint, MOVED_ASIDE)
    print(
        f"note: {checkpoint.name} cannot be used ({why}): moved aside to {target.name}, not deleted",
        flush=True,
    )
    return target


def cleanup_incomplete(out: Path) -> list[Path]:
    """Remove what tunefleet left under its temporary names (a save or a retention cut short);
    rank 0, before training starts. Nothing else is touched."""
    removed: list[Path] = []
    if not out.is_dir():
        return removed
    for p in out.iterdir():
        if p.is_dir() and p.name.startswith((TMP_PREFIX, DELETING_PREFIX)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def set_aside_newer(out: Path, scanned: Scan) -> list[Path]:
    """Move aside the unusable checkpoints newer than the one the run continues from (or all of
    them, starting afresh): the run would write those steps again. Returns where they went."""
    return [move_aside(p, why) for p, why in scanned.passed_over if p.exists()]


def apply_retention(out: Path, keep_last: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `keep_last` (never the newest). Each is renamed
    to a temporary name first: a crash in the middle leaves no half checkpoint behind."""
    if keep_last is None:
        return []
    found = complete_checkpoints(out)
    doomed = found[: max(0, len(found) - max(keep_last, 1))]
    for p in doomed:
        gone = p.with_name(f"{DELETING_PREFIX}{step_of(p)}")
        p.rename(gone)
        shutil.rmtree(gone, ignore_errors=True)
    return doomed


def check_shared_storage(out: Path, *, rank: int, world_size: int, barrier: Any) -> None:
    """Fail clearly when the output directory is not one directory shared by every rank.

    Each rank writes a probe file, and every rank then checks that it sees all of them: on
    node-local storage the other nodes' probes are missing (and checkpoints would be split).
    """
    if world_size == 1:
        return
    probe_dir = out / ".tunefleet-probe"
    probe_dir.mkdir(parents=True, exist_ok=True)
    token = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID") or "run"
    (probe_dir / f"{token}-{rank}").write_text(str(os.getpid()))
    barrier()
    seen = sum((probe_dir / f"{token}-{r}").exists() for r in range(world_size))
    barrier()
    if rank == 0:
        shutil.rmtree(probe_dir, ignore_errors=True)
    if seen != world_size:
        raise TunefleetError(
            f"output_dir {str(out)!r} is not shared by all ranks: rank {rank} sees {seen} of {world_size} "
            "probe files (node-local storage?)",
            "put output_dir on a filesystem every node mounts at the same path (checkpoints and resume need it)",
        )


CHECKPOINT_FORMAT = {
    "single": "torch",
    "ddp": "torch",
    "fsdp": "fsdp",
    "fsdp-qlora": "fsdp",
    "deepspeed-zero2": "deepspeed-zero2",
    "deepspeed-zero3": "deepspeed-zero3",
}
"""What a checkpoint of each strategy holds: `torch` (adapter + optimizer.pt, readable by any world
size), DeepSpeed's per-stage `global_stepN/` shards, FSDP's `torch.distributed.checkpoint` shards."""

ZERO_STATE_FILE = "zero_state.pt"
"""A ZeRO checkpoint's trainable state in a rank-independent form (`ds_reshard.py`): with it, the
checkpoint resumes on any world size."""


def _fsdp2_sharded(manifest: Manifest) -> bool:
    """An FSDP2 checkpoint of `torch.distributed.checkpoint` shards (`parallel.state_dict: sharded`;
    LoRA, full or freeze): DCP reshards the DTensor model and optimizer state on load, so it resumes on
    any world size (tests/test_fsdp_checkpoints.py, tests/test_full_finetune.py). FSDP-QLoRA (packed
    4-bit shards), FSDP1 and full state dicts are not tested on another world size and stay refused."""
    parallel = manifest.recipe.get("parallel", {})
    return (
        manifest.strategy == "fsdp"
        and parallel.get("fsdp_version") == 2
        and parallel.get("state_dict") == "sharded"
    )


def check_layout(manifest: Manifest, strategy: str, world_size: int) -> None:
    """Refuse a checkpoint this run cannot read: another checkpoint format, or DeepSpeed/FSDP
    shards written by another world size (except ZeRO checkpoints with `zero_state.pt` and FSDP2 LoRA
    sharded checkpoints, which reshard). The launcher and every rank call it."""
    old_strategy, old_world = manifest.strategy, manifest.world_size
    old_format = CHECKPOINT_FORMAT.get(old_strategy, old_strategy)
    new_format = CHECKPOINT_FORMAT.get(strategy, strategy)
    if old_format != new_format:
        raise TunefleetError(
            f"the checkpoint was written by parallel.strategy={old_strategy} ({old_format} format); this run uses "
            f"{strategy} ({new_format} format), which cannot read it",
            f"resume with parallel.strategy={old_strategy}, or start a new run",
        )
    if old_format.startswith("deepspeed") and ZERO_STATE_FILE in manifest.files:
        return  # any world size: ds_reshard.py loads the rank-independent state
    if old_format == "deepspeed-zero3" and manifest.recipe.get("peft", {}).get("method") in (
        "full",
        "freeze",
    ):
        return  # any world size: ds_reshard.load_zero3_partitions re-cuts DeepSpeed's own per-rank files
    if old_format == "fsdp" and _fsdp2_sharded(manifest):
        return  # any world size: torch.distributed.checkpoint reshards DTensor shards on load (FSDP2)
    if old_format != "torch" and old_world != world_size:
        detail = (
            "DeepSpeed: \"Automatic adjustment of ZeRO's optimizer state partitioning with a new world "
            'size is not currently supported"'
            + (
                "; tunefleet re-cuts ZeRO-3 and FSDP2 checkpoints of a full or partial fine-tune, not ZeRO-2's, "
                "whose partitions cut across whole parameter groups"
                if manifest.recipe.get("peft", {}).get("method") in ("full", "freeze")
                else ""
            )
            if old_format.startswith("deepspeed")
            else "resharding is tested for FSDP2 sharded checkpoints only, not for FSDP-QLoRA, "
            "FSDP1 or full state dicts"
        )
        raise TunefleetError(
            f"the checkpoint holds {old_strategy} shards written by {old_world} process(es); this run has "
            f"{world_size} ({detail})",
            f"resume on {old_world} process(es) (--nproc/--gpus {old_world})",
        )
