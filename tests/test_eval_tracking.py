"""Evaluation during training (eval loss, final evaluation, samples.jsonl) and experiment tracking
(tensorboard for real; wandb offline when the package is installed), one tracked run across a resume."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from tests.test_train import metrics, quick
from tunefleet.distributed import sft, tracking
from tunefleet.launch.core import rundir
from tunefleet.launch.core.errors import TunefleetError
from tunefleet.launch.core.layout import SAMPLES_FILE
from tunefleet.launch.preflight import check_trackers

EVAL = ["data.eval_ratio=0.05"]  # the first 6 of the 136 demo rows


def _interrupt(out: Path) -> None:
    """Make a finished 4-step run with checkpoints at 2 and 4 look stopped after step 2."""
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoint-4")


def _scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


# ----------------------------------------------------------------------------- without training


def test_run_id_is_stable_until_the_run_is_moved_aside(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    first = tracking.run_id(out)
    assert tracking.run_id(out) == first and len(first) == 16
    assert json.loads((out / tracking.TRACKING_FILE).read_text())["run_id"] == first
    rundir.move_aside(out)  # what --overwrite does
    out.mkdir()
    assert tracking.run_id(out) != first


def test_missing_tracker_package_is_one_clear_error(tmp_path: Path) -> None:
    missing = [n for n in ("wandb", "mlflow") if importlib.util.find_spec(n) is None]
    if not missing:
        pytest.skip("wandb and mlflow are both installed")
    with pytest.raises(TunefleetError, match=f"pip install {missing[0]}"):
        check_trackers(["tensorboard", missing[0]])
    check_trackers(["tensorboard"])


# ----------------------------------------------------------------------------- evaluation


@pytest.mark.slow
def test_eval_loss_at_intervals_and_samples(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert sft.run(quick(out, *EVAL, "train.eval_steps=2")) == 0
    rows = metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(0 < r["eval_loss"] < 20 for r in evals)
    assert (out / "loss.png").stat().st_size > 1000
    samples = [json.loads(line) for line in (out / SAMPLES_FILE).read_text().splitlines()]
    demo = [json.loads(line) for line in (Path(quick(out).data.path)).read_text().splitlines()[:4]]
    assert len(samples) == 4 and all(s["split"] == "eval" for s in samples)
    assert [s["reference"] for s in samples] == [r["output"] for r in demo]
    assert [s["prompt"].split("\n\n")[0] for s in samples] == [r["instruction"] for r in demo]
    assert all(isinstance(s["generated"], str) and isinstance(s["stopped"], bool) for s in samples)
    assert all(isinstance(s["base"], str) for s in samples)  # the same prompt, adapter off


@pytest.mark.slow
def test_final_evaluation_without_periodic_evaluation(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert sft.run(quick(out, *EVAL)) == 0  # train.eval_steps=0
    assert [r["step"] for r in metrics(out) if "eval_loss" in r] == [4]


@pytest.mark.slow
def test_no_eval_split_no_eval_rows_samples_from_training_rows(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert sft.run(quick(out)) == 0
    assert not [r for r in metrics(out) if "eval_loss" in r]
    samples = [json.loads(line) for line in (out / SAMPLES_FILE).read_text().splitlines()]
    assert len(samples) == 4 and all(s["split"] == "train" for s in samples)


# ----------------------------------------------------------------------------- tracking


@pytest.mark.slow
def test_tensorboard_one_logdir_across_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = quick(out, *EVAL, "train.save_steps=2", "train.eval_steps=2", "train.report_to=[tensorboard]")
    assert sft.run(recipe) == 0
    logdir = out / tracking.TENSORBOARD_DIR
    first = _scalars(logdir, "train/loss")
    assert [s for s, _ in first] == [1, 2, 3, 4]
    assert [s for s, _ in _scalars(logdir, "eval/loss")] == [2, 4]
    want = {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}
    assert all(abs(v - want[s]) < 1e-5 for s, v in first)

    _interrupt(out)
    assert sft.run(recipe) == 0  # resumes from checkpoint-2
    assert [p.name for p in out.iterdir() if p.name.startswith("runs")] == []  # no timestamped dirs
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 2  # the same logdir, a second file
    resumed = _scalars(logdir, "train/loss")
    assert [s for s, _ in resumed] == [1, 2, 3, 4]  # steps 3-4 of the first attempt are superseded
    assert resumed[:2] == first[:2]
    assert [s for s, _ in _scalars(logdir, "eval/loss")] == [2, 4]
    want = {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}
    assert all(abs(v - want[s]) < 1e-5 for s, v in resumed)


@pytest.mark.slow
def test_wandb_offline_one_run_across_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("wandb") is None:
        pytest.skip("wandb is not installed (pip install wandb to run this test offline)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_RUN_ID", "WANDB_RESUME", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    import wandb

    out = tmp_path / "run"
    recipe = quick(out, *EVAL, "train.save_steps=2", "train.report_to=[wandb]")
    assert sft.run(recipe) == 0
    assert wandb.run is None  # finished at the end of training
    run_id = tracking.read_state(out)["run_id"]
    _interrupt(out)
    assert sft.run(recipe) == 0
    assert tracking.read_state(out)["run_id"] == run_id
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(p.name.endswith(f"-{run_id}") for p in runs), runs
    assert all((p / f"run-{run_id}.wandb").is_file() for p in runs)
