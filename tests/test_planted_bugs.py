"""The planted-bug list (tools/planted_bugs.py) follows the code: each bug's pattern is found once
where it is planted, so the list can be run again after any change (docs/development.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "tools" / "planted_bugs.py"


def test_every_planted_bug_still_has_its_place_in_the_code() -> None:
    proc = subprocess.run([sys.executable, str(TOOL), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_list_covers_at_least_twelve_behaviours() -> None:
    sys.path.insert(0, str(TOOL.parent))
    try:
        import planted_bugs
    finally:
        sys.path.pop(0)
    files = {rel for _, rel, *_ in planted_bugs.BUGS}
    assert len(planted_bugs.BUGS) >= 12 and len(files) >= 8
