"""The sample order: a property of the recipe (seed, epoch), never of the world size.

Epoch `e` is a permutation of the training rows drawn from `seed + e`. It is cut into global
batches of `global_batch_size` samples; the incomplete last global batch of an epoch is dropped
(its size is reported by the planner). Global batch `k` is then split into
`grad_accum_steps x world_size` micro batches of `micro_batch_size`: accumulation step `a` on
rank `r` takes slice `(a * world_size + r) * micro`. Whatever the split, global batch `k` of
epoch `e` holds the same samples, so with the loss normalised over the global token count the
optimizer step is the same.

The sampler can start at any (epoch, step) directly: resuming does not replay batches.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from tunefleet.launch.core.batch import BatchPlan


def epoch_order(num_rows: int, *, seed: int, epoch: int) -> list[int]:
    """The permutation of row indices used in `epoch` (pure, platform independent)."""
    order = list(range(num_rows))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def global_batches(
    num_rows: int, *, global_batch_size: int, steps_per_epoch: int, seed: int, epoch: int
) -> list[list[int]]:
    """The `steps_per_epoch` complete global batches of one epoch, in order (the rows after them,
    fewer than one global batch, are dropped; `batch.plan_schedule` counts them)."""
    order = epoch_order(num_rows, seed=seed, epoch=epoch)
    return [order[k * global_batch_size : (k + 1) * global_batch_size] for k in range(steps_per_epoch)]


def micro_batch(
    batch: list[int], *, accum_step: int, rank: int, world_size: int, micro_batch_size: int
) -> list[int]:
    """The rows that `rank` processes at accumulation step `accum_step` of one global batch."""
    start = (accum_step * world_size + rank) * micro_batch_size
    return batch[start : start + micro_batch_size]


class GlobalBatchSampler:
    """A batch sampler yielding this rank's micro batches, global batch after global batch.

    The batch plan and the steps per epoch come from the run's schedule (computed once, in
    `tunefleet.launch.core.batch`); the sampler checks that they fit its rows and rank.
    `len()` is the number of micro batches this rank sees per epoch
    (steps_per_epoch x grad_accum_steps), which is what the HF Trainer expects.
    """

    def __init__(
        self, num_rows: int, *, batch: BatchPlan, steps_per_epoch: int, rank: int, seed: int
    ) -> None:
        g = batch.global_batch_size
        if not steps_per_epoch * g <= num_rows < (steps_per_epoch + 1) * g:
            raise ValueError(f"{steps_per_epoch} steps of {g} samples do not fit {num_rows} rows (drop last)")
        if not 0 <= rank < batch.world_size:
            raise ValueError(f"rank {rank} is not in a world of {batch.world_size}")
        self.num_rows = num_rows
        self.global_batch_size = g
        self.micro_batch_size = batch.micro_batch_size
        self.world_size = batch.world_size
        self.grad_accum_steps = batch.grad_accum_steps
        self.steps_per_epoch = steps_per_epoch
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def seek(self, *, epoch: int, step_in_epoch: int) -> None:
        """Start the next iteration at global batch `step_in_epoch` of `epoch` (no replay)."""
        self.epoch = epoch
        self.start_step = step_in_epoch

    def __len__(self) -> int:
        return self.steps_per_epoch * self.grad_accum_steps

    def __iter__(self) -> Iterator[list[int]]:
        batches = global_batches(
            self.num_rows,
            global_batch_size=self.global_batch_size,
            steps_per_epoch=self.steps_per_epoch,
            seed=self.seed,
            epoch=self.epoch,
        )
        start, self.start_step = self.start_step, 0
        for batch in batches[start:]:
            for a in range(self.grad_accum_steps):
                yield micro_batch(
                    batch,
                    accum_step=a,
                    rank=self.rank,
                    world_size=self.world_size,
                    micro_batch_size=self.micro_batch_size,
                )
