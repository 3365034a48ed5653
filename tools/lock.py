"""The lock: the exact versions the whole test suite passed with (`requirements/lock.txt`).

    python tools/lock.py compile   # resolve pyproject.toml's ranges anew into requirements/lock.txt (uv)
    python tools/lock.py diff      # the installed packages whose version differs from the lock

`make setup` installs with the lock as pip constraints, so a fresh machine gets what was tested;
`make test-latest` installs the newest versions the ranges allow into `.venv-latest`, runs `diff`
and the fast suite. How to refresh the lock: docs/development.md#dependencies.

torch is not in the lock: it is installed first, by `make`'s TORCH= (the CPU wheel by default, a
CUDA build on GPU machines), and the packages only a CUDA build of torch needs (nvidia-*, triton,
cuda-*) are left out too, so the lock constrains a GPU install without fighting its torch.
Standard library only, plus `uv` for `compile` (installed into the running venv when missing).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements" / "lock.txt"
OVERRIDES = REPO / "requirements" / "overrides.txt"
"""What the resolution holds fixed: the torch `make` installs by default, and versions held back on
purpose (each with its reason in the file)."""
PYTHON = "3.11"
"""The Python the lock was tested on."""
TORCH_ONLY = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
"""Packages installed by (a CUDA build of) torch alone: not locked."""

_PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """name -> version of every `name==version` line of a requirements file."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _PIN.match(line.strip())
        if match:
            pins[normalize(match.group(1))] = match.group(2)
    return pins


def installed() -> dict[str, str]:
    """name -> version of every distribution in the running environment."""
    return {normalize(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def moved(lock: dict[str, str], have: dict[str, str]) -> list[tuple[str, str, str]]:
    """(name, locked, installed) of each locked package installed at another version."""
    return [
        (name, lock[name], have[name]) for name in sorted(lock) if name in have and have[name] != lock[name]
    ]


def _uv() -> str:
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if found:
        return found
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "uv"], check=True)
    return str(Path(sys.executable).parent / "uv")


def compile_lock() -> int:
    """Resolve pyproject.toml (with the dev extra) for Python PYTHON and torch TORCH into LOCK."""
    base = [
        _uv(), "pip", "compile", "pyproject.toml", "--extra", "dev", "--python-version", PYTHON,
        "--override", str(OVERRIDES.relative_to(REPO)), "--quiet",
    ]  # fmt: skip
    resolved = subprocess.run([*base, "--no-header"], cwd=REPO, check=True, capture_output=True, text=True)
    pins = [m.group(1) for m in map(_PIN.match, resolved.stdout.splitlines()) if m]
    skipped = sorted(normalize(name) for name in pins if TORCH_ONLY.match(name))
    args = [
        *base,
        "--custom-compile-command",
        "python tools/lock.py compile",
        "-o",
        str(LOCK.relative_to(REPO)),
    ]
    for name in skipped:
        args += ["--no-emit-package", name]
    subprocess.run(args, cwd=REPO, check=True)
    print(f"wrote {LOCK.relative_to(REPO)}: {len(read_lock())} packages (left out: {', '.join(skipped)})")
    return 0


def diff() -> int:
    """Print the packages installed here at another version than the lock's; exit 0 either way."""
    changes = moved(read_lock(), installed())
    if not changes:
        print(f"every locked package is installed at its locked version ({LOCK.relative_to(REPO)})")
        return 0
    print(f"{len(changes)} package(s) differ from {LOCK.relative_to(REPO)} (locked -> installed here):")
    width = max(len(name) for name, _, _ in changes)
    for name, locked, have in changes:
        print(f"  {name.ljust(width)}  {locked} -> {have}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["compile", "diff"])
    args = parser.parse_args(argv)
    return compile_lock() if args.command == "compile" else diff()


if __name__ == "__main__":
    sys.exit(main())
