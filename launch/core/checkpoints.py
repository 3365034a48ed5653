"""Atomic checkpoints: a step counts only when its completion marker exists.

A checkpoint is written into `<output_dir>/.tmp-checkpoint-<step>`: every rank writes and
fsyncs its part, then (after a barrier) rank 0 writes `manifest.json` (files and sizes, step,
samples and tokens seen, recipe hash, world size, strategy, batch plan, save time) and the
`COMPLETE` marker last, fsyncs, and renames the directory to `checkpoint-<step>`. A directory
without the marker, or whose files do not match its manifest, is never resumed from; leftovers
are removed at the next start. Retention deletes old checkpoints only after a new one is
complete and never the newest complete one.

The output directory is assumed to be on storage shared by all nodes (checked at start-up).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from tunefleet.launch.core.errors import TunefleetError

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"


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


def damaged_file(path: Path) -> str | None:
    """The first file of a complete checkpoint whose content no longer matches the checksum in its
    manifest (a file rewritten or corrupted at the same size), or None. Manifests written before
    checksums were recorded have none to compare."""
    for rel, digest in read_manifest(path).get("checksums", {}).items():
        if checksum(path / rel) != digest:
            return rel
    return None


def finalize(tmp: Path, final: Path, manifest: dict[str, Any]) -> None:
    """Rank 0, after every rank flushed its part: manifest (sizes and checksums), marker, rename."""
    files = file_list(tmp)
    manifest = {**manifest, "files": files, "checksums": {rel: checksum(tmp / rel) for rel in files}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    _fsync_file(tmp / MANIFEST)
    (tmp / COMPLETE).write_text("ok\n", encoding="utf-8")
    _fsync_file(tmp / COMPLETE)
    _fsync_dir(tmp)
    if final.exists():  # an incomplete leftover with the same step (a complete one is never rewritten)
        if is_complete(final):
            shutil.rmtree(tmp)
            return
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_dir(final.parent)


def read_manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / MANIFEST).read_text(encoding="utf-8"))


def is_complete(path: Path) -> bool:
    """The marker exists and every file listed in the manifest is there with its size."""
    if not (path / COMPLETE).is_file() or not (path / MANIFEST).is_file():
        return False
    try:
        manifest = read_manifest(path)
        return all(
            (path / rel).is_file() and (path / rel).stat().st_size == size
            for rel, size in manifest["files"].items()
        )
    except (OSError, ValueError, KeyError):
        return False


def complete_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in `out`, oldest first."""
    if not out.is_dir():
        return []
    found = [
        p
        for p in out.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit() and is_complete(p)
    ]
    return sorted(found, key=step_of)


def latest(out: Path) -> Path | None:
    found = complete_checkpoints(out)
    return found[-1] if found else None


def cleanup_incomplete(out: Path) -> list[Path]:
    """Remove temporary and incomplete checkpoint directories (rank 0, before training starts)."""
    removed: list[Path] = []
    if not out.is_dir():
        return removed
    for p in out.iterdir():
        if not p.is_dir():
            continue
        if p.name.startswith(TMP_PREFIX) or (p.name.startswith(PREFIX) and not is_complete(p)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def apply_retention(out: Path, keep_last: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `keep_last` (never the newest)."""
    if keep_last is None:
        return []
    found = complete_checkpoints(out)
    doomed = found[: max(0, len(found) - max(keep_last, 1))]
    for p in doomed:
        # make it incomplete first: a crash in the middle of rmtree leaves no half checkpoint
        (p / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(p, ignore_errors=True)
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


def _fsdp2_sharded(manifest: dict[str, Any]) -> bool:
    """An FSDP2 LoRA checkpoint of `torch.distributed.checkpoint` shards (`parallel.state_dict: sharded`):
    DCP reshards the DTensor model and optimizer state on load, so it resumes on any world size
    (tests/test_fsdp_checkpoints.py). FSDP-QLoRA (packed 4-bit shards), FSDP1 and full state dicts
    are not tested on another world size and stay refused."""
    parallel = manifest.get("recipe", {}).get("parallel", {})
    return (
        manifest.get("strategy") == "fsdp"
        and parallel.get("fsdp_version") == 2
        and parallel.get("state_dict") == "sharded"
    )


def check_layout(manifest: dict[str, Any], strategy: str, world_size: int) -> None:
    """Refuse a checkpoint this run cannot read: another checkpoint format, or DeepSpeed/FSDP
    shards written by another world size (except ZeRO checkpoints with `zero_state.pt` and FSDP2 LoRA
    sharded checkpoints, which reshard). The launcher and every rank call it."""
    old_strategy, old_world = manifest.get("strategy", "single"), int(manifest.get("world_size", 1))
    old_format = CHECKPOINT_FORMAT.get(old_strategy, old_strategy)
    new_format = CHECKPOINT_FORMAT.get(strategy, strategy)
    if old_format != new_format:
        raise TunefleetError(
            f"the checkpoint was written by parallel.strategy={old_strategy} ({old_format} format); this run uses "
            f"{strategy} ({new_format} format), which cannot read it",
            f"resume with parallel.strategy={old_strategy}, or start a new run",
        )
    if old_format.startswith("deepspeed") and ZERO_STATE_FILE in manifest.get("files", {}):
        return  # any world size: ds_reshard.py loads the rank-independent state
    if old_format == "fsdp" and _fsdp2_sharded(manifest):
        return  # any world size: torch.distributed.checkpoint reshards DTensor shards on load (FSDP2)
    if old_format != "torch" and old_world != world_size:
        detail = (
            "DeepSpeed: \"Automatic adjustment of ZeRO's optimizer state partitioning with a new world "
            'size is not currently supported"'
            if old_format.startswith("deepspeed")
            else "resharding is tested for FSDP2 LoRA sharded checkpoints only, not for FSDP-QLoRA, "
            "FSDP1 or full state dicts"
        )
        raise TunefleetError(
            f"the checkpoint holds {old_strategy} shards written by {old_world} process(es); this run has "
            f"{world_size} ({detail})",
            f"resume on {old_world} process(es) (--nproc/--gpus {old_world})",
        )
