"""DeepSpeed ZeRO-2/3 LoRA checkpoints resumed on another world size (distributed/ds_reshard.py).

Each case trains 4 steps with `tunefleet launch --nproc FIRST` (checkpoints at steps 2 and 4),
then continues checkpoint-2 with `--nproc SECOND` in a new output_dir: the accumulation changes
(global batch 8 = micro 2 x accumulation 2 x 2 processes = micro 2 x 4 x 1), the global batch does
not. Steps 3-4 must equal one uninterrupted process with the same global batch (<= TOL). DeepSpeed
alone refuses this ("Automatic adjustment of ZeRO's optimizer state partitioning with a new world
size is not currently supported"); a ZeRO checkpoint without `zero_state.pt` still is refused.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.launched import TOL, Launched, env, launch_argv, losses
from tunefleet.launch.core import checkpoints as ckpt
from tunefleet.launch.core.errors import TunefleetError

CASES = {  # name: (strategy, first world size, second world size)
    "zero2-2to1": ("deepspeed-zero2", 2, 1),
    "zero3-2to1": ("deepspeed-zero3", 2, 1),
    "zero2-1to2": ("deepspeed-zero2", 1, 2),
    "zero3-1to2": ("deepspeed-zero3", 1, 2),
}
SHARED = {"deepspeed-zero2": "zero2", "deepspeed-zero3": "zero3"}
"""The 2-process runs are the session's shared ones (tests/launched.py: the same BASE + strategy)."""


def test_layout_accepts_zero_checkpoints_with_the_rank_independent_state() -> None:
    from dataclasses import replace

    from tests.fake_checkpoints import manifest

    old = manifest(2, strategy="deepspeed-zero3", world_size=2, files={"global_step2/x.pt": 1})
    with pytest.raises(TunefleetError, match="written by 2 process"):
        ckpt.check_layout(old, "deepspeed-zero3", 1)
    new = replace(old, files={**old.files, ckpt.ZERO_STATE_FILE: 1})
    ckpt.check_layout(new, "deepspeed-zero3", 1)
    ckpt.check_layout(new, "deepspeed-zero3", 4)
    with pytest.raises(TunefleetError, match="cannot read it"):
        ckpt.check_layout(new, "deepspeed-zero2", 2)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ds-reshard")


_runs: dict[str, Path] = {}


def launch(out: Path, nproc: int, strategy: str, *extra: str) -> str:
    log = out.parent / f"{out.name}.log"
    started = time.monotonic()
    with log.open("w") as f:
        proc = subprocess.run(
            launch_argv(out, nproc, f"parallel.strategy={strategy}", extra=extra),
            env=env(),
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    text = log.read_text()
    assert proc.returncode == 0, text[-6000:]
    print(f"{out.name}: {time.monotonic() - started:.1f} s", flush=True)
    return text


def first_run(launched: Launched, workdir: Path, strategy: str, nproc: int) -> Path:
    if nproc == 2:
        return launched.get(SHARED[strategy])
    key = f"{strategy}-{nproc}"
    if key not in _runs:
        out = workdir / key
        launch(out, nproc, strategy)
        _runs[key] = out
    return _runs[key]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_zero_resumes_on_another_world_size(launched: Launched, workdir: Path, name: str) -> None:
    strategy, first, second = CASES[name]
    source = first_run(launched, workdir, strategy, first)
    checkpoint = source / "checkpoint-2"
    manifest = ckpt.read_manifest(checkpoint)
    assert manifest.world_size == first and ckpt.ZERO_STATE_FILE in manifest.files
    out = workdir / name
    text = launch(out, second, strategy, "--resume", str(checkpoint))
    assert f"written by {first} process(es), now {second}" in text
    got, want = losses(out), losses(launched.get("lora-8"))
    assert sorted(got) == [3, 4]
    worst = max(abs(got[s] - want[s]) for s in got)
    print(f"{name}: max |loss - 1 process| = {worst:.2e}", flush=True)
    assert worst <= TOL
    # the resumed run's own checkpoints carry the state again, for the next change
    assert ckpt.ZERO_STATE_FILE in ckpt.read_manifest(out / "checkpoint-4").files
