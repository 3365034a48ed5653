"""tools/gpu_smoke.sh on a machine without a GPU: its syntax, its runs (the same as tests/test_gpu.py),
and its bookkeeping (a failing run is reported and the next one runs; the summary reads plan.json).

The GPU itself cannot be here: `python` is replaced by a stand-in that answers like a finished or a
failed run (it writes a plan.json), and `nvidia-smi` by one that fails as it would on this machine.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

from tests.test_gpu import SMOKE_COMMON, SMOKE_RUNS

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tools" / "gpu_smoke.sh"

STUB_PYTHON = r"""#!/bin/bash
# stand-in for the python the smoke script runs
if [[ "$1" == "-c" ]]; then echo "torch stub"; exit 0; fi
if [[ "$1" == "-" ]]; then exec python3 "$@"; fi
if [[ "$2" == "pytest" ]]; then echo "7 skipped (stub)"; exit 0; fi
args="$*"
echo "$args" >> "$STUB_LOG"
out="$(printf '%s\n' "$@" | sed -n 's/^output_dir=//p')"
mkdir -p "$out"
if [[ "$args" == *"peft.method=dora"* ]]; then echo "Traceback: stub failure" >&2; exit 1; fi
echo '{"in_effect": {"sharding": {"kind": "fsdp2", "params": 63, "sharded_params": 63},
  "gpu_peak_gib": 1.5, "gpu_peak_after_load_gib": 0.5, "trainable_dtypes": ["float32"]}}' > "$out/plan.json"
"""


def _script_runs() -> dict[str, list[str]]:
    runs = {}
    for line in SCRIPT.read_text().splitlines():
        if line.startswith("run_case "):
            _, name, *values = shlex.split(line)
            runs[name] = values
    return runs


def test_script_is_valid_bash_and_guarded() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    assert "set -u" in text and "set -e" not in text  # continues after a failing run
    assert re.search(r'timeout --kill-after=30 "\$RUN_TIMEOUT_S"', text)
    assert os.access(SCRIPT, os.X_OK)


def test_script_runs_what_the_gpu_tests_check() -> None:
    assert _script_runs() == {name: overrides for name, (overrides, _) in SMOKE_RUNS.items()}
    common = re.search(r"COMMON=\((.*?)\)", SCRIPT.read_text(), re.S)
    assert common is not None and shlex.split(common.group(1)) == SMOKE_COMMON


def test_a_failing_run_is_reported_and_the_rest_run(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/bash\nexit 9\n")
    smi.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "PYTHON": str(stub),
        "SMOKE_DIR": str(tmp_path / "smoke"),
        "STUB_LOG": str(tmp_path / "calls.log"),
        "RUN_TIMEOUT_S": "60",
    }
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # one failed step: fsdp-qdora
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert len(calls) == len(SMOKE_RUNS) and all("launch recipes/demo.yaml --gpus 1" in c for c in calls)
    summary = proc.stdout.split("=== summary (1 failed)")[1]
    assert "pytest -m gpu    exit 0" in summary
    assert re.search(r"fsdp-qdora\s+exit\s+1\s+sharding \?", summary)
    assert re.search(r"fsdp-qlora\s+exit\s+0\s+sharding fsdp2 \(63/63 params sharded\)", summary)
    assert "peak GPU after load   0.50 GiB, at the end   1.50 GiB" in summary
    assert "Traceback: stub failure" in proc.stdout and "nvidia-smi failed" in proc.stdout
