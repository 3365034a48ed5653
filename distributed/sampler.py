"""The sample order: a property of the recipe (seed, epoch), never of the world size.

Epoch `e` is a permutation of the training rows drawn from `seed + e` (with `data.mixture`, the
samples `mixture_order` draws from the sources, shared out by weight). It is cut into global
batches of `global_batch_size` samples; the incomplete last global batch of an epoch is dropped
(its size is reported by the planner). Global batch `k` is then split into
`grad_accum_steps x world_size` micro batches of `micro_batch_size`: accumulation step `a` on
rank `r` takes slice `(a * world_size + r) * micro`. Whatever the split, global batch `k` of
epoch `e` holds the same samples, so with the loss normalised over the global token count the
optimizer step is the same.

With `batch.group_by_length` (the default) the samples of one global batch are the same, but
within the step they are sorted by length and cut into micro batches of similar length (less
padding), and the micro batches are dealt to ranks so that every rank gets about the same number
of tokens (`group_by_length`). Deterministic from the step's samples, so from (seed, epoch, step);
the loss of a step (the token sum over the global batch divided by its label-token count) and its
gradients do not depend on how the samples are split.

The sampler can start at any (epoch, step) directly: resuming does not replay batches.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from tunefleet.launch.core.batch import BatchPlan, mixture_counts


def epoch_order(num_rows: int, *, seed: int, epoch: int) -> list[int]:
    """The permutation of row indices used in `epoch` (pure, platform independent)."""
    order = list(range(num_rows))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def mixture_order(sizes: Sequence[int], weights: Sequence[float], *, seed: int, epoch: int) -> list[int]:
    """One epoch of a weighted mixture, as row indices into the sources laid end to end.

    Source s gives `mixture_counts(...)[s]` samples: a fresh random subset of its rows when that
    is fewer than it has, else every row once per whole pass (each pass reshuffled) and a random
    subset for the rest. The samples of all sources are then shuffled together. Deterministic
    from (seed, epoch); like `epoch_order`, never from the world size."""
    starts = [sum(sizes[:s]) for s in range(len(sizes))]
    picked: list[int] = []
    for s, (size, count) in enumerate(zip(sizes, mixture_counts(sizes, weights), strict=True)):
        rng = random.Random((seed * 1_000_003 + epoch) * 1_009 + s)
        passes, rest = divmod(count, size)
        for _ in range(passes):
            picked += [starts[s] + i for i in rng.sample(range(size), size)]
        picked += [starts[s] + i for i in rng.sample(range(size), rest)]
    random.Random(seed * 1_000_003 + epoch).shuffle(picked)
    return picked


def epoch_samples(sizes: Sequence[int], weights: Sequence[float], *, seed: int, epoch: int) -> list[int]:
    """The samples of one epoch in order: `epoch_order` over one source, `mixture_order` over several."""
    if len(sizes) == 1:
        return epoch_order(sizes[0], seed=seed, epoch=epoch)
    return mixture_order(sizes, weights, seed=seed, epoch=epoch)


def cut_global_batches(order: list[int], *, global_batch_size: int, steps_per_epoch: int) -> list[list[int]]:
    """The `steps_per_epoch` complete global batches of an epoch's order (the samples after them,
    fewer than one global batch, are dropped; `batch.plan_schedule` counts them)."""
    return [order[k * global_batch_size : (k + 1) * global_batch_size] for k in range(steps_per_epoch)]


def global_batches(
    num_rows: int, *, global_batch_size: int, steps_per_epoch: int, seed: int, epoch: int
) -> list[list[int]]:
    """The complete global batches of one epoch over one source of `num_rows` rows, in order."""
    return cut_global_batches(
        epoch_order(num_rows, seed=seed, epoch=epoch),
        global_batch_size=global_batch_size,
        steps_per_epoch=steps_per_epoch,
    )


def micro_batch(
    batch: list[int], *, accum_step: int, rank: int, world_size: int, micro_batch_size: int
) -> list[int]:
    """The rows that `rank` processes at accumulation step `accum_step` of one global batch."""
    start = (accum_step * world_size + rank) * micro_batch_size
    return batch[start : start + micro_batch_size]


def split_in_order(
    batch: list[int], *, world_size: int, grad_accum_steps: int, micro_batch_size: int
) -> list[list[list[int]]]:
    """Every rank's micro batches of one global batch, in sampler order: result[rank][a]."""
    return [
        [
            micro_batch(batch, accum_step=a, rank=r, world_size=world_size, micro_batch_size=micro_batch_size)
            for a in range(grad_accum_steps)
        ]
        for r in range(world_size)
    ]


def micro_batch_cost(rows: list[int], lengths: Sequence[int], *, padding_free: bool) -> int:
    """Tokens one forward pass computes on: the real tokens of a padding-free row, or micro batch x
    the longest sample of a padded one."""
    if padding_free:
        return sum(lengths[i] for i in rows)
    return len(rows) * max(lengths[i] for i in rows)


def group_by_length(
    batch: list[int],
    lengths: Sequence[int],
    *,
    world_size: int,
    grad_accum_steps: int,
    micro_batch_size: int,
    padding_free: bool = False,
) -> list[list[list[int]]]:
    """Every rank's micro batches of one global batch, grouped by length: result[rank][a].

    The samples are sorted by length (ties by row index) and cut into micro batches of
    consecutive samples; the micro batches, most expensive first, each go to the rank with the
    fewest tokens so far among those that still need one (every rank gets `grad_accum_steps`)."""
    ordered = sorted(batch, key=lambda i: (lengths[i], i))
    micro = [ordered[k : k + micro_batch_size] for k in range(0, len(ordered), micro_batch_size)]
    costs = [micro_batch_cost(m, lengths, padding_free=padding_free) for m in micro]
    per_rank: list[list[list[int]]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for k in sorted(range(len(micro)), key=lambda k: (-costs[k], k)):
        open_ranks = [r for r in range(world_size) if len(per_rank[r]) < grad_accum_steps]
        r = min(open_ranks, key=lambda r: (load[r], r))
        per_rank[r].append(micro[k])
        load[r] += costs[k]
    return per_rank


class GlobalBatchSampler:
    """A batch sampler yielding this rank's micro batches, global batch after global batch.

    `sizes` are the examples of each training source, laid end to end (one size for a single
    source), `weights` their mixture weights (None: one source). The batch plan and the steps per
    epoch come from the run's schedule (computed once, in `tunefleet.launch.core.batch`); the
    sampler checks that they fit its rows and rank.
    `lengths` (tokens of every row) turns on `group_by_length`. `len()` is the number of micro
    batches this rank sees per epoch (steps_per_epoch x grad_accum_steps), which is what the HF
    Trainer expects.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        *,
        weights: Sequence[float] | None = None,
        batch: BatchPlan,
        steps_per_epoch: int,
        rank: int,
        seed: int,
        lengths: Sequence[int] | None = None,
        padding_free: bool = False,
    ) -> None:
        g, num_rows = batch.global_batch_size, sum(sizes)
        weights = [1.0] * len(sizes) if weights is None else list(weights)
        if not sizes or len(weights) != len(sizes) or min(sizes) <= 0 or min(weights) <= 0:
            raise ValueError(
                f"a mixture needs a positive size and weight per source, got {sizes} / {weights}"
            )
        if not steps_per_epoch * g <= num_rows < (steps_per_epoch + 1) * g:
            raise ValueError(f"{steps_per_epoch} steps of {g} samples do not fit {num_rows} rows (drop last)")
        if not 0 <= rank < batch.world_size:
            raise ValueError(f"rank {rank} is not in a world of {batch.world_size}")
        if lengths is not None and len(lengths) != num_rows:
            raise ValueError(f"{len(lengths)} lengths for {num_rows} rows")
        self.num_rows = num_rows
        self.sizes, self.weights = list(sizes), weights
        self.global_batch_size = g
        self.micro_batch_size = batch.micro_batch_size
        self.world_size = batch.world_size
        self.grad_accum_steps = batch.grad_accum_steps
        self.steps_per_epoch = steps_per_epoch
        self.rank = rank
        self.seed = seed
        self.lengths = lengths
        self.padding_free = padding_free
        self.epoch = 0
        self.start_step = 0

    def split(self, batch: list[int]) -> list[list[list[int]]]:
        """Every rank's micro batches of one global batch."""
        shape = {
            "world_size": self.world_size,
            "grad_accum_steps": self.grad_accum_steps,
            "micro_batch_size": self.micro_batch_size,
        }
        if self.lengths is None:
            return split_in_order(batch, **shape)
        return group_by_length(batch, self.lengths, padding_free=self.padding_free, **shape)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def seek_to_step(self, global_step: int, *, total_steps: int) -> None:
        """Start the next iteration right after optimizer step `global_step` (steps done so far);
        with every step of the run done, the next iteration yields nothing."""
        if global_step >= total_steps:
            self.seek(epoch=global_step // self.steps_per_epoch, step_in_epoch=self.steps_per_epoch)
        else:
            self.seek(
                epoch=global_step // self.steps_per_epoch, step_in_epoch=global_step % self.steps_per_epoch
            )

    def seek(self, *, epoch: int, step_in_epoch: int) -> None:
        """Start the next iteration at global batch `step_in_epoch` of `epoch` (no replay)."""
        self.epoch = epoch
        self.start_step = step_in_epoch

    def __len__(self) -> int:
        return self.steps_per_epoch * self.grad_accum_steps

    def __iter__(self) -> Iterator[list[int]]:
        batches = cut_global_batches(
            epoch_samples(self.sizes, self.weights, seed=self.seed, epoch=self.epoch),
            global_batch_size=self.global_batch_size,
            steps_per_epoch=self.steps_per_epoch,
        )
        start, self.start_step = self.start_step, 0
        for batch in batches[start:]:
            yield from self.split(batch)[self.rank]


def padded_token_ratio(
    lengths: Sequence[int],
    *,
    sizes: Sequence[int] | None = None,
    weights: Sequence[float] | None = None,
    batch: BatchPlan,
    steps_per_epoch: int,
    seed: int,
    grouped: bool,
    epoch: int = 0,
) -> float:
    """Tokens the forward passes of one epoch compute on (micro batches padded to their longest
    sample) over the real tokens: 1.0 is no padding at all. `sizes`/`weights`: the mixture (None:
    one source)."""
    samplers = [
        GlobalBatchSampler(
            [len(lengths)] if sizes is None else sizes,
            weights=weights,
            batch=batch,
            steps_per_epoch=steps_per_epoch,
            rank=rank,
            seed=seed,
            lengths=lengths if grouped else None,
        )
        for rank in range(batch.world_size)
    ]
    padded = real = 0
    for sampler in samplers:
        sampler.set_epoch(epoch)
        for rows in sampler:
            padded += micro_batch_cost(rows, lengths, padding_free=False)
            real += micro_batch_cost(rows, lengths, padding_free=True)
    return padded / max(real, 1)
