"""The short demo run that resume and SLURM tests compare against an uninterrupted run.

40 rows, global batch 8: 5 steps per epoch, 2 epochs (epoch boundaries inside the run), a
complete checkpoint after every step, dropout off so any split gives the same losses.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEMO = Path(str(resources.files("tunefleet.recipes"))) / "demo.yaml"
STEPS = 10
OVERRIDES = [
    "data.limit=40",
    "data.max_length=96",
    "batch.micro_batch_size=4",
    "batch.global_batch_size=8",
    "train.epochs=2",
    "train.logging_steps=1",
    "train.save_steps=1",
    "train.warmup_ratio=0.1",
    "peft.dropout=0.0",
    "checkpoint.keep_last=null",
]
