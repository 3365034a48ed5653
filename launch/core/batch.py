"""Batch and schedule arithmetic: the one place tunefleet derives accumulation, steps and LR.

The planner, the launcher, the sbatch generator, the trainer at start-up and a resume all call
these functions, so each name keeps one meaning everywhere:

- `micro_batch_size`: samples per device per forward/backward pass.
- `world_size`: processes taking part (nodes x processes per node), one device each.
- `grad_accum_steps`: forward/backward passes per device per optimizer step.
- `global_batch_size`: samples per optimizer step, over all devices and accumulation steps:
  `micro_batch_size x grad_accum_steps x world_size`, exactly. Numbers that do not divide are
  rejected with the nearest valid choices; nothing is floored.
- `global_batch_tokens`: the alternative target, tokens per optimizer step counted at
  `max_length` (as torchtitan counts them). It must be a multiple of `max_length`, and the
  global batch it gives (`global_batch_tokens // max_length`) must divide like any other.
  Padded or truncated sequences are shorter, so real tokens per step are at most this.
- step: one optimizer step. `steps_per_epoch`, `total_steps`, `warmup_steps` count these.

The last incomplete global batch of an epoch is DROPPED (the default, and what
`tunefleet.distributed.sampler` does): an epoch is `dataset_rows // global_batch_size` steps and
`dataset_rows % global_batch_size` rows are skipped, a count the plan reports. The order is a
fresh permutation per epoch (drawn from seed and epoch), so a different handful of rows is
skipped each epoch. Why not keep it: a short last step is only equivalent to a full one if the
loss is normalised per token over that short window on every rank; with the world size in play,
accelerate pads it with repeated samples instead, so the result of an epoch would depend on
how many GPUs ran it. Dropping keeps every optimizer step the same set of samples whatever the
world size, which is also what makes resuming on another node count exact. `last_batch="keep"`
is available to describe the stock HF Trainer arithmetic (ceil), not what tunefleet trains.

Everything here is pure Python: no torch, no I/O.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tunefleet.launch.core.errors import RecipeError

LastBatch = Literal["drop", "keep"]

MAX_LISTED_CHOICES = 8
"""At most this many alternatives are named in an error message."""

SCHEDULER_KWARGS: dict[str, dict[str, float]] = {
    "linear": {},
    "cosine": {},
    "constant": {},
    "constant_with_warmup": {},
    "cosine_with_min_lr": {"min_lr_rate": 0.1},
    "polynomial": {"lr_end": 1e-7, "power": 1.0},
}
"""The `lr_scheduler_kwargs` the trainer passes to transformers for each `train.lr_scheduler`
(`lr_at` uses the same values, so the plan shows the LR the run will use)."""


@dataclass(frozen=True, kw_only=True)
class BatchPlan:
    """How one optimizer step is made of micro batches on this world size."""

    world_size: int
    """Processes taking part (nodes x processes per node)."""

    micro_batch_size: int
    """Samples per device per forward/backward pass."""

    grad_accum_steps: int
    """Forward/backward passes per device per optimizer step."""

    global_batch_size: int
    """Samples per optimizer step (= micro_batch_size x grad_accum_steps x world_size)."""

    max_length: int
    """Tokens per sample at most (data.max_length)."""

    global_batch_tokens: int
    """Tokens per optimizer step at max_length (global_batch_size x max_length): an upper bound."""

    target: Literal["samples", "tokens"]
    """Whether the recipe asked for a global batch in samples or a token budget."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """Optimizer steps of a run and where its warm-up ends."""

    dataset_rows: int
    """Training rows (after data.limit and the evaluation hold-out)."""

    global_batch_size: int
    """Samples per optimizer step."""

    last_batch: LastBatch
    """What happens to the incomplete last global batch of each epoch."""

    steps_per_epoch: int
    """Optimizer steps in one pass over the data."""

    total_steps: int
    """Optimizer steps of the run: train.max_steps, or ceil(epochs x steps_per_epoch)."""

    warmup_steps: int
    """ceil(warmup_ratio x total_steps), as transformers' `TrainingArguments.get_warmup_steps`."""

    dropped_rows_per_epoch: int
    """Rows skipped each epoch (the incomplete last global batch); 0 with `keep`."""

    short_last_batch_samples: int
    """With `keep`: samples in the short last step of an epoch (0 if it is full or with `drop`)."""

    epochs: float
    """Passes over the data the run makes (total_steps / steps_per_epoch)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- global batch


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _listed(values: list[int], empty: str = "none") -> str:
    if not values:
        return empty
    shown = ", ".join(str(v) for v in values[:MAX_LISTED_CHOICES])
    return shown + (", ..." if len(values) > MAX_LISTED_CHOICES else "")


def _nearest_multiples(value: int, unit: int) -> list[int]:
    lower = value // unit * unit
    return [m for m in (lower, lower + unit) if m > 0 and m != value]


def _require_positive(value: int | None, where: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise RecipeError(f"{where} must be a positive integer, got {value!r}", f"set {where} to e.g. 1")


def _division_choices(
    global_batch_size: int, micro_batch_size: int, world_size: int, procs_per_node: int | None
) -> list[str]:
    """The valid alternatives to a global batch that micro batch x world size does not divide."""
    unit = micro_batch_size * world_size
    micros = _divisors(global_batch_size // world_size) if global_batch_size % world_size == 0 else []
    worlds = (
        _divisors(global_batch_size // micro_batch_size) if global_batch_size % micro_batch_size == 0 else []
    )
    choices = [
        f"nearest valid global batches: {_listed(_nearest_multiples(global_batch_size, unit))}",
        f"micro batch sizes that divide it on world size {world_size}: {_listed(micros)}",
        f"world sizes that divide it with micro batch {micro_batch_size}: {_listed(worlds)}",
    ]
    if procs_per_node:
        nodes = [w // procs_per_node for w in worlds if w % procs_per_node == 0]
        choices.append(f"node counts ({procs_per_node} processes each): {_listed(nodes)}")
    return choices


def _not_a_multiple(global_batch_size: int, micro_batch_size: int, world_size: int) -> str:
    return (
        f"not a multiple of micro_batch_size {micro_batch_size} x world size {world_size} = "
        f"{micro_batch_size * world_size} samples per accumulation step, so the gradient accumulation "
        "steps would not be a whole number"
    )


def samples_for_tokens(global_batch_tokens: int, max_length: int) -> int:
    """The global batch in samples of a token budget per step counted at `max_length`; refuses a
    budget that is not a multiple of `max_length` (part of it would silently be dropped)."""
    _require_positive(global_batch_tokens, "batch.global_batch_tokens")
    _require_positive(max_length, "data.max_length")
    if global_batch_tokens % max_length:
        near = _nearest_multiples(global_batch_tokens, max_length)
        raise RecipeError(
            f"batch.global_batch_tokens={global_batch_tokens} is not a multiple of "
            f"data.max_length={max_length}: the global batch in samples "
            f"(global_batch_tokens // max_length = {global_batch_tokens // max_length}) "
            "would silently drop part of the budget",
            f"nearest valid token budgets: {_listed(near)}",
        )
    return global_batch_tokens // max_length


def plan_batch(
    *,
    micro_batch_size: int,
    global_batch_size: int | None = None,
    global_batch_tokens: int | None = None,
    max_length: int,
    world_size: int,
    procs_per_node: int | None = None,
    target: Literal["samples", "tokens"] | None = None,
) -> BatchPlan:
    """Derive `grad_accum_steps = global / (micro x world)`, or raise naming the nearest valid choices.

    Give exactly one of `global_batch_size` (samples per optimizer step) and
    `global_batch_tokens` (tokens per step at `max_length`, turned into samples by
    `samples_for_tokens`). A recipe's batch is already in samples once loaded (the recipe converted
    its token budget): it passes `global_batch_size` with `target="tokens"`, so the plan (and the
    errors) still speak of the target the user set. `procs_per_node`, when known, only adds valid
    node counts to the error message.
    """
    _require_positive(micro_batch_size, "batch.micro_batch_size")
    _require_positive(max_length, "data.max_length")
    _require_positive(world_size, "world size")
    if (global_batch_size is None) == (global_batch_tokens is None):
        raise RecipeError(
            "give exactly one of batch.global_batch_size and batch.global_batch_tokens",
            "set batch.global_batch_size (samples per optimizer step) or batch.global_batch_tokens",
        )
    if global_batch_tokens is not None:
        global_batch_size = samples_for_tokens(global_batch_tokens, max_length)
        target = "tokens"
    target = target or "samples"
    assert global_batch_size is not None
    where = "batch.global_batch_tokens" if target == "tokens" else "batch.global_batch_size"
    _require_positive(global_batch_size, where)
    unit = micro_batch_size * world_size
    if global_batch_size % unit:
        choices = _division_choices(global_batch_size, micro_batch_size, world_size, procs_per_node)
        if target == "tokens":
            near_tokens = [n * max_length for n in _nearest_multiples(global_batch_size, unit)]
            raise RecipeError(
                f"batch.global_batch_tokens={global_batch_size * max_length} gives a global batch of "
                f"{global_batch_size * max_length} // {max_length} = {global_batch_size} samples, which must "
                f"divide too, but it is {_not_a_multiple(global_batch_size, micro_batch_size, world_size)}",
                f"nearest valid token budgets: {_listed(near_tokens)}; in samples, " + "; ".join(choices),
            )
        raise RecipeError(
            f"{where}={global_batch_size} is {_not_a_multiple(global_batch_size, micro_batch_size, world_size)}",
            "; ".join(choices),
        )
    return BatchPlan(
        world_size=world_size,
        micro_batch_size=micro_batch_size,
        grad_accum_steps=global_batch_size // unit,
        global_batch_size=global_batch_size,
        max_length=max_length,
        global_batch_tokens=global_batch_size * max_length,
        target=target,
    )


def batch_change(saved: Mapping[str, Any], current: BatchPlan) -> tuple[str | None, list[str]]:
    """The one resume rule of the batch: compare the batch plan a run started with
    (`BatchPlan.to_dict()`, in every checkpoint manifest) with this start's.

    The global batch defines what a step is (samples, LR schedule, sample order), so it must not
    change; micro batch, world size and accumulation may. Returns (the breaking change as one line,
    or None; notes on the harmless changes)."""
    if not saved:
        return None, []
    if saved.get("global_batch_size") != current.global_batch_size:
        before, now = saved.get("global_batch_size"), current.global_batch_size
        return (
            f"batch.global_batch_size: {before} -> {now} (this run started with a global batch of {before} "
            f"samples per step; resuming with {now} would change what a step means: sample order, step "
            "counts, LR schedule; only the micro batch, nodes and GPUs may change)"
        ), []
    notes = []
    for name in ("world_size", "micro_batch_size", "grad_accum_steps"):
        if name in saved and saved[name] != getattr(current, name):
            notes.append(f"{name} {saved.get(name)} -> {getattr(current, name)}")
    if notes:
        return None, [f"resuming with {', '.join(notes)}; the global batch stays {current.global_batch_size}"]
    return None, []


# ----------------------------------------------------------------------------- schedule


def held_out_rows(rows: int, eval_ratio: float) -> int:
    """Rows held out for evaluation by `data.eval_ratio`: the first floor(rows x eval_ratio) rows
    (seed 003's rule). The planner counts with it, the data loader splits with it."""
    return math.floor(rows * eval_ratio)


def split_rows(rows: int, *, limit: int | None, eval_ratio: float) -> tuple[int, int]:
    """(training rows, evaluation rows) of a data file: `limit` first, then the held-out rows."""
    if limit is not None:
        rows = min(rows, limit)
    held_out = held_out_rows(rows, eval_ratio)
    return rows - held_out, held_out


def mixture_counts(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Samples each source contributes to one epoch of a mixture: the epoch keeps the total row count,
    shared out by weight (largest remainder, ties to the earlier source). The sampler draws them, the
    planner shows them."""
    total, norm = sum(sizes), sum(weights)
    exact = [total * w / norm for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda s: (-(exact[s] - counts[s]), s))
    for s in by_remainder[: total - sum(counts)]:
        counts[s] += 1
    return counts


def count_warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """ceil(warmup_ratio x total_steps): transformers' `get_warmup_steps` for a ratio below 1."""
    if not 0 <= warmup_ratio < 1:
        raise RecipeError(f"train.warmup_ratio must be in [0, 1), got {warmup_ratio}", "use e.g. 0.03")
    return math.ceil(total_steps * warmup_ratio)


def plan_schedule(
    *,
    dataset_rows: int,
    global_batch_size: int,
    epochs: float,
    max_steps: int,
    warmup_ratio: float,
    last_batch: LastBatch = "drop",
) -> Schedule:
    """Steps per epoch, total and warm-up steps, the way transformers' Trainer counts them.

    `max_steps > 0` wins over `epochs` (as `train.max_steps` documents). Raises when the data
    holds less than one global batch.
    """
    if dataset_rows < 0 or global_batch_size <= 0:
        raise ValueError(f"dataset_rows={dataset_rows}, global_batch_size={global_batch_size}")
    if last_batch == "drop":
        steps_per_epoch, remainder = divmod(dataset_rows, global_batch_size)
        dropped, short = remainder, 0
    elif last_batch == "keep":
        steps_per_epoch = math.ceil(dataset_rows / global_batch_size)
        dropped, short = 0, dataset_rows % global_batch_size
    else:
        raise ValueError(f"last_batch must be 'drop' or 'keep', got {last_batch!r}")
    if steps_per_epoch == 0:
        raise RecipeError(
            f"the training data has {dataset_rows} rows, fewer than one global batch of "
            f"{global_batch_size} samples: not a single optimizer step",
            "lower batch.global_batch_size, add data, or lower data.eval_ratio",
        )
    if max_steps > 0:
        total_steps = max_steps
    elif epochs > 0:
        total_steps = math.ceil(epochs * steps_per_epoch)
    else:
        raise RecipeError("neither train.max_steps nor train.epochs is positive", "set train.epochs=1")
    return Schedule(
        dataset_rows=dataset_rows,
        global_batch_size=global_batch_size,
        last_batch=last_batch,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup_steps=count_warmup_steps(total_steps, warmup_ratio),
        dropped_rows_per_epoch=dropped,
        short_last_batch_samples=short,
        epochs=total_steps / steps_per_epoch,
    )


def lr_at(step: int, *, schedule: Schedule, lr: float, scheduler_name: str) -> float:
    """The learning rate of optimizer step `step` (0-based), exactly as transformers computes it.

    This is `LambdaLR`'s `base_lr x lr_lambda(step)` with the lambdas of
    `transformers.optimization` (and `SCHEDULER_KWARGS`): step 0 is the first optimizer step;
    after `k` steps the trainer logs `lr_at(k)`. `constant` has no warm-up in transformers.
    """
    w, n = schedule.warmup_steps, schedule.total_steps
    if scheduler_name not in SCHEDULER_KWARGS:
        raise RecipeError(
            f"train.lr_scheduler: unknown scheduler {scheduler_name!r}",
            f"use one of {', '.join(SCHEDULER_KWARGS)}",
        )
    if scheduler_name == "constant":
        return lr * 1
    if step < w:
        return lr * (float(step) / float(max(1, w)))
    if scheduler_name == "constant_with_warmup":
        return lr * 1.0
    if scheduler_name == "linear":
        return lr * max(0.0, float(n - step) / float(max(1, n - w)))
    if scheduler_name in ("cosine", "cosine_with_min_lr"):
        progress = float(step - w) / float(max(1, n - w))
        num_cycles = 0.5  # transformers' default: half a cosine wave, from lr down to the floor
        factor = 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))
        if scheduler_name == "cosine":
            return lr * max(0.0, factor)
        min_lr_rate = SCHEDULER_KWARGS["cosine_with_min_lr"]["min_lr_rate"]
        return lr * max(0, factor * (1 - min_lr_rate) + min_lr_rate)
    # polynomial
    lr_end, power = SCHEDULER_KWARGS["polynomial"]["lr_end"], SCHEDULER_KWARGS["polynomial"]["power"]
    if not lr > lr_end:
        raise RecipeError(
            f"train.lr_scheduler=polynomial decays to {lr_end}, which needs train.lr above it (got {lr})",
            "raise train.lr or choose another scheduler",
        )
    if step > n:
        return lr * (lr_end / lr)
    pct_remaining = 1 - (step - w) / (n - w)
    return lr * (((lr - lr_end) * pct_remaining**power + lr_end) / lr)


def lr_points(schedule: Schedule, *, lr: float, scheduler_name: str) -> list[tuple[int, float]]:
    """(step, LR) at the key steps: start, end of warm-up, quarter points and the last step."""
    n, w = schedule.total_steps, schedule.warmup_steps
    steps = {0, w, n // 4, n // 2, 3 * n // 4, n - 1}
    return [
        (s, lr_at(s, schedule=schedule, lr=lr, scheduler_name=scheduler_name))
        for s in sorted(steps)
        if 0 <= s < n
    ]
