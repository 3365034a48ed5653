"""The versions tunefleet reports (`tunefleet --version`, plan.json, the run summary) and the lock
tool's comparison of installed versions against `requirements/lock.txt`."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

from tunefleet.launch.core import versions

REPO = Path(__file__).resolve().parent.parent


def test_version_flag_prints_every_library_without_importing_them() -> None:
    code = (
        "import sys\nfrom tunefleet.launch.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'accelerate', 'deepspeed') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(None, 1) for line in proc.stdout.splitlines())
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "bitsandbytes"):
        assert lines[name].strip() == metadata.version(name), (name, proc.stdout)
    assert lines["tunefleet"].strip() == metadata.version("tunefleet")
    assert lines["python"].strip() == ".".join(map(str, sys.version_info[:3]))


def test_one_line_names_a_missing_library() -> None:
    found = {**versions.versions(), "deepspeed": None}
    line = versions.one_line(found)
    assert "deepspeed not installed" in line and f"torch {metadata.version('torch')}" in line


def test_lock_diff_names_what_moved(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import lock
    finally:
        sys.path.remove(str(REPO / "tools"))
    text = (
        "Accelerate==1.15.0\n    # via trl\ntyping_extensions==4.0.0 ; python_version < '3.12'\ntrl==1.16.0\n"
    )
    (tmp_path / "lock.txt").write_text(text)
    pins = lock.read_lock(tmp_path / "lock.txt")
    assert pins == {"accelerate": "1.15.0", "typing-extensions": "4.0.0", "trl": "1.16.0"}
    have = {"accelerate": "1.16.0", "trl": "1.16.0", "numpy": "2.0"}
    assert lock.moved(pins, have) == [("accelerate", "1.15.0", "1.16.0")]
    # the shipped lock holds neither torch nor what only a CUDA build of torch needs
    shipped = lock.read_lock()
    assert shipped and not [name for name in shipped if lock.TORCH_ONLY.match(name)]
    assert {"transformers", "accelerate", "trl", "peft", "deepspeed", "bitsandbytes", "datasets"} <= set(
        shipped
    )
