"""What tokenisation kept, cut and dropped, counted row by row (`Tally`).

Every path that tokenises a split (the per-row reference in `tokenization.py`, the batched one in
`batched.py`, each worker process of `parallel.py`) adds its rows to a `Tally`; tallies of
several workers add up. `Tally.to_dict()` is the `stats` that `tunefleet prepare` writes to its
cache and that the run summary, `tunefleet plan` and plan.json turn into words
(`tunefleet.launch.prep_report`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100
"""Label of the tokens that take no part in the loss (the value PyTorch's cross-entropy skips)."""


@dataclass
class Tally:
    """Counts over the rows of one split. A row is kept (an example), or dropped for one reason."""

    rows: int = 0
    examples: int = 0
    tokens: int = 0
    """Tokens of the kept examples, after truncation."""
    labelled_tokens: int = 0
    """Of those, the tokens trained on."""
    max_tokens: int = 0
    """The longest row before truncation (a lower bound when `bounded_rows` > 0)."""
    truncated: int = 0
    """Rows longer than data.max_length (kept or dropped)."""
    answer_cut: int = 0
    """Kept rows that lost answer tokens to truncation."""
    tail_cut: int = 0
    """Kept rows that lost only tokens after their last answer (template text, a trailing turn)."""
    dropped_truncated: int = 0
    """Rows dropped because truncation left no answer token."""
    dropped_empty: int = 0
    """Rows dropped because they have no answer token at all, truncated or not."""
    answers: int = 0
    """Answers in the rows (assistant turns, alpaca outputs, completions; none for `text`)."""
    empty_answers: int = 0
    """Of those, the empty or blank ones."""
    bounded_rows: int = 0
    """Rows so long that only a prefix of their text was tokenised (`tokenization.bound_chars`)."""
    reference_rows: int = 0
    """Rows the batched path handed to the per-row reference (a shape or template it cannot prove)."""

    def add(
        self,
        input_ids: list[int],
        labels: list[int],
        *,
        max_length: int,
        more_labelled: bool,
        answers: int,
        empty_answers: int,
    ) -> dict[str, list[int]] | None:
        """Count one row given its untruncated tokens (or, for a bounded row, the first
        max_length + 1 of them and whether answer tokens follow); return the example, or None
        when it is dropped."""
        self.rows += 1
        self.answers += answers
        self.empty_answers += empty_answers
        self.max_tokens = max(self.max_tokens, len(input_ids))
        had_labels = more_labelled or labels.count(IGNORE_INDEX) < len(labels)
        cut = len(input_ids) > max_length
        if cut:
            self.truncated += 1
            tail = labels[max_length:]
            lost_labels = more_labelled or tail.count(IGNORE_INDEX) < len(tail)
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        n_labelled = len(labels) - labels.count(IGNORE_INDEX)
        if n_labelled == 0:
            if had_labels:
                self.dropped_truncated += 1
            else:
                self.dropped_empty += 1
            return None
        if cut:
            if lost_labels:
                self.answer_cut += 1
            else:
                self.tail_cut += 1
        self.examples += 1
        self.tokens += len(input_ids)
        self.labelled_tokens += n_labelled
        return {"input_ids": input_ids, "labels": labels}

    def merge(self, other: Tally | dict[str, Any]) -> None:
        values = other.to_dict() if isinstance(other, Tally) else other
        for f in dataclasses.fields(self):
            current = getattr(self, f.name)
            value = values.get(f.name, 0)
            setattr(self, f.name, max(current, value) if f.name == "max_tokens" else current + value)

    def to_dict(self) -> dict[str, int]:
        """The counts, plus `dropped_no_labels` (both kinds of drop; the key older caches have)."""
        out = dataclasses.asdict(self)
        out["dropped_no_labels"] = self.dropped_truncated + self.dropped_empty
        return out
