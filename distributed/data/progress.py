"""Progress of a long tokenisation: a rich bar with rows/s and the time left on a terminal; in a
log (not a terminal) a handful of plain lines at most, so job logs stay readable."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

MIN_ROWS = 2000
"""Fewer rows than this tokenise in a moment: no progress shown."""

LOG_EVERY_S = 30.0
"""In a log, a line at most this often (plus at each quarter and at the end)."""


class RowProgress:
    """`with RowProgress(total, "tokenising x.jsonl") as p: p.update(done)`."""

    def __init__(
        self, total: int, label: str, *, stream: TextIO | None = None, min_rows: int = MIN_ROWS
    ) -> None:
        self.total, self.label = total, label
        self.stream = stream or sys.stdout
        self.enabled = total >= min_rows and total > 0
        self.started = time.monotonic()
        self.bar: Any = None
        self.task: Any = None
        self.logged_at = self.started
        self.next_quarter = 1

    def __enter__(self) -> RowProgress:
        if not self.enabled:
            return self
        from rich.console import Console

        console = Console(file=self.stream)
        if console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn(f"[bold]{self.label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("rows {task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
            )
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=self.total, rate="")
        return self

    def _rate(self, done: int) -> float:
        return done / max(time.monotonic() - self.started, 1e-9)

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        rate = self._rate(done)
        if self.bar is not None:
            self.bar.update(self.task, completed=done, rate=f"({rate:,.0f}/s)")
            return
        now = time.monotonic()
        quarter = done * 4 >= self.next_quarter * self.total
        if done < self.total and (quarter or now - self.logged_at >= LOG_EVERY_S):
            while done * 4 >= self.next_quarter * self.total:
                self.next_quarter += 1
            self.logged_at = now
            eta = (self.total - done) / max(rate, 1e-9)
            print(
                f"{self.label}: {done:,}/{self.total:,} rows ({rate:,.0f} rows/s, ETA {eta:,.0f} s)",
                file=self.stream,
                flush=True,
            )

    def __exit__(self, *exc: Any) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.stop()
        elif exc[0] is None:
            elapsed = time.monotonic() - self.started
            print(
                f"{self.label}: {self.total:,} rows in {elapsed:,.1f} s ({self.total / max(elapsed, 1e-9):,.0f} rows/s)",
                file=self.stream,
                flush=True,
            )
