"""One writer per output directory: the lock every command that writes a run takes.

`tunefleet train`, `tunefleet launch` (node 0's launcher, for the whole launch: its ranks and the
other nodes' launchers write under it), `tunefleet prepare`, a SLURM job's rank 0 and
`tunefleet merge --out` inside a run directory hold `<output_dir>/.tunefleet-lock` while they run.
A second writer is refused at once, told who holds it (host, pid, command, since when). Readers
(`status`, `generate`, `plan`) never take it.

The file is created atomically (`O_CREAT | O_EXCL`) and removed when its holder leaves, on any exit
the holder sees. A lock whose holder died without removing it (SIGKILL, a lost node) is taken over,
saying so: on the same host when its process no longer exists; from another host when the holder
stopped refreshing it (`HEARTBEAT_S`: a thread touches the file; `STALE_S` without a touch is
dead); in a SLURM job, when the same job id holds it from an earlier restart. The processes a
holder starts (`tunefleet launch`'s ranks) find its token in `TUNEFLEET_LOCK` and write under it.
Pure standard library.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunefleet.launch.core.errors import RunDirError

LOCK_FILE = ".tunefleet-lock"
ENV_LOCK = "TUNEFLEET_LOCK"
"""The token of the lock a parent process holds for the processes it starts."""
HEARTBEAT_S = 30.0
STALE_S = 300.0
"""A lock held from another host whose file was not touched for this long is its dead holder's."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # a torn lock file: its writer died while writing it


def _why_stale(holder: dict[str, Any], path: Path) -> str | None:
    """Why the holder of a lock is gone (None: it may be alive)."""
    if not holder:
        return "the lock file is unreadable (its writer died while writing it)"
    job = os.environ.get("SLURM_JOB_ID")
    if (
        job
        and holder.get("slurm_job") == job
        and holder.get("slurm_restart") != os.environ.get("SLURM_RESTART_COUNT", "0")
    ):
        return f"it is SLURM job {job}'s earlier attempt (restart {holder.get('slurm_restart')})"
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid", 0))
        return None if pid and _alive(pid) else f"its process {pid} on this host no longer exists"
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return "the lock file is gone"
    return f"it has not been refreshed for {age:.0f} s (> {STALE_S:.0f} s)" if age > STALE_S else None


def describe(holder: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("since", 0))))
    return f"{holder.get('command', '?')} (host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {since})"


class OutputLock:
    """The lock of one output directory, held from `acquire` to `release` (a context manager)."""

    def __init__(self, out: str | os.PathLike, command: str) -> None:
        self.out = Path(out)
        self.path = self.out / LOCK_FILE
        self.command = command
        self.token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        self.note: str | None = None
        """What was taken over, when a dead holder's lock was."""
        self.created_dir = False
        """The output directory did not exist before the lock: an empty one is removed on release."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _content(self) -> str:
        return json.dumps(
            {
                "token": self.token,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "command": self.command,
                "since": time.time(),
                "slurm_job": os.environ.get("SLURM_JOB_ID"),
                "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
            }
        )

    def acquire(self) -> OutputLock:
        """Take the lock, or refuse with who holds it (a dead holder's lock is taken over)."""
        self.created_dir = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                if holder is None:
                    continue  # released meanwhile
                inherited = os.environ.get(ENV_LOCK)
                if inherited and holder.get("token") == inherited:
                    self.token = inherited  # our launcher holds it for us
                    return self
                why = _why_stale(holder, self.path)
                if why is None:
                    raise RunDirError(
                        f"output_dir {str(self.out)!r} is in use by {describe(holder)}: one run writes a "
                        "directory at a time",
                        "wait for it to finish (`tunefleet status` shows it), or use another output_dir; if it "
                        f"is certainly dead, remove {self.path}",
                    ) from None
                self.note = f"took over the lock of {describe(holder)}: {why}"
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self._content())
            self._heartbeat()
            return self
        raise RunDirError(
            f"output_dir {str(self.out)!r}: the lock {self.path} kept changing hands", "try again"
        )

    def _heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                with contextlib.suppress(OSError):
                    os.utime(self.path)

        self._thread = threading.Thread(target=beat, name="tunefleet-lock", daemon=True)
        self._thread.start()

    def follow(self, moved: Path) -> None:
        """The output directory was moved aside (`--overwrite`) with this lock's file in it: take the
        file out of the old run and hold the lock in the new directory."""
        if self._thread is None:
            return  # a parent's lock: it follows its own
        with contextlib.suppress(FileNotFoundError):
            (Path(moved) / LOCK_FILE).unlink()
        self.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(self._content())

    def held_by_us(self) -> bool:
        holder = _read(self.path)
        return holder is not None and holder.get("token") == self.token

    def release(self) -> None:
        """Remove the lock if it is still ours (a parent's lock is left to the parent)."""
        self._stop.set()
        if self._thread is None:
            return  # inherited from the process that started us
        if self.held_by_us():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        if self.created_dir:  # a run refused before it wrote anything leaves no empty directory behind
            with contextlib.suppress(OSError):
                self.out.rmdir()

    def env(self) -> dict[str, str]:
        """The variable that lets the processes this holder starts write under its lock."""
        return {ENV_LOCK: self.token}

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextlib.contextmanager
def holding(out: str | os.PathLike, command: str) -> Iterator[OutputLock]:
    """`with holding(out, "tunefleet train ..."):` the lock for the block."""
    lock = OutputLock(out, command)
    with lock:
        if lock.note:
            print(f"note: {lock.note}", flush=True)
        yield lock
