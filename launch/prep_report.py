"""What tokenising the data kept, cut and dropped, in words.

The one home of the reasons a row is dropped or cut, of when a count becomes a warning, and of
the lines that `tunefleet prepare`, the run summary, `tunefleet plan` and plan.json show. Pure:
it reads the counts of a tokenised split (`distributed.data.counts.Tally.to_dict()`) and the
recipe's data settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MOST_CUT = 0.5
"""More than this share of the rows with answers losing answer tokens to truncation: a warning."""

EMPTY_ANSWERS = 0.25
"""This share of the answers or more empty: a warning."""

DROPPED_TRUNCATED = "no answer token left after truncation"
DROPPED_EMPTY = "empty answer (no token to train on)"
ANSWER_CUT = "answer cut at data.max_length"
TAIL_CUT = "only text after the last answer cut"
TEXT_CUT = "text cut at data.max_length"


def dropped(stats: Mapping[str, Any]) -> dict[str, int]:
    """Rows dropped, by reason (only reasons that happened)."""
    counts = {
        DROPPED_TRUNCATED: stats.get("dropped_truncated", 0),
        DROPPED_EMPTY: stats.get("dropped_empty", 0),
    }
    return {reason: n for reason, n in counts.items() if n}


def truncated(stats: Mapping[str, Any], fmt: str) -> dict[str, int]:
    """Kept rows that lost tokens to truncation, by what they lost."""
    cut = TEXT_CUT if fmt == "text" else ANSWER_CUT
    counts = {cut: stats.get("answer_cut", 0), TAIL_CUT: stats.get("tail_cut", 0)}
    return {reason: n for reason, n in counts.items() if n}


def warnings(stats: Mapping[str, Any], *, max_length: int, fmt: str) -> list[str]:
    """Counts that probably mean the data or data.max_length is not what the user meant."""
    out = []
    with_answers = stats.get("rows", 0) - stats.get("dropped_empty", 0)
    cut = stats.get("answer_cut", 0) + stats.get("dropped_truncated", 0)
    if with_answers and cut > MOST_CUT * with_answers:
        what = "texts" if fmt == "text" else "answers"
        longest = f"{stats.get('max_tokens', 0):,}" + ("+" if stats.get("bounded_rows") else "")
        out.append(
            f"most {what} are cut: {cut:,} of {with_answers:,} rows ({100 * cut / with_answers:.0f}%) lose "
            f"{what[:-1]} tokens at data.max_length={max_length} (the longest row has {longest} tokens); "
            "raise data.max_length or shorten the data"
        )
    answers, empty = stats.get("answers", 0), stats.get("empty_answers", 0)
    if answers and empty >= EMPTY_ANSWERS * answers:
        out.append(
            f"{empty:,} of {answers:,} answers ({100 * empty / answers:.0f}%) are empty: the model learns to "
            "stop without answering; check the answer fields of the data"
        )
    return out


def summary(stats: Mapping[str, Any], *, max_length: int, fmt: str) -> dict[str, Any]:
    """The `data_preparation` section of plan.json."""
    return {
        "format": fmt,
        "rows": stats.get("rows", 0),
        "examples": stats.get("examples", 0),
        "max_length": max_length,
        "dropped": dropped(stats),
        "truncated": truncated(stats, fmt),
        "answers": stats.get("answers", 0),
        "empty_answers": stats.get("empty_answers", 0),
        "longest_tokens": stats.get("max_tokens", 0),
        "bounded_rows": stats.get("bounded_rows", 0),
        "warnings": warnings(stats, max_length=max_length, fmt=fmt),
        "counts": dict(stats),
    }


def lines(stats: Mapping[str, Any], *, max_length: int, fmt: str) -> list[tuple[str, str]]:
    """(label, text) lines for a summary table: what was dropped and cut, and why."""
    out = []
    gone = dropped(stats)
    if gone:
        out.append(("dropped", _reasons(gone, max_length)))
    cut = truncated(stats, fmt)
    if cut:
        out.append(("truncated", _reasons(cut, max_length)))
    if stats.get("empty_answers"):
        out.append(("empty answers", f"{stats['empty_answers']:,} of {stats.get('answers', 0):,}"))
    if stats.get("bounded_rows"):
        out.append(
            (
                "long rows",
                f"{stats['bounded_rows']:,} row(s) far longer than data.max_length: only the start of their "
                "text was tokenised",
            )
        )
    return out


def _reasons(counts: Mapping[str, int], max_length: int) -> str:
    def said(reason: str) -> str:
        if reason == DROPPED_TRUNCATED:
            reason += " at data.max_length"
        return reason.replace("data.max_length", f"data.max_length={max_length}")

    parts = ", ".join(f"{n:,} {said(reason)}" for reason, n in counts.items())
    return f"{sum(counts.values()):,} row(s): {parts}"
