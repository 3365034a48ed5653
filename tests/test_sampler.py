"""The sample order (`tunefleet.distributed.sampler`): a property of (seed, epoch), never of the split.

Fast and pure: no torch, no training. The training-level proof (the same weights whatever the
split) is `tests/test_batch_equivalence.py`.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from tunefleet.distributed.sampler import GlobalBatchSampler, epoch_order, mixture_order
from tunefleet.distributed.sampler import global_batches as _global_batches
from tunefleet.launch.core.batch import mixture_counts, plan_batch, plan_schedule

SEED = 42

# (rows, global batch, micro batch, world size): divisible and non-divisible row counts, GA 1..16,
# world sizes 1..8, a micro batch of 1 and a micro batch equal to the global batch.
COMBOS = [
    (20, 8, 8, 1),
    (20, 8, 1, 1),
    (20, 8, 2, 2),
    (20, 8, 4, 2),
    (20, 8, 1, 8),
    (100, 16, 1, 1),
    (100, 16, 2, 4),
    (100, 16, 4, 4),
    (100, 16, 16, 1),
    (101, 12, 3, 2),
    (101, 12, 1, 3),
    (101, 12, 2, 6),
    (64, 64, 4, 4),
    (7, 3, 1, 3),
    (250, 24, 2, 4),
    (250, 24, 3, 8),
]

# splits of a global batch of 8 (the four configs of the training-level test and more)
SPLITS_OF_8 = [(8, 1), (1, 1), (2, 2), (4, 2), (1, 2), (1, 4), (2, 4), (1, 8), (4, 1), (2, 1)]


def make_sampler(rows: int, *, global_: int, micro: int, world: int, rank: int) -> GlobalBatchSampler:
    """A sampler as the trainer builds it: from the run's batch plan and schedule."""
    batch = plan_batch(micro_batch_size=micro, global_batch_size=global_, max_length=8, world_size=world)
    schedule = plan_schedule(
        dataset_rows=rows, global_batch_size=global_, epochs=1, max_steps=-1, warmup_ratio=0
    )
    return GlobalBatchSampler(
        [rows], batch=batch, steps_per_epoch=schedule.steps_per_epoch, rank=rank, seed=SEED
    )


def global_batches(rows: int, *, global_batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    return _global_batches(
        rows,
        global_batch_size=global_batch_size,
        steps_per_epoch=rows // global_batch_size,
        seed=seed,
        epoch=epoch,
    )


def rank_batches(rows: int, *, global_: int, micro: int, world: int, epoch: int = 0) -> list[list[list[int]]]:
    """Every rank's micro batches of one epoch: result[rank][i] is the i-th micro batch of `rank`."""
    out = []
    for rank in range(world):
        s = make_sampler(rows, global_=global_, micro=micro, world=world, rank=rank)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


def step_union(per_rank: list[list[list[int]]], step: int, accum: int) -> list[int]:
    """All samples of optimizer step `step`: every rank's micro batches of its accumulation window."""
    return sorted(i for batches in per_rank for mb in batches[step * accum : (step + 1) * accum] for i in mb)


@pytest.mark.parametrize(("rows", "global_", "micro", "world"), COMBOS)
def test_each_step_is_exactly_its_global_batch(rows: int, global_: int, micro: int, world: int) -> None:
    accum = global_ // (micro * world)
    steps = rows // global_
    for epoch in (0, 1, 5):
        expected = global_batches(rows, global_batch_size=global_, seed=SEED, epoch=epoch)
        assert len(expected) == steps and all(len(b) == global_ for b in expected)
        per_rank = rank_batches(rows, global_=global_, micro=micro, world=world, epoch=epoch)
        for batches in per_rank:
            assert len(batches) == steps * accum
            assert all(len(mb) == micro for mb in batches), "every micro batch is full"
        for k in range(steps):
            union = step_union(per_rank, k, accum)
            assert union == sorted(expected[k]), f"epoch {epoch} step {k}"
            assert len(set(union)) == global_, "a sample appears twice within one step"


@pytest.mark.parametrize(("rows", "global_", "micro", "world"), COMBOS)
def test_no_sample_repeats_and_only_the_last_incomplete_batch_is_dropped(
    rows: int, global_: int, micro: int, world: int
) -> None:
    steps, dropped = divmod(rows, global_)
    for epoch in (0, 3):
        per_rank = rank_batches(rows, global_=global_, micro=micro, world=world, epoch=epoch)
        seen = [i for batches in per_rank for mb in batches for i in mb]
        counts = Counter(seen)
        assert max(counts.values()) == 1, "a sample was repeated within an epoch (padding?)"
        assert len(seen) == steps * global_
        order = epoch_order(rows, seed=SEED, epoch=epoch)
        # the skipped rows are exactly the tail of this epoch's permutation
        assert set(range(rows)) - set(seen) == set(order[steps * global_ :])
        assert len(order[steps * global_ :]) == dropped


@pytest.mark.parametrize("rows", [20, 23, 64, 101])
def test_same_global_batches_whatever_the_split(rows: int) -> None:
    """Global batch k of epoch e is one set of samples for every (micro, world) split of 8."""
    for epoch in (0, 1, 2):
        reference = None
        for micro, world in SPLITS_OF_8:
            accum = 8 // (micro * world)
            per_rank = rank_batches(rows, global_=8, micro=micro, world=world, epoch=epoch)
            steps = [step_union(per_rank, k, accum) for k in range(rows // 8)]
            if reference is None:
                reference = steps
            assert steps == reference, f"split micro={micro} world={world} differs in epoch {epoch}"


def test_epochs_differ_and_are_reproducible() -> None:
    rows, global_ = 100, 16
    orders = [global_batches(rows, global_batch_size=global_, seed=SEED, epoch=e) for e in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert orders[a] != orders[b]
            assert orders[a][0] != orders[b][0], "the first global batch should change with the epoch"
    # a pure function of (seed, epoch): recomputing gives the same, another seed does not
    assert orders[2] == global_batches(rows, global_batch_size=global_, seed=SEED, epoch=2)
    assert orders[0] != global_batches(rows, global_batch_size=global_, seed=SEED + 1, epoch=0)
    # and a different handful of rows is dropped per epoch (at least once over four epochs)
    dropped = [frozenset(epoch_order(rows, seed=SEED, epoch=e)[96:]) for e in range(4)]
    assert len(set(dropped)) > 1


def test_epoch_order_is_pinned() -> None:
    """The permutation must never change silently: a resumed run would train on other samples."""
    assert epoch_order(10, seed=42, epoch=0) == [0, 3, 2, 7, 1, 4, 8, 6, 5, 9]
    assert epoch_order(10, seed=42, epoch=1) == [9, 7, 0, 2, 1, 6, 3, 4, 5, 8]


@pytest.mark.parametrize(("rows", "global_", "micro", "world"), COMBOS)
def test_len_counts_micro_batches_per_epoch(rows: int, global_: int, micro: int, world: int) -> None:
    accum = global_ // (micro * world)
    for rank in range(world):
        s = make_sampler(rows, global_=global_, micro=micro, world=world, rank=rank)
        assert len(s) == (rows // global_) * accum == len(list(s))
        assert s.grad_accum_steps == accum and s.steps_per_epoch == rows // global_


@pytest.mark.parametrize(
    ("rows", "global_", "micro", "world"), [(100, 16, 2, 4), (20, 8, 1, 1), (101, 12, 3, 2)]
)
def test_seek_starts_at_the_exact_step_without_iterating_earlier_ones(
    rows: int, global_: int, micro: int, world: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    accum = global_ // (micro * world)
    steps = rows // global_
    calls: list[int] = []
    real_split = GlobalBatchSampler.split

    def counting_split(self: GlobalBatchSampler, batch: list[int]) -> list[list[list[int]]]:
        calls.append(1)  # one global batch split into every rank's micro batches
        return real_split(self, batch)

    monkeypatch.setattr(GlobalBatchSampler, "split", counting_split)
    for rank in range(world):

        def make(rank: int = rank) -> GlobalBatchSampler:
            return make_sampler(rows, global_=global_, micro=micro, world=world, rank=rank)

        for epoch in (0, 2):
            full = make()
            full.set_epoch(epoch)
            everything = list(full)
            for start in range(steps + 1):
                s = make()
                s.seek(epoch=epoch, step_in_epoch=start)
                calls.clear()
                first = next(iter(s), None)
                # the first micro batch is produced at once: nothing earlier was generated
                assert len(calls) <= 1
                s.seek(epoch=epoch, step_in_epoch=start)
                calls.clear()
                got = list(s)
                assert got == everything[start * accum :]
                assert first == (got[0] if got else None)
                assert len(calls) == steps - start, "earlier steps were iterated"
                # the seek is one-shot: the next pass (next epoch) starts from its beginning
                s.set_epoch(epoch + 1)
                nxt = make()
                nxt.set_epoch(epoch + 1)
                assert list(s) == list(nxt)


def test_seek_to_a_later_epoch_matches_that_epoch() -> None:
    s = make_sampler(50, global_=8, micro=2, world=2, rank=1)
    s.seek(epoch=3, step_in_epoch=2)
    ref = make_sampler(50, global_=8, micro=2, world=2, rank=1)
    ref.set_epoch(3)
    assert list(s) == list(ref)[2 * 2 :]


def test_a_schedule_that_does_not_fit_the_rows_is_refused() -> None:
    batch = plan_batch(micro_batch_size=2, global_batch_size=8, max_length=8, world_size=2)
    GlobalBatchSampler([100], batch=batch, steps_per_epoch=12, rank=1, seed=SEED)  # 96 of 100 rows
    for steps in (11, 13):
        with pytest.raises(ValueError, match="do not fit 100 rows"):
            GlobalBatchSampler([100], batch=batch, steps_per_epoch=steps, rank=0, seed=SEED)
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        GlobalBatchSampler([100], batch=batch, steps_per_epoch=12, rank=2, seed=SEED)


# ----------------------------------------------------------------------------- grouped by length


def long_tailed_lengths(rows: int, *, seed: int = 0, max_length: int = 512) -> list[int]:
    """Token lengths like the issue's benchmark data: median ~200, p90 ~400, some cut at max_length."""
    import random

    rng = random.Random(seed)
    return [min(max_length, max(8, int(rng.lognormvariate(5.3, 0.55)))) for _ in range(rows)]


def padded_tokens(per_rank: list[list[list[int]]], lengths: list[int]) -> int:
    return sum(len(mb) * max(lengths[i] for i in mb) for batches in per_rank for mb in batches)


def grouped_sampler(
    rows: int, lengths: list[int], *, global_: int, micro: int, world: int, rank: int
) -> GlobalBatchSampler:
    batch = plan_batch(micro_batch_size=micro, global_batch_size=global_, max_length=8, world_size=world)
    return GlobalBatchSampler(
        [rows], batch=batch, steps_per_epoch=rows // global_, rank=rank, seed=SEED, lengths=lengths
    )


@pytest.mark.parametrize(("rows", "global_", "micro", "world"), COMBOS)
def test_grouping_keeps_the_samples_of_every_step(rows: int, global_: int, micro: int, world: int) -> None:
    lengths = long_tailed_lengths(rows)
    accum = global_ // (micro * world)
    for epoch in (0, 3):
        expected = global_batches(rows, global_batch_size=global_, seed=SEED, epoch=epoch)
        per_rank = []
        for rank in range(world):
            s = grouped_sampler(rows, lengths, global_=global_, micro=micro, world=world, rank=rank)
            s.set_epoch(epoch)
            per_rank.append(list(s))
            assert all(len(mb) == micro for mb in per_rank[-1]) and len(per_rank[-1]) == len(expected) * accum
        for k in range(len(expected)):
            assert step_union(per_rank, k, accum) == sorted(expected[k]), f"epoch {epoch} step {k}"


def test_grouping_cuts_padding_and_balances_the_ranks() -> None:
    """960 long-tailed rows, global batch 64 of micro batches of 8 (the issue's benchmark shape)."""
    from tunefleet.distributed.sampler import group_by_length, micro_batch_cost, split_in_order

    lengths = long_tailed_lengths(960)
    real = sum(lengths[i] for b in global_batches(960, global_batch_size=64, seed=SEED, epoch=0) for i in b)
    ratios = {}
    for name, split in (("in order", split_in_order), ("grouped", None)):
        total = 0
        for b in global_batches(960, global_batch_size=64, seed=SEED, epoch=0):
            shape = dict(world_size=1, grad_accum_steps=8, micro_batch_size=8)
            per_rank = split(b, **shape) if split else group_by_length(b, lengths, **shape)
            total += padded_tokens(per_rank, lengths)
        ratios[name] = total / real
    print(f"padded / real tokens: {ratios}")
    assert ratios["in order"] > 1.5 and ratios["grouped"] < 1.2
    for b in global_batches(960, global_batch_size=64, seed=SEED, epoch=1):
        per_rank = group_by_length(b, lengths, world_size=4, grad_accum_steps=2, micro_batch_size=8)
        loads = [
            sum(micro_batch_cost(mb, lengths, padding_free=False) for mb in batches) for batches in per_rank
        ]
        biggest = max(micro_batch_cost(mb, lengths, padding_free=False) for bs in per_rank for mb in bs)
        assert max(loads) - min(loads) <= biggest, loads  # no rank waits longer than one micro batch
        assert per_rank == group_by_length(
            list(reversed(b)), lengths, world_size=4, grad_accum_steps=2, micro_batch_size=8
        )


def test_grouped_seek_matches_the_full_pass() -> None:
    lengths = long_tailed_lengths(101)
    for rank in range(2):
        full = grouped_sampler(101, lengths, global_=12, micro=3, world=2, rank=rank)
        full.set_epoch(2)
        everything = list(full)
        s = grouped_sampler(101, lengths, global_=12, micro=3, world=2, rank=rank)
        s.seek(epoch=2, step_in_epoch=3)
        assert list(s) == everything[3 * 2 :]


def test_seek_to_step_is_the_position_after_that_step() -> None:
    """After k optimizer steps the next micro batch is the first of step k (epoch k // steps per
    epoch); after the last step of the run there is none (no extra step on resume)."""
    rows, global_, micro, world = 101, 12, 3, 2  # 8 steps per epoch, 5 rows dropped
    for rank in range(world):
        everything = []
        for epoch in range(3):
            s = make_sampler(rows, global_=global_, micro=micro, world=world, rank=rank)
            s.set_epoch(epoch)
            everything += list(s)
        accum = global_ // (micro * world)
        for k in (0, 1, 7, 8, 9, 15, 16, 17):
            s = make_sampler(rows, global_=global_, micro=micro, world=world, rank=rank)
            s.seek_to_step(k, total_steps=24)
            s.set_epoch(k // 8)  # what the trainer does at the start of the epoch
            first = next(iter(s))
            assert first == everything[k * accum], k
        for k in (24, 30):
            s = make_sampler(rows, global_=global_, micro=micro, world=world, rank=rank)
            s.seek_to_step(k, total_steps=24)
            s.set_epoch(k // 8)
            assert list(s) == []


# ----------------------------------------------------------------------------- weighted mixtures

MIXES = [
    ([30, 50], [3.0, 1.0]),  # the small source is repeated, the big one subsampled
    ([40, 40, 21], [1.0, 1.0, 2.0]),
    ([7, 93], [1.0, 1.0]),  # equal weights on unequal sources: the small one ~7 passes
    ([100, 5], [1.0, 0.01]),  # a tiny share
]


def source_of(i: int, sizes: list[int]) -> int:
    """The source a sample index (into the sources laid end to end) belongs to."""
    for s, end in enumerate(itertools.accumulate(sizes)):
        if i < end:
            return s
    raise AssertionError(i)


def mixture_sampler(
    sizes: list[int], weights: list[float], *, global_: int, micro: int, world: int, rank: int, **kw: object
) -> GlobalBatchSampler:
    batch = plan_batch(micro_batch_size=micro, global_batch_size=global_, max_length=8, world_size=world)
    schedule = plan_schedule(
        dataset_rows=sum(sizes), global_batch_size=global_, epochs=1, max_steps=-1, warmup_ratio=0
    )
    return GlobalBatchSampler(
        sizes,
        weights=weights,
        batch=batch,
        steps_per_epoch=schedule.steps_per_epoch,
        rank=rank,
        seed=SEED,
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(("sizes", "weights"), MIXES)
def test_each_epoch_shares_the_rows_out_by_weight(sizes: list[int], weights: list[float]) -> None:
    """An epoch keeps the total row count; source s gives round(total x w_s / sum w) samples (within
    one, largest remainder), every row of a source once per whole pass, and the epochs differ."""
    total = sum(sizes)
    counts = mixture_counts(sizes, weights)
    assert sum(counts) == total
    for s, w in enumerate(weights):
        assert abs(counts[s] - total * w / sum(weights)) < 1
    orders = []
    for epoch in range(3):
        order = mixture_order(sizes, weights, seed=SEED, epoch=epoch)
        assert len(order) == total and order == mixture_order(sizes, weights, seed=SEED, epoch=epoch)
        assert Counter(source_of(i, sizes) for i in order) == {s: c for s, c in enumerate(counts) if c}
        for s, (size, count) in enumerate(zip(sizes, counts, strict=True)):
            seen = Counter(i for i in order if source_of(i, sizes) == s)
            passes, rest = divmod(count, size)
            assert (
                sorted(seen.values()) == sorted([passes + 1] * rest + [passes] * (size - rest))[-len(seen) :]
            )
        orders.append(order)
    assert orders[0] != orders[1] != orders[2]
    assert orders[0] != mixture_order(sizes, weights, seed=SEED + 1, epoch=0)
    # a source whose share is not a whole number of passes gives a fresh random subset each epoch
    # (the same subset every epoch would never train its other rows: planted bug B7, docs/development.md)
    for s, (size, count) in enumerate(zip(sizes, counts, strict=True)):
        if count % size:
            subsets = [{i for i in order if source_of(i, sizes) == s and Counter(order)[i] > count // size}
                       for order in orders]  # fmt: skip
            assert subsets[0] != subsets[1] or subsets[1] != subsets[2], (s, size, count)


def test_one_source_is_the_plain_epoch_order() -> None:
    """A mixture of one source (data.mixture with one entry) orders exactly as data.path does."""
    from tunefleet.distributed.sampler import epoch_samples

    assert epoch_samples([37], [5.0], seed=SEED, epoch=2) == epoch_order(37, seed=SEED, epoch=2)


@pytest.mark.parametrize("grouped", [False, True], ids=["in-order", "grouped"])
@pytest.mark.parametrize(("sizes", "weights"), MIXES)
def test_mixture_steps_are_the_same_for_world_size_1_and_2(
    sizes: list[int], weights: list[float], grouped: bool
) -> None:
    """Every optimizer step holds the same samples on 1 process (accumulation 4) and on 2 (2 each),
    with and without batch.group_by_length; and they are the mixture's order."""
    lengths = long_tailed_lengths(sum(sizes)) if grouped else None
    steps: dict[int, list[list[int]]] = {}
    for world in (1, 2):
        per_rank = []
        for rank in range(world):
            s = mixture_sampler(sizes, weights, global_=8, micro=1, world=world, rank=rank, lengths=lengths)
            s.set_epoch(1)
            per_rank.append(list(s))
        accum = 8 // world
        steps[world] = [step_union(per_rank, k, accum) for k in range(sum(sizes) // 8)]
    order = mixture_order(sizes, weights, seed=SEED, epoch=1)
    assert steps[1] == steps[2] == [sorted(order[k * 8 : (k + 1) * 8]) for k in range(sum(sizes) // 8)]


def test_mixture_seek_matches_the_full_pass() -> None:
    """Resuming a mixture: seeking to (epoch, step) continues the order exactly (no replay)."""
    sizes, weights = [30, 50], [3.0, 1.0]
    lengths = long_tailed_lengths(80)
    for rank in range(2):
        full = mixture_sampler(sizes, weights, global_=8, micro=2, world=2, rank=rank, lengths=lengths)
        full.set_epoch(2)
        everything = list(full)
        s = mixture_sampler(sizes, weights, global_=8, micro=2, world=2, rank=rank, lengths=lengths)
        s.seek(epoch=2, step_in_epoch=3)
        assert list(s) == everything[3 * 2 :]


def test_a_bad_mixture_is_refused() -> None:
    batch = plan_batch(micro_batch_size=2, global_batch_size=8, max_length=8, world_size=1)
    for sizes, weights in (([10, 0], [1.0, 1.0]), ([10, 10], [1.0, 0.0]), ([10, 10], [1.0])):
        with pytest.raises(ValueError, match="positive size and weight per source"):
            GlobalBatchSampler(sizes, weights=weights, batch=batch, steps_per_epoch=2, rank=0, seed=SEED)
