"""User-facing errors: one readable message naming the problem and the fix, never a traceback."""

from __future__ import annotations

import errno
import os
import shutil


class TunefleetError(Exception):
    """An error caused by the user's input (recipe, data, command line, environment).

    The CLI prints ``str(error)`` and exits with `exit_code` (2: refused); no traceback is shown.
    """

    exit_code = 2
    """`layout.EXIT_REFUSED`: a check refused the run."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")

    def __reduce__(self) -> tuple:
        # pickled whole (problem and fix apart) when a worker process raises it to its parent
        return (type(self), (self.problem, self.fix))


class RecipeError(TunefleetError):
    """The recipe (YAML or --set overrides) is invalid."""


class DataError(TunefleetError):
    """The training data is missing, unreadable or malformed."""


class RunDirError(TunefleetError):
    """The output directory holds something the run must not touch or cannot continue."""


class DivergedError(TunefleetError):
    """The run's loss or gradient norm stopped being finite: it stopped there, saved nothing after."""

    exit_code = 3
    """`layout.EXIT_DIVERGED`."""


class MachineError(TunefleetError):
    """The machine refused a write or a read: disk full, read-only filesystem, no permission, a
    path that is not there. Named with the path and the fix (`from_os_error`)."""


_FIXES = {
    "ENOSPC": "free space on that filesystem (`df -h {where}`) or point output_dir/--out at a larger one, "
    "then run the same command again: earlier checkpoints are intact and a partial write is removed first",
    "EDQUOT": "your disk quota there is used up (`quota -s`): free some of it, then run the same command again",
    "EROFS": "{where} is on a read-only filesystem: choose a writable place (output_dir, --out, TUNEFLEET_CACHE)",
    "EACCES": "you may not write {where}: change its permissions or choose a place you own",
    "EPERM": "you may not write {where}: change its permissions or choose a place you own",
    "ENOENT": "{where} is not there (a dangling link, or a directory removed meanwhile): create it or choose another",
    "ENOTDIR": "a part of {where} is a file, not a directory: choose another path",
    "EBUSY": "{where} is in use (a mount point or a file another process holds): choose a directory below it",
    "EXDEV": "{where} is on another filesystem than its new place: choose a directory below it",
    "EIO": "the storage reported an I/O error at {where}: check the disk or the network filesystem",
}


def from_os_error(exc: OSError, doing: str | None = None) -> MachineError:
    """An OSError as one sentence: what failed (`doing`), where, the system's reason, and the fix."""
    name = errno.errorcode.get(exc.errno or 0, "")
    where = str(exc.filename) if exc.filename is not None else "the path"
    reason = exc.strerror or str(exc) or type(exc).__name__
    what = f"{doing}: " if doing else ""
    fix = _FIXES.get(name, "check the path and the machine, then run the same command again")
    return MachineError(f"{what}{reason} ({name or 'OSError'}) at {where}", fix.format(where=where))


WRITE_FAILED = ("file write failed", "unexpected pos", "No space left", "Disk quota", "Read-only file system")
"""How torch's and safetensors' writers word a write the OS refused (a RuntimeError, not an OSError)."""

NEARLY_FULL_BYTES = 64 << 20
"""A failed write with less than this left on its filesystem is taken for a full disk."""


def named_write_failure(exc: BaseException, directory: str | os.PathLike, doing: str) -> MachineError | None:
    """A write into `directory` the machine refused, as one named error (None: another failure).
    OSErrors by their errno; torch's and safetensors' RuntimeErrors by their wording, a full disk
    told apart by the space left."""
    if isinstance(exc, OSError):
        return from_os_error(exc, doing)
    if not isinstance(exc, RuntimeError) or not any(words in str(exc) for words in WRITE_FAILED):
        return None
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = -1
    if 0 <= free < NEARLY_FULL_BYTES:
        full = OSError(errno.ENOSPC, f"No space left on device ({free / 2**20:.1f} MiB free)", str(directory))
        return from_os_error(full, doing)
    return MachineError(
        f"{doing}: the write failed ({str(exc).splitlines()[0][:200]})",
        f"check the filesystem of {directory} (space, quota, permissions), then run the same command again",
    )
