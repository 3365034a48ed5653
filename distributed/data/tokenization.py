"""Rows to token ids and labels, in each of the four formats (see the package docstring).

This is the per-row reference: `render_row` turns a row into the text to tokenise and the
character spans that are trained on, `_labelled` tokenises it piece by piece
(`encode_pieces`). `batched.py` computes the same ids and labels for many rows at once and is
compared with this module row by row; it falls back to it for what it cannot prove.

A row far longer than data.max_length is tokenised from a prefix of its text only
(`labelled_bounded`): memory and time stay bounded by data.max_length, not by the row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tunefleet.distributed.data.chat import (
    chat_template,
    columns_to_messages,
    messages_spans,
    render,
    validate_messages,
)
from tunefleet.distributed.data.counts import IGNORE_INDEX, Tally
from tunefleet.distributed.data.loading import short_repr
from tunefleet.launch.core.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from tunefleet.launch.core.recipe import DataConfig

__all__ = ["IGNORE_INDEX", "Rendered", "Tally", "build_dataset", "render_row", "tokenize_example"]

SpansFn = Callable[[Any, list[dict], str], tuple[str, list[tuple[int, int]]]]
"""`chat.messages_spans` or a function that returns exactly what it returns."""


def alpaca_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 — the alpaca field name
    """Seed 000's prompt: the template up to and including ``### Response:\\n``. The
    ``### Input:`` block is left out when `input` is empty or whitespace."""
    if input and input.strip():
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


# ----------------------------------------------------------------------------- fields of a row


def _field(row: dict, key: str, where: str, fmt: str, *, required: bool = True) -> Any:
    if not isinstance(row, dict):
        raise DataError(
            f"{where}: expected an object, got {type(row).__name__}", "write each example as an object"
        )
    if key in row and row[key] is None and required:
        raise DataError(
            f"{where}: {key!r} is null in this row", f"give {key!r} a value in this row, or remove the row"
        )
    if key not in row or row[key] is None:
        if not required:
            return None
        keys = ", ".join(map(str, row)) or "none"
        raise DataError(
            f"{where}: the {fmt} format needs the field {key!r} (the row has: {keys})",
            _format_fix(fmt, row),
        )
    return row[key]


def _string(row: dict, key: str, where: str, fmt: str, *, required: bool = True) -> str:
    value = _field(row, key, where, fmt, required=required)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(
            f"{where}: {key!r} must be a string, got {type(value).__name__} {short_repr(value)}",
            f"write {key!r} as text"
            + (" (use data.format=messages for chat turns)" if isinstance(value, list) else ""),
        )
    return value


def _looks_like(row: dict) -> str | None:
    """The format a row's keys suggest, or None."""
    keys = set(row) if isinstance(row, dict) else set()
    if "messages" in keys or "conversations" in keys:
        return "messages"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt-completion"
    return None


def _format_fix(fmt: str, row: dict) -> str:
    looks = _looks_like(row)
    if looks is not None and looks != fmt:
        return {
            "messages": "this looks like chat data: set data.format=messages (and data.messages_field if needed)",
            "alpaca": "this looks like alpaca data: set data.format=alpaca",
            "prompt-completion": "this looks like prompt/completion data: set data.format=prompt-completion",
        }[looks]
    return {
        "alpaca": "alpaca rows need instruction, output and optionally input",
        "prompt-completion": "prompt-completion rows need prompt and completion strings",
        "text": "set data.text_field to the column holding the text",
        "messages": "set data.messages_field to the column holding the conversation",
    }.get(fmt, "check data.format")


def _missing_conversation(row: dict, field: str, where: str) -> DataError:
    """data.format=messages, and the row has no conversation under data.messages_field."""
    if field in row:  # present but null (a missing key would have found the columns)
        return DataError(
            f"{where}: {field!r} is null in this row",
            "give the row its conversation as a list of {role, content} turns, or remove the row",
        )
    for key, value in row.items() if isinstance(row, dict) else ():
        turns = value if isinstance(value, list) and value and isinstance(value[0], dict) else None
        if turns is None:
            continue
        if {"from", "value"} <= set(turns[0]):
            return DataError(
                f"{where}: the row has no {field!r} field; its {key!r} field holds ShareGPT turns (from/value)",
                f"set data.messages_field={key} and convert the turns to role/content "
                "(from human -> role user, gpt -> assistant, system -> system; value -> content)",
            )
        if {"role", "content"} <= set(turns[0]):
            return DataError(
                f"{where}: the row has no {field!r} field; its {key!r} field holds the turns",
                f"set data.messages_field={key}",
            )
    keys = ", ".join(map(str, row)) or "none"
    return DataError(
        f"{where}: the messages format needs the field {field!r} (the row has: {keys})",
        _format_fix("messages", row),
    )


# ----------------------------------------------------------------------------- encoding


def encode(tokenizer: Any, text: str) -> list[int]:
    # verbose=False: no "Token indices sequence length is longer than ..." warning; tunefleet
    # truncates to data.max_length itself
    return list(tokenizer.encode(text, add_special_tokens=False, verbose=False)) if text else []


def encode_pieces(tokenizer: Any, text: str, cuts: Sequence[int]) -> list[list[int]]:
    """Token ids of ``text`` cut at the character positions `cuts`, one list per piece.

    A piece's ids are the new tail of ``encode(text[:cut])`` when that extends the ids so far
    (no token crosses the cut: the result equals ``encode(text)``), else the piece is encoded on
    its own (a token would straddle the cut — e.g. ``"\\n" + "\\nanswer"`` merging into one
    ``"\\n\\n"`` token — so the prompt keeps its inference-time tokenisation and the answer's
    tokens decode to exactly the answer).
    """
    bounds = piece_bounds(text, cuts)
    ids: list[int] = []
    pieces: list[list[int]] = []
    start = 0
    for end in bounds:
        whole = encode(tokenizer, text[:end])
        if whole[: len(ids)] == ids:
            piece = whole[len(ids) :]
        else:
            piece = encode(tokenizer, text[start:end])
        pieces.append(piece)
        ids.extend(piece)
        start = end
    return pieces


def piece_bounds(text: str, cuts: Sequence[int]) -> list[int]:
    """Where the pieces of `text` end: the cuts inside it, and its end."""
    return sorted({c for c in cuts if 0 < c < len(text)} | {len(text)})


def special_prefix(tokenizer: Any) -> list[int]:
    """Ids the tokenizer puts before a text by itself (e.g. Llama's BOS); [] for most chat models."""
    probe = "x"
    with_special = list(tokenizer.encode(probe, add_special_tokens=True))
    without = list(tokenizer.encode(probe, add_special_tokens=False))
    for k in range(len(with_special) - len(without) + 1):
        if with_special[k : k + len(without)] == without:
            return with_special[:k]
    return []


def eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError(
            "the tokenizer has no eos token, so the model could not learn where an answer ends",
            "use a tokenizer with an eos token (set tokenizer.eos_token) or data.format=messages",
        )
    return int(eos)


# ----------------------------------------------------------------------------- rows to text and spans


@dataclass(frozen=True)
class Rendered:
    """One row as the text to tokenise and what of it is trained on."""

    text: str
    spans: list[tuple[int, int]]
    """Character spans of `text` that are trained on (answers)."""
    prefix: list[int]
    """Ids before the text (the tokenizer's bos for alpaca/prompt-completion/text); never trained on."""
    suffix: list[int]
    """Ids after the text (eos for alpaca/prompt-completion/text); always trained on."""
    label_all: bool
    """Train on every token of the text (completion_only_loss off, or the text format)."""
    answers: int = 0
    empty_answers: int = 0


def render_row(
    row: dict,
    *,
    fmt: str,
    tokenizer: Any,
    completion_only_loss: bool,
    text_field: str,
    messages_field: str,
    where: str,
    spans: SpansFn = messages_spans,
) -> Rendered:
    """The text of one row and its trained-on spans. `spans` finds the answers of a conversation
    (the reference `chat.messages_spans`, or `skeleton.fast_messages_spans`, which returns the same)."""
    if fmt in ("alpaca", "prompt-completion"):
        if fmt == "alpaca":
            instruction = _string(row, "instruction", where, fmt)
            inp = _string(row, "input", where, fmt, required=False)
            prompt, completion = alpaca_prompt(instruction, inp), _string(row, "output", where, fmt)
        else:
            prompt = _string(row, "prompt", where, fmt)
            completion = _string(row, "completion", where, fmt)
        text = prompt + completion
        return Rendered(
            text,
            [(len(prompt), len(text))],
            special_prefix(tokenizer),
            [eos_id(tokenizer)],
            label_all=not completion_only_loss,
            answers=1,
            empty_answers=int(not completion.strip()),
        )
    if fmt == "text":
        text = _string(row, text_field, where, fmt)
        if not text.strip():
            raise DataError(f"{where}: {text_field!r} is empty", "remove the row or fill in the text")
        return Rendered(
            text, [(0, len(text))], special_prefix(tokenizer), [eos_id(tokenizer)], label_all=True
        )
    if fmt == "messages":
        raw = row.get(messages_field) if isinstance(row, dict) else None
        if raw is None and isinstance(row, dict) and messages_field not in row:
            raw = columns_to_messages(row)  # seed 003's system/user/assistant columns
        if raw is None:
            raise _missing_conversation(row, messages_field, where)
        messages = validate_messages(raw, where, messages_field)
        chat_template(tokenizer)
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        empty = sum(1 for a in answers if not a.strip())
        if not completion_only_loss:
            text = render(tokenizer, messages, where, add_generation_prompt=False)
            return Rendered(text, [(0, len(text))], [], [], True, len(answers), empty)
        text, found = spans(tokenizer, messages, where)
        return Rendered(text, found, [], [], False, len(answers), empty)
    raise DataError(f"unknown data.format {fmt!r}", "use alpaca, messages, text or prompt-completion")


# ----------------------------------------------------------------------------- text to ids and labels


def assemble(
    text: str, r: Rendered, bounds: Sequence[int], pieces: Sequence[list[int]]
) -> tuple[list[int], list[int]]:
    """Ids and labels from the pieces of `text` (ending at `bounds`): a piece inside a span is
    trained on; the prefix never is, the suffix always is."""
    input_ids = list(r.prefix)
    labels = [IGNORE_INDEX] * len(r.prefix)
    start = 0
    for end, piece in zip(bounds, pieces, strict=True):
        inside = r.label_all or any(s <= start and end <= e for s, e in r.spans)
        input_ids.extend(piece)
        labels.extend(piece if inside else [IGNORE_INDEX] * len(piece))
        start = end
    input_ids.extend(r.suffix)
    labels.extend(r.suffix)
    return input_ids, labels


def _labelled(tokenizer: Any, r: Rendered) -> tuple[list[int], list[int]]:
    """Tokenise the whole text (the reference)."""
    cuts = [c for span in r.spans for c in span]
    return assemble(r.text, r, piece_bounds(r.text, cuts), encode_pieces(tokenizer, r.text, cuts))


_LONGEST_TOKEN: dict[int, tuple[Any, int]] = {}


def bound_chars(tokenizer: Any, keep_tokens: int) -> int:
    """Characters that, in practice, hold the first `keep_tokens` tokens: `keep_tokens` of the
    vocabulary's longest token, plus a margin. `labelled_bounded` checks the guess (two prefix
    lengths must give the same first tokens) and doubles it when it does not hold."""
    cached = _LONGEST_TOKEN.get(id(tokenizer))
    if cached is None or cached[0] is not tokenizer:
        try:
            longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
        except Exception:  # noqa: BLE001 — a tokenizer without a vocabulary listing
            longest = 64
        cached = _LONGEST_TOKEN[id(tokenizer)] = (tokenizer, max(longest, 1))
    return (keep_tokens + 16) * cached[1] + 1024


@dataclass(frozen=True)
class Labelled:
    """Tokens of one row: all of them, or (bounded) the first keep_tokens + 1 of them."""

    input_ids: list[int]
    labels: list[int]
    bounded: bool = False
    more_labelled: bool = False
    """Bounded rows only: answer tokens (a span, or the suffix) lie beyond the tokenised prefix."""


def labelled_bounded(tokenizer: Any, r: Rendered, keep_tokens: int | None) -> Labelled:
    """`_labelled`, but a text much longer than the first `keep_tokens` tokens need is tokenised
    from a prefix: at `bound_chars` characters and at twice that, which must agree on the first
    keep_tokens + 1 ids and labels (else both lengths double). The result then equals the first
    keep_tokens + 1 tokens of the whole text's; tokenising all of a 50 MB row is never needed."""
    chars = bound_chars(tokenizer, keep_tokens) if keep_tokens is not None else len(r.text)
    if 2 * chars >= len(r.text):
        return Labelled(*_labelled(tokenizer, r))
    assert keep_tokens is not None
    want = keep_tokens + 1
    first = _labelled_prefix(tokenizer, r, chars)
    while 2 * chars < len(r.text):
        second = _labelled_prefix(tokenizer, r, 2 * chars)
        if (
            len(first[0]) >= want
            and first[0][:want] == second[0][:want]
            and first[1][:want] == second[1][:want]
        ):
            more = bool(r.suffix) or r.label_all or any(e > chars for s, e in r.spans if e > s)
            return Labelled(first[0][:want], first[1][:want], bounded=True, more_labelled=more)
        chars, first = 2 * chars, second
    return Labelled(*_labelled(tokenizer, r))


def _labelled_prefix(tokenizer: Any, r: Rendered, chars: int) -> tuple[list[int], list[int]]:
    """`_labelled` of the first `chars` characters (spans clipped there, no suffix)."""
    spans = [(s, min(e, chars)) for s, e in r.spans if s < chars]
    clipped = Rendered(r.text[:chars], spans, r.prefix, [], r.label_all)
    return _labelled(tokenizer, clipped)


def tokenize_example(
    row: dict,
    *,
    fmt: str,
    tokenizer: Any,
    max_length: int,
    completion_only_loss: bool = True,
    text_field: str = "text",
    messages_field: str = "messages",
    where: str = "",
) -> dict[str, list[int]]:
    """Render and tokenise one row: ``{"input_ids": [...], "labels": [...]}`` (plain lists of
    equal length, at most `max_length`; label -100 = not trained on). See the module docstring
    for the formats and the masking. `where` (e.g. ``"data/chat.jsonl row 17"``) prefixes errors.
    """
    rendered = render_row(
        row,
        fmt=fmt,
        tokenizer=tokenizer,
        completion_only_loss=completion_only_loss,
        text_field=text_field,
        messages_field=messages_field,
        where=where or "row",
    )
    input_ids, labels = _labelled(tokenizer, rendered)
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def tokenize_row(row: dict, *, cfg: DataConfig, tokenizer: Any, where: str, tally: Tally) -> dict | None:
    """One row through the reference path, counted in `tally`: the example, or None if dropped."""
    r = render_row(
        row,
        fmt=cfg.format,
        tokenizer=tokenizer,
        completion_only_loss=cfg.completion_only_loss,
        text_field=cfg.text_field,
        messages_field=cfg.messages_field,
        where=where,
    )
    out = labelled_bounded(tokenizer, r, cfg.max_length)
    tally.bounded_rows += out.bounded
    return tally.add(
        out.input_ids,
        out.labels,
        max_length=cfg.max_length,
        more_labelled=out.more_labelled,
        answers=r.answers,
        empty_answers=r.empty_answers,
    )


def build_dataset(
    rows: Sequence[dict], *, cfg: DataConfig, tokenizer: Any, where: str
) -> tuple[list[dict], dict]:
    """Tokenise every row with the recipe's data settings, one by one (the reference; `tunefleet
    prepare` and runs use `parallel.build`, which gives the same examples).

    Returns ``(examples, stats)``: `examples` are ``{"input_ids", "labels"}`` dicts of lists;
    examples with no labelled token left after truncation are dropped. `stats` is
    `Tally.to_dict()`: rows, examples, truncated, the reasons rows were dropped or cut, tokens,
    answers and empty answers. `where` names the source in errors (``"{where} row {n}"``, n from 1).
    """
    tally = Tally()
    examples = []
    for n, row in enumerate(rows, start=1):
        example = tokenize_row(row, cfg=cfg, tokenizer=tokenizer, where=f"{where} row {n}", tally=tally)
        if example is not None:
            examples.append(example)
    check_examples_left(tally, cfg=cfg, where=where)
    return examples, tally.to_dict()


def check_examples_left(tally: Tally, *, cfg: DataConfig, where: str) -> None:
    """Every row was dropped: one error that says why."""
    if tally.examples:
        return
    if not tally.rows:
        detail, fix = "there are no rows", "add data"
    elif tally.dropped_truncated:
        detail = (
            f"all {tally.rows} rows lost every answer token to truncation at data.max_length={cfg.max_length}"
            if not tally.dropped_empty
            else f"{tally.dropped_truncated} of {tally.rows} rows lost every answer token to truncation at "
            f"data.max_length={cfg.max_length}, the other {tally.dropped_empty} have no answer token"
        )
        fix = "raise data.max_length or shorten the prompts"
    else:
        detail, fix = f"none of the {tally.rows} rows has an answer token", "fill in the answers"
    raise DataError(f"{where}: no training examples left: {detail}", fix)
