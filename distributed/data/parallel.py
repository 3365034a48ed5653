"""Tokenise a split on several processes into Arrow shards (`build`); map them back (`load`).

The rows are cut into chunks in order; each chunk is tokenised by `batched.Batcher` in a worker
process (forked: the rows are shared with the parent, not copied through pipes) and written as
one Arrow file, so no process ever holds every example as Python lists. The shards, read in
order, are the examples of the per-row reference in the same order. Every rank of a run then
memory-maps the same files (`load`).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunefleet.distributed.data.batched import Batcher
from tunefleet.distributed.data.counts import Tally
from tunefleet.distributed.data.progress import RowProgress
from tunefleet.distributed.data.tokenization import check_examples_left

if TYPE_CHECKING:  # pragma: no cover
    from tunefleet.launch.core.recipe import DataConfig

MIN_ROWS_PER_PROC = 2000
"""With `data.num_proc` unset, a process per this many rows at most (starting one costs more)."""

MAX_AUTO_PROCS = 32

CHUNK_ROWS = (64, 2048)
"""Rows per chunk, at least and at most: small enough to show progress and share the work out,
big enough that each tokenizer call carries many rows."""


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_procs(rows: int, asked: int | None) -> int:
    """`data.num_proc`, or one process per CPU core this process may use (at most MAX_AUTO_PROCS),
    no more than one per MIN_ROWS_PER_PROC rows. Forked workers need Linux: elsewhere 1."""
    if not sys.platform.startswith("linux"):
        return 1
    if asked is not None:
        return max(1, min(asked, max(rows, 1)))
    return max(1, min(available_cpus(), MAX_AUTO_PROCS, rows // MIN_ROWS_PER_PROC))


@dataclass(frozen=True)
class Built:
    """A split tokenised into `out_dir`."""

    shards: list[str]
    """Arrow files in `out_dir`, in row order (chunks whose rows were all dropped have none)."""
    stats: dict[str, int]
    """`Tally.to_dict()` of the split."""
    procs: int
    notes: list[str]


_JOB: dict[str, Any] = {}
"""What every worker needs, set before the workers are forked (so they share it, not copy it)."""

_BATCHER: dict[int, Batcher] = {}
"""This process's Batcher (by process id: a forked worker makes its own)."""


def _worker_signals() -> None:
    """A worker takes the default SIGTERM/SIGUSR1 (die) whatever its parent had installed (a
    training run's checkpoint-and-stop flag, a launcher's forwarding), so the pool's terminate
    always ends it; Ctrl-C is the parent's to handle."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run(task: tuple[int, int, int]) -> tuple[str | None, dict[str, int], list[str]]:
    index, start, stop = task
    job = _JOB
    batcher = _BATCHER.get(os.getpid())
    if batcher is None:
        batcher = _BATCHER[os.getpid()] = Batcher(job["tokenizer"], job["cfg"])
    tally = Tally()
    examples = batcher.rows(job["rows"][start:stop], start + 1, job["where"], tally)
    name = None
    if examples:
        name = f"shard-{index:05d}.arrow"
        _write(Path(job["out_dir"]) / name, examples)
    notes, batcher.notes = batcher.notes, []
    return name, tally.to_dict(), notes


def _write(path: Path, examples: list[dict]) -> None:
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    table = pa.table(
        {
            "input_ids": pa.array([e["input_ids"] for e in examples], type=ids),
            "labels": pa.array([e["labels"] for e in examples], type=ids),
        }
    )
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


@contextlib.contextmanager
def _single_threaded_tokenizers() -> Iterator[None]:
    """Workers each tokenise on one thread (there is a process per core), and the `tokenizers`
    library says nothing about being forked after its threads ran."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)


def build(
    rows: Sequence[dict],
    *,
    cfg: DataConfig,
    tokenizer: Any,
    where: str,
    out_dir: Path,
    procs: int,
    display: RowProgress | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> Built:
    """Tokenise `rows` into Arrow shards in `out_dir` (created) with `procs` processes; `display`
    shows the progress, `on_rows(rows_done)` hears of it after each chunk. Raises the first bad
    row's DataError, as the reference would; or DataError when no example is left."""
    out_dir.mkdir(parents=True, exist_ok=True)
    chunk = max(CHUNK_ROWS[0], min(CHUNK_ROWS[1], -(-len(rows) // max(procs * 4, 1))))
    tasks = [(i, start, min(start + chunk, len(rows))) for i, start in enumerate(range(0, len(rows), chunk))]
    _JOB.update(rows=rows, cfg=cfg, tokenizer=tokenizer, where=where, out_dir=str(out_dir))
    tally, shards, notes = Tally(), [], []
    try:
        with contextlib.ExitStack() as stack:
            if procs > 1:
                stack.enter_context(_single_threaded_tokenizers())
                pool = stack.enter_context(
                    multiprocessing.get_context("fork").Pool(procs, initializer=_worker_signals)
                )
                results: Iterator = pool.imap(_run, tasks)
            else:
                results = map(_run, tasks)
            if display is not None:  # after the fork: its refresh thread must not be forked
                stack.enter_context(display)
            for (_, _, stop), (name, stats, new_notes) in zip(tasks, results, strict=True):
                tally.merge(stats)
                shards += [name] if name else []
                notes += [n for n in new_notes if n not in notes]
                if display is not None:
                    display.update(stop)
                if on_rows is not None:
                    on_rows(stop)
    finally:
        _JOB.clear()
        _BATCHER.clear()
    check_examples_left(tally, cfg=cfg, where=where)
    return Built(shards=shards, stats=tally.to_dict(), procs=procs, notes=notes)


def load(out_dir: Path, shards: Sequence[str]) -> Any:
    """The shards as one `datasets.Dataset`, memory-mapped (nothing is read into memory)."""
    from datasets import Dataset, concatenate_datasets

    parts = [Dataset.from_file(str(out_dir / name)) for name in shards]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)
