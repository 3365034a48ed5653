"""Faults of a run, named and stopped, with nothing of the user's lost (issue 22): a run that
diverges stops at that step with exit 3, writes nothing after it and no final/; a few non-finite
steps can be skipped on request. Real in-process runs of the demo (the CLI's `tunefleet train`)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
from collections.abc import Iterator
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


# ----------------------------------------------------------------------------- the machine says no


@contextlib.contextmanager
def tmpfs(where: Path, size: str, *options: str) -> Iterator[Path]:
    """A small filesystem of its own at `where` (root only: CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_during_a_checkpoint_is_named_and_the_rerun_after_the_fix_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """output_dir on a 9 MiB filesystem: two checkpoints (3.8 MB each) fit, the third does not. The
    run stops with one sentence (which checkpoint, where, no space, the fix), exit 2; the two
    checkpoints before it are intact and its partial write is gone. With room made, the same
    command resumes from checkpoint-2 and finishes, every step logged once."""
    with tmpfs(tmp_path / "small", "9m") as disk:
        out = disk / "run"
        assert train(out) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: writing checkpoint-3 into ") and "No space left on device" in err, err
        assert "fix: free space on that filesystem" in err and "Traceback" not in err
        assert [p.name for p in ckpt.complete_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
        assert ckpt.scan(out).usable == out / "checkpoint-2" and not list(out.glob(".tmp-checkpoint-*"))
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        assert train(out, "checkpoint.keep_last=2") == 0
        assert "resuming from " in capsys.readouterr().out
        assert [r["step"] for r in rows(out) if "loss" in r] == list(range(1, 9))
        assert (out / "final" / "adapter_model.safetensors").is_file()


def test_a_read_only_filesystem_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`tunefleet prepare` into a run on a read-only filesystem: one sentence, the path, the fix."""
    with tmpfs(tmp_path / "ro", "1m", "ro") as disk:
        argv = ["prepare", str(DEMO), "--set", f"output_dir={disk / 'run'}"]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Read-only file system (EROFS) at" in err, err
        assert "is on a read-only filesystem: choose a writable place" in err and "Traceback" not in err


def test_overwrite_of_a_mount_point_is_refused_before_anything_moves(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with tmpfs(tmp_path / "mnt", "8m") as disk:
        (disk / "notes.txt").write_text("the user's")
        (disk / "recipe.yaml").write_text("# resolved recipe, written by tunefleet\n")
        argv = ["train", str(DEMO), "--set", f"output_dir={disk}", "--overwrite"]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "is a mount point, which cannot be renamed" in err and f"e.g. {disk / 'run'}" in err, err
        assert sorted(p.name for p in disk.iterdir()) == ["notes.txt", "recipe.yaml"]


def test_an_unwritable_model_cache_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    """TUNEFLEET_CACHE pointing where nothing can be written: named, with the variable to set."""
    from tunefleet.distributed import demo_model

    monkeypatch.setattr(demo_model, "build_hash", lambda: "not-built-yet")
    monkeypatch.setenv("TUNEFLEET_CACHE", "/proc/nowhere")
    assert train(tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: the demo model is built into /proc/nowhere (TUNEFLEET_CACHE")
        and "Traceback" not in err
    )
    assert "fix: set TUNEFLEET_CACHE to a directory you can write" in err


def test_a_run_killed_as_final_appears_has_its_plot_and_samples(tmp_path: Path) -> None:
    """final/ is the run's last write: SIGKILL the moment it appears, and the loss plot and the
    samples are there already (a run killed before it reruns its last steps and makes them)."""
    import signal
    import sys
    import time

    out = tmp_path / "run"
    argv = [sys.executable, "-m", "tunefleet.launch.cli", "train", str(DEMO), "--set", f"output_dir={out}"]
    for item in SHORT:
        argv += ["--set", item]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "final").exists():
        assert proc.poll() is None, "the run ended before final/ was seen"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert (out / "samples.jsonl").stat().st_size > 0 and (out / "loss.png").stat().st_size > 0
    assert (out / "final" / "adapter_model.safetensors").is_file()
