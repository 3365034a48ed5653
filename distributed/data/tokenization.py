"""Rows to token ids and labels, in each of the four formats (see the package docstring)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tunefleet.distributed.data.chat import (
    chat_template,
    columns_to_messages,
    messages_spans,
    render,
    validate_messages,
)
from tunefleet.distributed.data.loading import short_repr
from tunefleet.launch.core.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from tunefleet.launch.core.recipe import DataConfig

IGNORE_INDEX = -100
"""Label of the tokens that take no part in the loss (the value PyTorch's cross-entropy skips)."""


def alpaca_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 — the alpaca field name
    """Seed 000's prompt: the template up to and including ``### Response:\\n``. The
    ``### Input:`` block is left out when `input` is empty or whitespace."""
    if input and input.strip():
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def _field(row: dict, key: str, where: str, fmt: str, *, required: bool = True) -> Any:
    if not isinstance(row, dict):
        raise DataError(
            f"{where}: expected an object, got {type(row).__name__}", "write each example as an object"
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


def _format_fix(fmt: str, row: dict) -> str:
    keys = set(row) if isinstance(row, dict) else set()
    if "messages" in keys or "conversations" in keys:
        return "this looks like chat data: set data.format=messages (and data.messages_field if needed)"
    if {"instruction", "output"} <= keys:
        return "this looks like alpaca data: set data.format=alpaca"
    if {"prompt", "completion"} <= keys:
        return "this looks like prompt/completion data: set data.format=prompt-completion"
    return {
        "alpaca": "alpaca rows need instruction, output and optionally input",
        "prompt-completion": "prompt-completion rows need prompt and completion strings",
        "text": "set data.text_field to the column holding the text",
        "messages": "set data.messages_field to the column holding the conversation",
    }.get(fmt, "check data.format")


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def encode_pieces(tokenizer: Any, text: str, cuts: Sequence[int]) -> list[list[int]]:
    """Token ids of ``text`` cut at the character positions `cuts`, one list per piece.

    A piece's ids are the new tail of ``encode(text[:cut])`` when that extends the ids so far
    (no token crosses the cut: the result equals ``encode(text)``), else the piece is encoded on
    its own (a token would straddle the cut — e.g. ``"\\n" + "\\nanswer"`` merging into one
    ``"\\n\\n"`` token — so the prompt keeps its inference-time tokenisation and the answer's
    tokens decode to exactly the answer).
    """
    bounds = sorted({c for c in cuts if 0 < c < len(text)} | {len(text)})
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


def _labelled(
    tokenizer: Any,
    text: str,
    spans: list[tuple[int, int]],
    *,
    prefix: list[int],
    suffix: list[int],
    label_all: bool,
) -> tuple[list[int], list[int]]:
    """Tokenise `text`; label the tokens inside `spans` (or all of them) plus `suffix`."""
    cuts = [c for span in spans for c in span]
    bounds = sorted({c for c in cuts if 0 < c < len(text)} | {len(text)})
    pieces = encode_pieces(tokenizer, text, cuts)
    input_ids = list(prefix)
    labels = [IGNORE_INDEX] * len(prefix)
    start = 0
    for end, piece in zip(bounds, pieces, strict=True):
        inside = label_all or any(s <= start and end <= e for s, e in spans)
        input_ids.extend(piece)
        labels.extend(piece if inside else [IGNORE_INDEX] * len(piece))
        start = end
    input_ids.extend(suffix)
    labels.extend(suffix)
    return input_ids, labels


def _tokenize_untruncated(
    row: dict,
    *,
    fmt: str,
    tokenizer: Any,
    completion_only_loss: bool,
    text_field: str,
    messages_field: str,
    where: str,
) -> tuple[list[int], list[int]]:
    if fmt in ("alpaca", "prompt-completion"):
        if fmt == "alpaca":
            instruction = _string(row, "instruction", where, fmt)
            inp = _string(row, "input", where, fmt, required=False)
            prompt, completion = alpaca_prompt(instruction, inp), _string(row, "output", where, fmt)
        else:
            prompt = _string(row, "prompt", where, fmt)
            completion = _string(row, "completion", where, fmt)
        text = prompt + completion
        return _labelled(
            tokenizer,
            text,
            [(len(prompt), len(text))],
            prefix=special_prefix(tokenizer),
            suffix=[eos_id(tokenizer)],
            label_all=not completion_only_loss,
        )
    if fmt == "text":
        text = _string(row, text_field, where, fmt)
        if not text.strip():
            raise DataError(f"{where}: {text_field!r} is empty", "remove the row or fill in the text")
        return _labelled(
            tokenizer,
            text,
            [(0, len(text))],
            prefix=special_prefix(tokenizer),
            suffix=[eos_id(tokenizer)],
            label_all=True,
        )
    if fmt == "messages":
        raw = row.get(messages_field)
        if raw is None and messages_field not in row:
            raw = columns_to_messages(row)  # seed 003's system/user/assistant columns
        messages = validate_messages(
            raw if raw is not None else _field(row, messages_field, where, fmt), where, messages_field
        )
        chat_template(tokenizer)
        if not completion_only_loss:
            text = render(tokenizer, messages, where, add_generation_prompt=False)
            return _labelled(tokenizer, text, [(0, len(text))], prefix=[], suffix=[], label_all=True)
        text, spans = messages_spans(tokenizer, messages, where)
        return _labelled(tokenizer, text, spans, prefix=[], suffix=[], label_all=False)
    raise DataError(f"unknown data.format {fmt!r}", "use alpaca, messages, text or prompt-completion")


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
    input_ids, labels = _tokenize_untruncated(
        row,
        fmt=fmt,
        tokenizer=tokenizer,
        completion_only_loss=completion_only_loss,
        text_field=text_field,
        messages_field=messages_field,
        where=where or "row",
    )
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def build_dataset(
    rows: Sequence[dict], *, cfg: DataConfig, tokenizer: Any, where: str
) -> tuple[list[dict], dict]:
    """Tokenise every row with the recipe's data settings.

    Returns ``(examples, stats)``: `examples` are ``{"input_ids", "labels"}`` dicts of lists;
    examples with no labelled token left after truncation are dropped. `stats` has ``rows``,
    ``examples``, ``dropped_no_labels``, ``truncated``, ``tokens`` and ``labelled_tokens``
    (counted after truncation) and ``max_tokens`` (longest example before truncation).
    `where` names the source in errors (``"{where} row {n}"``, n from 1).
    """
    examples: list[dict] = []
    stats = {
        "rows": len(rows),
        "examples": 0,
        "dropped_no_labels": 0,
        "truncated": 0,
        "tokens": 0,
        "labelled_tokens": 0,
        "max_tokens": 0,
    }
    for n, row in enumerate(rows, start=1):
        input_ids, labels = _tokenize_untruncated(
            row,
            fmt=cfg.format,
            tokenizer=tokenizer,
            completion_only_loss=cfg.completion_only_loss,
            text_field=cfg.text_field,
            messages_field=cfg.messages_field,
            where=f"{where} row {n}",
        )
        stats["max_tokens"] = max(stats["max_tokens"], len(input_ids))
        if len(input_ids) > cfg.max_length:
            stats["truncated"] += 1
            input_ids, labels = input_ids[: cfg.max_length], labels[: cfg.max_length]
        n_labelled = sum(1 for t in labels if t != IGNORE_INDEX)
        if n_labelled == 0:
            stats["dropped_no_labels"] += 1
            continue
        examples.append({"input_ids": input_ids, "labels": labels})
        stats["tokens"] += len(input_ids)
        stats["labelled_tokens"] += n_labelled
    stats["examples"] = len(examples)
    if not examples:
        detail = (
            (
                f"all {len(rows)} rows lost every answer token to truncation at "
                f"data.max_length={cfg.max_length}"
            )
            if rows
            else "there are no rows"
        )
        raise DataError(
            f"{where}: no training examples left: {detail}",
            "raise data.max_length or shorten the prompts" if rows else "add data",
        )
    return examples, stats
