"""Faults of a run, named and stopped, with nothing of the user's lost (issue 22): a run that
diverges stops at that step with exit 3, writes nothing after it and no final/; a few non-finite
steps can be skipped on request. Real in-process runs of the demo (the CLI's `tunefleet train`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.launched import DEMO
from tunefleet.launch import cli
from tunefleet.launch.core import checkpoints as ckpt
from tunefleet.launch.core.layout import EXIT_DIVERGED

pytestmark = pytest.mark.slow

SHORT = [
    "data.limit=64",
    "train.max_steps=8",
    "train.save_steps=1",
    "train.logging_steps=1",
    "train.warmup_ratio=0",
]


def train(out: Path, *sets: str) -> int:
    argv = ["train", str(DEMO), "--set", f"output_dir={out}"]
    for item in [*SHORT, *sets]:
        argv += ["--set", item]
    return cli.main(argv)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_a_diverging_run_stops_at_that_step(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """train.lr=3e3 (a typo for 3e-3): the gradient norm turns NaN at step 3; the run stops there
    with exit 3 and says where and why, the NaN is logged as NaN (not 0.0), no checkpoint after the
    last finite step, no final/."""
    out = tmp_path / "run"
    assert train(out, "train.lr=3e3") == EXIT_DIVERGED
    err = capsys.readouterr().err
    logged = rows(out)
    last = logged[-1]
    assert not math.isfinite(last["grad_norm"]) or not math.isfinite(last["loss"])
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in logged[:-1])
    step = last["step"]
    assert f"the run diverged at step {step}" in err and "fix: lower train.lr (now 3000" in err
    assert [ckpt.step_of(p) for p in ckpt.complete_checkpoints(out)] == list(range(1, step))
    assert f"the last checkpoint, checkpoint-{step - 1}, is from before it" in err
    assert not (out / "final").exists()


def test_non_finite_steps_within_the_allowance_are_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """train.max_nonfinite_steps=2: the first two non-finite steps move no weight (the model stays as
    it was), the third stops the run."""
    out = tmp_path / "run"
    assert train(out, "train.lr=3e3", "train.max_nonfinite_steps=2") == EXIT_DIVERGED
    captured = capsys.readouterr()
    assert captured.out.count("its update is skipped") == 2
    assert "after 2 skipped step(s) (train.max_nonfinite_steps)" in captured.err
    bad = [r for r in rows(out) if not (math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]))]
    assert len(bad) == 3 and not (out / "final").exists()


def test_a_second_writer_is_refused_while_a_run_holds_the_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`tunefleet train` runs (a subprocess, long); a second `train` and a `prepare` with other data
    settings on the same output_dir are refused at once, told who holds it; nothing of the run is
    touched. The run, killed with SIGKILL, leaves its lock: the rerun takes it over and says so."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = ["train", str(DEMO), "--set", f"output_dir={out}"]
    for item in ["data.limit=64", "train.max_steps=400", "train.save_steps=1", "checkpoint.keep_last=1"]:
        args += ["--set", item]
    argv = [sys.executable, "-m", "tunefleet.launch.cli", *args]
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while ckpt.latest(out) is None:
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        capsys.readouterr()
        assert cli.main(args) == 2  # the same command again: it would resume the same run
        err = capsys.readouterr().err
        assert f"output_dir {str(out)!r} is in use by tunefleet train" in err and f"pid {proc.pid}" in err
        prepare = ["prepare", str(DEMO), "--set", f"output_dir={out}", "--set", "data.max_length=64"]
        assert cli.main(prepare) == 2 and "is in use by tunefleet train" in capsys.readouterr().err
        assert proc.poll() is None  # the run goes on
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert (out / ".tunefleet-lock").exists()  # SIGKILL: the holder could not remove it
    assert cli.main(["prepare", *args[1:]]) == 0  # the run's own recipe: it takes the lock over
    captured = capsys.readouterr()
    assert "took over the lock of tunefleet train" in captured.out and "no longer exists" in captured.out
    assert not (out / ".tunefleet-lock").exists() and ckpt.latest(out) is not None
