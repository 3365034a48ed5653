"""Benchmark: time to the first optimizer step after resuming, early vs late in a run.

    .venv/bin/python tools/bench_resume.py [--steps 2000] [--workdir /tmp/tunefleet-bench-resume]

Trains the demo model for `--steps` steps (tiny batches, a checkpoint every `steps/20`), then
resumes from an early and a late checkpoint in fresh output directories and reports the time
from `trainer.train()` to the end of the first optimizer step. The sampler seeks to the sample
position directly, so both should be the same.
"""

from __future__ import annotations

import argparse
import shutil
import time
from importlib import resources
from pathlib import Path

from transformers import TrainerCallback

from tunefleet.distributed import sft
from tunefleet.distributed import trainer as trainer_mod
from tunefleet.launch.core import recipe as R


class FirstStep(TrainerCallback):
    def __init__(self) -> None:
        self.train_begin = 0.0
        self.first_step_s: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.train_begin = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.first_step_s is None:
            self.first_step_s = time.monotonic() - self.train_begin
            control.should_training_stop = True  # one step is all we measure


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--workdir", default="/tmp/tunefleet-bench-resume")
    args = p.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    demo = Path(str(resources.files("tunefleet.recipes"))) / "demo.yaml"
    every = max(1, args.steps // 20)
    overrides = [
        f"train.max_steps={args.steps}",
        f"train.save_steps={every}",
        "train.logging_steps=50",
        "batch.micro_batch_size=1",
        "batch.global_batch_size=2",
        "data.max_length=48",
        "checkpoint.keep_last=null",
    ]

    started = time.monotonic()
    sft.run(R.load(demo, [f"output_dir={work / 'full'}", *overrides]))
    print(f"full run: {args.steps} steps in {time.monotonic() - started:.1f} s")

    # measure the first step after train() starts, through the real trainer class
    original_init = trainer_mod.TunefleetTrainer.__init__

    def init_with_probe(self, *a, **k):  # type: ignore[no-untyped-def]
        original_init(self, *a, **k)
        self.add_callback(PROBE)

    trainer_mod.TunefleetTrainer.__init__ = init_with_probe  # type: ignore[method-assign]
    results = []
    for step in (every, args.steps - every):
        PROBE.first_step_s = None
        out = work / f"resume-{step}"
        started = time.monotonic()
        sft.run(
            R.load(demo, [f"output_dir={out}", *overrides]), resume=str(work / "full" / f"checkpoint-{step}")
        )
        results.append((step, PROBE.first_step_s, time.monotonic() - started))
    print("resumed at step | train() -> first step | whole sft.run() (imports already done)")
    for step, first, whole in results:
        print(f"{step:>15} | {first:>18.3f} s | {whole:.1f} s")


PROBE = FirstStep()

if __name__ == "__main__":
    main()
