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
