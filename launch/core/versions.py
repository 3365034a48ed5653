"""The versions tunefleet runs on, so that a run, a plan and a bug report say which.

Read from the installed distributions' metadata (`importlib.metadata`): nothing is imported, so
the launcher stays light. Recorded in plan.json (`versions`), shown in the run summary, printed
by `tunefleet --version`. Pure standard library.
"""

from __future__ import annotations

import platform
from importlib import metadata

LIBRARIES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "deepspeed",
    "bitsandbytes",
    "datasets",
    "tokenizers",
)
"""The libraries a run's behaviour depends on, in the order they are reported."""


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """tunefleet, Python and each of LIBRARIES -> its installed version (None: not installed)."""
    return {
        "tunefleet": _version("tunefleet"),
        "python": platform.python_version(),
        **{name: _version(name) for name in LIBRARIES},
    }


def one_line(found: dict[str, str | None] | None = None) -> str:
    """`torch 2.13.0+cpu, transformers 5.23.0, ...` (a library that is missing says so)."""
    found = versions() if found is None else found
    return ", ".join(f"{name} {found[name] or 'not installed'}" for name in ("python", *LIBRARIES))


def report() -> str:
    """What `tunefleet --version` prints: one line per package."""
    found = versions()
    width = max(len(name) for name in found)
    return "\n".join(f"{name.ljust(width)}  {value or 'not installed'}" for name, value in found.items())
