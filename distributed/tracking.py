"""Experiment tracking through the trainer's own integrations, one tracked run per output_dir.

`train.report_to` lists the trackers (tensorboard, wandb, mlflow). The trainer's standard
callbacks do the logging; tunefleet replaces them with thin subclasses that keep a job that is
stopped and requeued (resumed from a checkpoint) in the same tracked run instead of a new one:

* tensorboard: events go to `<output_dir>/tensorboard/` (not a new timestamped directory per
  start); a resumed run adds an event file there that supersedes the earlier attempt's events
  after the checkpoint step (`purge_step`), so TensorBoard shows one run with each step once;
* wandb: the run id is stored in `<output_dir>/tracking.json` at the first start and passed with
  `resume="allow"` on every start; local files go to `<output_dir>/wandb/`; the run is finished at
  the end of training (the stock callback never finishes it);
* mlflow: the run id is stored in `tracking.json` after the first start and passed as
  `MLFLOW_RUN_ID` on the next ones.

A run moved aside with `--overwrite` takes its tracking.json with it: the new run is tracked anew.
`WANDB_RUN_ID`, `WANDB_RESUME`, `WANDB_DIR`, `WANDB_PROJECT`, `MLFLOW_RUN_ID` and
`TENSORBOARD_LOGGING_DIR` set by the user win over these defaults.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers.integrations import MLflowCallback, TensorBoardCallback, WandbCallback

from tunefleet.launch.core.layout import TRACKING_FILE, write_json

TENSORBOARD_DIR = "tensorboard"
WANDB_PROJECT = "tunefleet"


def read_state(out: Path) -> dict[str, Any]:
    path = out / TRACKING_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _write_state(out: Path, state: dict[str, Any]) -> None:
    write_json(out / TRACKING_FILE, state)


def run_id(out: Path) -> str:
    """This output_dir's tracked-run id: created at the first start, read back on every later one."""
    state = read_state(out)
    if "run_id" not in state:
        seed = f"{out.resolve()}:{time.time_ns()}"
        state["run_id"] = hashlib.sha256(seed.encode()).hexdigest()[:16]
        _write_state(out, state)
    return str(state["run_id"])


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    """Set `name` for the duration unless the user set it (or `value` is None)."""
    if value is None or name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


class TensorBoardTracker(TensorBoardCallback):
    """The stock callback, writing into one fixed directory inside the output_dir."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        if self.logging_dir is None:  # TENSORBOARD_LOGGING_DIR unset
            self.logging_dir = str(out / TENSORBOARD_DIR)
        self.purge_step: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # a resumed run logs the steps after its checkpoint again: TensorBoard hides the earlier
        # attempt's events from that step on (the writer's purge_step), so each step shows once
        self.purge_step = state.global_step + 1
        super().on_train_begin(args, state, control, **kwargs)

    def _init_summary_writer(self, args: Any) -> None:
        self.tb_writer = self._SummaryWriter(log_dir=self.logging_dir, purge_step=self.purge_step)


class WandbTracker(WandbCallback):
    """The stock callback, resuming the output_dir's wandb run; finished at the end of training."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out

    def setup(self, args: Any, state: Any, model: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero and self._wandb.run is None:
            wandb_dir = Path(os.environ.get("WANDB_DIR") or self.out)
            wandb_dir.mkdir(parents=True, exist_ok=True)
            self._wandb.init(
                project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT),
                id=os.environ.get("WANDB_RUN_ID") or run_id(self.out),
                resume=os.environ.get("WANDB_RESUME", "allow"),
                name=args.run_name,
                dir=str(wandb_dir),
            )
        super().setup(args, state, model, **kwargs)

    def on_train_end(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: Any = None,
        processing_class: Any = None,
        **kwargs: Any,
    ) -> None:
        super().on_train_end(args, state, control, model=model, processing_class=processing_class, **kwargs)
        if state.is_world_process_zero and self._wandb.run is not None:
            self._wandb.finish()
        self._initialized = False


class MlflowTracker(MLflowCallback):
    """The stock callback, reattaching to the output_dir's mlflow run on every later start."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out

    def setup(self, args: Any, state: Any, model: Any) -> None:
        with _env("MLFLOW_RUN_ID", read_state(self.out).get("mlflow_run_id")):
            super().setup(args, state, model)
        active = self._ml_flow.active_run() if state.is_world_process_zero else None
        if active is not None:
            tracked = read_state(self.out)
            if tracked.get("mlflow_run_id") != active.info.run_id:
                _write_state(self.out, {**tracked, "mlflow_run_id": active.info.run_id})


_TRACKERS = {
    "tensorboard": (TensorBoardCallback, TensorBoardTracker),
    "wandb": (WandbCallback, WandbTracker),
    "mlflow": (MLflowCallback, MlflowTracker),
}


def install(trainer: Any, report_to: list[str], out: Path) -> None:
    """Swap the trainer's stock tracker callbacks for the ones above (one tracked run per output_dir)."""
    for name in report_to:
        stock, ours = _TRACKERS[name]
        trainer.remove_callback(stock)
        trainer.add_callback(ours(out))
