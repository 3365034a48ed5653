"""Training data: load rows, render them in one of four formats, tokenise with answer-only labels.

Pure functions over plain Python data; `datasets`, `pyarrow` and `transformers` are imported
only inside the functions that need them, so importing this module is cheap.

Formats (``data.format``):

* ``alpaca`` — rows with ``instruction``, optional ``input``, ``output``; rendered with seed
  000's template. The prompt is everything up to and including ``### Response:\\n``; the
  completion is ``output`` + the tokenizer's eos token.
* ``prompt-completion`` — rows with string ``prompt`` and ``completion``; same masking.
* ``text`` — plain text + eos; every token is labelled.
* ``messages`` — a list of ``{role, content}`` turns (system/user/assistant) rendered with the
  tokenizer's chat template. Only the assistant answers, each up to and including the
  end-of-turn token(s) the template writes after it, are labelled (seed 003).

How the answer tokens are found: every format is reduced to a rendered string plus the
character spans that are trained on (:func:`_messages_spans` for chat templates). The string
is then tokenised piece by piece at the span boundaries (:func:`_encode_pieces`): each piece is
the tail of the tokenisation of the whole text up to its end when that is a prefix-extension of
what came before (so, in the usual case, the ids are exactly the tokenisation of the full text),
and is tokenised on its own when a token would straddle the boundary. The labelled tokens
therefore always decode to exactly the answer text, and the prompt tokens are exactly what the
model sees at inference time (the prompt tokenised alone).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunefleet.launch.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from tunefleet.launch.recipe import DataConfig

IGNORE_INDEX = -100
"""Label of the tokens that take no part in the loss (the value PyTorch's cross-entropy skips)."""

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
"""File types read from local files and from directories of data files."""

ROLES = ("system", "user", "assistant")
"""Roles accepted in the `messages` format."""

_KNOWN_SPLITS = ("train", "test", "validation", "valid", "eval", "dev")
_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")


# ============================================================================ loading


def load_rows(
    path: str, *, split: str = "train", limit: int | None = None, what: str = "data.path"
) -> list[dict]:
    """Read the rows of a data source as a list of dicts.

    `path` is a local ``.jsonl``/``.json``/``.parquet`` file, a directory written by
    ``datasets.save_to_disk`` (a ``DatasetDict`` gives `split`), a directory of data files
    (the files named after `split`, or all of them for ``train`` when none is named after a
    split), or else a `datasets` dataset name loaded with ``load_dataset(path, split=split)``.
    `limit` keeps the first N rows. `what` names the recipe key in error messages.
    Raises :class:`DataError` (problem + fix) for anything missing, unreadable, malformed or empty.
    """
    if limit is not None and limit <= 0:
        raise DataError(f"{what}: limit must be > 0, got {limit}", "drop the limit or use a positive count")
    text = str(path).strip()
    if not text:
        raise DataError(f"{what} is empty", f"set {what} to a data file, a directory or a dataset name")
    local = Path(os.path.expanduser(text))
    if local.is_file():
        rows = _read_file(local, limit=limit, what=what)
    elif local.is_dir():
        rows = _read_dir(local, split=split, limit=limit, what=what)
    elif local.exists():
        raise DataError(f"{what}: {text!r} is neither a file nor a directory", f"point {what} at a data file")
    elif _looks_like_path(text):
        raise DataError(
            f"{what}: data file {text!r} does not exist (relative paths are read from {os.getcwd()})",
            f"fix {what}: give the path of a {'/'.join(DATA_SUFFIXES)} file or a dataset directory",
        )
    else:
        rows = _read_hub(text, split=split, limit=limit, what=what)
    if not rows:
        raise DataError(
            f"{what}: {text!r} holds no rows", f"point {what} at a file with at least one example"
        )
    return rows


def _looks_like_path(text: str) -> bool:
    if text.startswith(("/", "./", "../", "~", ".\\")) or "\\" in text:
        return True
    suffixes = "".join(Path(text).suffixes).lower()
    return any(suffixes.endswith(s) for s in (*DATA_SUFFIXES, ".csv", ".txt", ".arrow", ".gz"))


def _read_file(path: Path, *, limit: int | None, what: str) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, limit=limit, what=what)
    if suffix == ".json":
        return _read_json(path, limit=limit, what=what)
    if suffix == ".parquet":
        return _read_parquet(path, limit=limit, what=what)
    raise DataError(
        f"{what}: {str(path)!r} has an unsupported file type {suffix or '(no suffix)'!r}",
        f"convert it to one of {', '.join(DATA_SUFFIXES)} (one JSON object per line: .jsonl)",
    )


def _open_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{what}: {str(path)!r} is not UTF-8 text (byte {exc.start}: {exc.reason})",
            "re-save the file as UTF-8",
        ) from None
    except OSError as exc:
        raise DataError(
            f"{what}: {str(path)!r} cannot be read: {exc.strerror or exc}",
            "check the path and the file permissions",
        ) from None


def _check_object(obj: Any, where: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(
            f"{where}: expected a JSON object (one example), got {type(obj).__name__} {_short(obj)}",
            'write each example as an object, e.g. {"instruction": ..., "output": ...}',
        )
    return obj


def _read_jsonl(path: Path, *, limit: int | None, what: str) -> list[dict]:
    rows: list[dict] = []
    text = _open_text(path, what)
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if limit is not None and len(rows) >= limit:
            break
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{lineno}: malformed JSON line: {exc.msg} (column {exc.colno})",
                f"fix line {lineno} of {path}: each line must be one complete JSON object",
            ) from None
        rows.append(_check_object(obj, f"{path}:{lineno}"))
    return rows


def _read_json(path: Path, *, limit: int | None, what: str) -> list[dict]:
    text = _open_text(path, what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # a JSON Lines file named .json
            return _read_jsonl(path, limit=limit, what=what)
        raise DataError(
            f"{path}:{exc.lineno}: malformed JSON: {exc.msg} (column {exc.colno})",
            f"fix {path}: a .json data file is one JSON list of objects (use .jsonl for one per line)",
        ) from None
    if not isinstance(data, list):
        raise DataError(
            f"{what}: {str(path)!r} holds a JSON {type(data).__name__}, not a list of examples",
            "write the file as [{...}, {...}] or as JSON Lines (.jsonl)",
        )
    if limit is not None:
        data = data[:limit]
    return [_check_object(obj, f"{path} item {i}") for i, obj in enumerate(data)]


def _read_parquet(path: Path, *, limit: int | None, what: str) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            f"{what}: {str(path)!r} is not a readable Parquet file: {exc}",
            "check the file (it may be truncated) or convert the data to .jsonl",
        ) from None
    if limit is not None:
        table = table.slice(0, limit)
    return table.to_pylist()


def _read_dir(path: Path, *, split: str, limit: int | None, what: str) -> list[dict]:
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _read_saved(path, split=split, limit=limit, what=what)
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in DATA_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
        and p.name not in ("dataset_info.json", "state.json", "dataset_dict.json")
    )
    if not files:
        raise DataError(
            f"{what}: directory {str(path)!r} holds no data files ({', '.join(DATA_SUFFIXES)}) "
            "and was not written by datasets.save_to_disk",
            f"point {what} at a data file or put .jsonl/.json/.parquet files in the directory",
        )
    by_split: dict[str, list[Path]] = {}
    for f in files:
        name = _split_of(f.relative_to(path))
        if name is not None:
            by_split.setdefault(name, []).append(f)
    if split in by_split:
        chosen = by_split[split]
    elif by_split:
        raise DataError(
            f"{what}: directory {str(path)!r} has no {split!r} split; it has {', '.join(sorted(by_split))}",
            f"set data.split to one of {', '.join(sorted(by_split))} (or name the files after the split)",
        )
    elif split == "train":
        chosen = files
    else:
        raise DataError(
            f"{what}: directory {str(path)!r} has no file named after split {split!r} "
            "(its files, named after no split, make up the 'train' split)",
            f"use data.split=train or name the files {split}.jsonl / {split}-*.parquet",
        )
    rows: list[dict] = []
    for f in chosen:
        rows.extend(_read_file(f, limit=None if limit is None else limit - len(rows), what=what))
        if limit is not None and len(rows) >= limit:
            break
    return rows


def _split_of(rel: Path) -> str | None:
    """The split a file in a data directory belongs to by its name (`train.jsonl`,
    `train-00000-of-00001.parquet`, `train/part0.jsonl`), or None."""
    names = [p.lower() for p in rel.parts[:-1]]
    stem = rel.name.split(".")[0].lower()
    for split in _KNOWN_SPLITS:
        if split in names or stem == split or re.match(rf"{split}[-_.]", stem):
            return split
    return None


def _read_saved(path: Path, *, split: str, limit: int | None, what: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 — any failure is the user's directory
        raise DataError(
            f"{what}: {str(path)!r} looks like a datasets.save_to_disk directory but cannot be read: "
            f"{type(exc).__name__}: {_first_line(exc)}",
            "re-save it with Dataset.save_to_disk, or point data.path at a .jsonl file",
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(
                f"{what}: {str(path)!r} has no {split!r} split; it has {', '.join(ds) or 'none'}",
                f"set data.split to one of {', '.join(ds)}",
            )
        ds = ds[split]
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds.to_list()


def _read_hub(name: str, *, split: str, limit: int | None, what: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 — offline, unknown name, unknown split, ...
        raise DataError(
            f"{what}: {name!r} is not a local file or directory, and the dataset could not be "
            f"found locally or on the Hub ({type(exc).__name__}: {_first_line(exc)})",
            f"check {what} (relative paths are read from {os.getcwd()}) and data.split; offline, "
            "point it at a local .jsonl/.parquet file or a save_to_disk directory",
        ) from None
    if isinstance(ds, datasets.DatasetDict):  # pragma: no cover — split= was given
        ds = ds[split]
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return [dict(r) for r in ds]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "no message"


def _short(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


# ============================================================================ eval split


def split_eval(rows: Sequence[dict], ratio: float) -> tuple[list[dict], list[dict]]:
    """Hold out the first ``int(len(rows) * ratio)`` rows for evaluation (seed 003's rule).

    Returns ``(train, eval)``. ``ratio == 0`` returns all rows for training and no eval rows;
    otherwise both sides must be non-empty (:class:`DataError`).
    """
    rows = list(rows)
    if not 0 <= ratio < 1:
        raise DataError(f"data.eval_ratio must be in [0, 1), got {ratio}", "use e.g. 0.1 (10% held out)")
    if ratio == 0:
        return rows, []
    n_eval = int(len(rows) * ratio)
    if n_eval == 0:
        fix = (
            f"raise data.eval_ratio to at least {1 / len(rows):.3g}, add rows, or set it to 0"
            if len(rows) >= 2
            else "add rows (evaluation needs at least 2) or set data.eval_ratio=0"
        )
        raise DataError(f"data.eval_ratio={ratio} of {len(rows)} rows holds out no rows for evaluation", fix)
    if n_eval >= len(rows):
        raise DataError(
            f"data.eval_ratio={ratio} of {len(rows)} rows leaves no rows for training",
            "lower data.eval_ratio or add rows",
        )
    return rows[n_eval:], rows[:n_eval]


# ============================================================================ rendering


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
            f"{where}: {key!r} must be a string, got {type(value).__name__} {_short(value)}",
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


def _validate_messages(value: Any, where: str, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{where}: {field!r} must be a non-empty list of {{role, content}} turns, got {_short(value)}",
            'write the conversation as [{"role": "user", "content": ...}, {"role": "assistant", ...}]',
        )
    for i, msg in enumerate(value):
        at = f"{where}: {field}[{i}]"
        if not isinstance(msg, dict):
            raise DataError(
                f"{at} must be an object with role and content, got {_short(msg)}",
                'write each turn as {"role": ..., "content": ...}',
            )
        if "role" not in msg or "content" not in msg:
            if {"from", "value"} <= set(msg):
                raise DataError(
                    f"{at} uses ShareGPT keys from/value",
                    "convert the turns to role/content (human->user, gpt->assistant)",
                )
            missing = [k for k in ("role", "content") if k not in msg]
            raise DataError(
                f"{at} has no {' or '.join(missing)} (keys: {', '.join(map(str, msg)) or 'none'})",
                "give every turn a role (system/user/assistant) and a string content",
            )
        if msg["role"] not in ROLES:
            raise DataError(
                f"{at}: unknown role {msg['role']!r}",
                f"use one of {', '.join(ROLES)} (tool turns are not supported)",
            )
        if not isinstance(msg["content"], str):
            raise DataError(
                f"{at}: content must be a string, got {type(msg['content']).__name__} "
                f"{_short(msg['content'])}",
                "write the content as plain text",
            )
    if not any(m["role"] == "assistant" for m in value):
        raise DataError(
            f"{where}: the conversation has no assistant turn, so there is nothing to train on",
            "add the assistant's answer or remove the row",
        )
    if value[0]["role"] == "assistant":
        raise DataError(
            f"{where}: the conversation starts with an assistant turn",
            "start it with a user (or system) turn",
        )
    return value


def _render(tokenizer: Any, messages: list[dict], where: str, *, add_generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # noqa: BLE001 — jinja TemplateError / raise_exception() in the template
        raise DataError(
            f"{where}: the chat template rejected the conversation: {type(exc).__name__}: {_first_line(exc)}",
            "fix the conversation (most templates want user/assistant turns to alternate)",
        ) from None
    if not isinstance(text, str):  # pragma: no cover — transformers API drift
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}")
    return text


def _chat_template(tokenizer: Any) -> str:
    try:
        template = tokenizer.get_chat_template()
    except (ValueError, AttributeError) as exc:
        raise DataError(
            f"data.format=messages, but the tokenizer has no usable chat template ({_first_line(exc)})",
            "use a model whose tokenizer ships a chat template (an instruct/chat model), "
            "or use data.format=alpaca/prompt-completion/text",
        ) from None
    return template


def _messages_spans(tokenizer: Any, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and find the character span of each assistant answer: what the
    model writes after the generation prompt, up to and including the end-of-turn text the
    template puts after the content (e.g. ``<|eot_id|>``, ``<|im_end|>``), without the
    whitespace that follows it.

    For each assistant turn i, in order of preference:

    1. Incremental rendering: ``before = render(messages[:i], add_generation_prompt=True)``
       must be a prefix of the full rendering and of ``upto = render(messages[:i+1])``; the
       span starts at ``len(before)`` and runs as far as ``upto`` and the full rendering agree
       (for a prefix-stable template: to the end of ``upto``; for templates that close only the
       final turn differently, e.g. Phi-3's trailing eos or gpt-oss's ``<|return|>``, to the end
       of the turn), never stopping inside an added token, then right-stripped. The span must
       contain the answer text.
    2. The template's ``{% generation %}`` block for this turn (whitespace-trimmed), if it has
       markers (one block per assistant turn).
    3. The answer's content found verbatim in the full rendering (after the previous span),
       followed by the end-of-turn text, found the same way as in 1.

    2 and 3 serve templates that re-render an answer once later turns follow (Qwen3 gives only
    the final answer a think block). If all fail: DataError.
    """
    full = _render(tokenizer, messages, where, add_generation_prompt=False)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans: list[tuple[int, int] | None] = []
    uptos: dict[int, str] = {}
    for i in assistant:
        before = _render(tokenizer, messages[:i], where, add_generation_prompt=True)
        upto = uptos[i] = _render(tokenizer, messages[: i + 1], where, add_generation_prompt=False)
        span = None
        if upto.startswith(before) and full.startswith(before):
            start = len(before)
            end = _turn_end(tokenizer, full, start, upto, start)
            if end > start and _holds_answer(full[start:end], messages[i]["content"]):
                span = (start, end)
        spans.append(span)
    if all(span is not None for span in spans):
        return full, spans  # type: ignore[return-value]
    template = _chat_template(tokenizer)
    if _GENERATION_RE.search(template):
        marked = _generation_spans(tokenizer, template, messages, full)
        if marked is not None and len(marked) == len(assistant):
            spans = [
                span
                or (mark if _marks_text(tokenizer, full[mark[0] : mark[1]], messages[i]["content"]) else None)
                for i, span, mark in zip(assistant, spans, marked, strict=True)
            ]
    result: list[tuple[int, int]] = []
    cursor = 0
    for i, span in zip(assistant, spans, strict=True):
        if span is None or span[0] < cursor:
            span = _content_span(tokenizer, messages[i]["content"], uptos[i], full, cursor, i, where)
        result.append(span)
        cursor = span[1]
    return full, result


def _holds_answer(span_text: str, content: str) -> bool:
    return content.strip() in span_text


def _marks_text(tokenizer: Any, span_text: str, content: str) -> bool:
    """A `{% generation %}` block may rewrite the answer, but must hold more than control tokens
    (a multimodal template given string content renders none of it)."""
    pattern, _ = _added_tokens_pattern(tokenizer)
    rest = pattern.sub("", span_text) if pattern is not None else span_text
    return not content.strip() or bool(rest.strip())


def _turn_end(tokenizer: Any, full: str, pos: int, other: str, other_pos: int) -> int:
    """Where the answer starting at `full[pos]` ends, given a second rendering `other` in which
    the same answer starts at `other_pos` and is the final turn.

    The end is as far as the two renderings agree, moved back to the start of an added token it
    would cut (``<|end|>\n<|user|>`` vs ``<|end|>\n</s>`` agree on ``<``), right-stripped of
    whitespace. If the span then does not end with an added (control) token and one follows in
    `full` (gpt-oss's ``<|end|>`` where the final turn has ``<|return|>``, GLM's next-turn
    ``<|user|>``), the span takes it: the model must learn to stop.
    """
    n = 0
    limit = min(len(full) - pos, len(other) - other_pos)
    while n < limit and full[pos + n] == other[other_pos + n]:
        n += 1
    end = pos + n
    pattern, longest = _added_tokens_pattern(tokenizer)
    if pattern is not None and end < len(full):
        for m in pattern.finditer(full, max(pos, end - longest + 1), min(len(full), end + longest)):
            if m.start() < end < m.end():
                end = m.start()
                break
    while end > pos and full[end - 1].isspace():
        end -= 1
    if pattern is not None and end < len(full):
        window = pattern.finditer(full, max(pos, end - longest), end)
        if not any(m.end() == end for m in window):
            nxt = end
            while nxt < len(full) and full[nxt].isspace():
                nxt += 1
            following = pattern.match(full, nxt)
            if following is not None:
                end = following.end()
    return end


_ADDED_TOKENS_CACHE: dict[int, tuple[Any, Any, int]] = {}


def _added_tokens_pattern(tokenizer: Any) -> tuple[re.Pattern | None, int]:
    """A regex matching the tokenizer's added (control) tokens, and the longest one's length."""
    cached = _ADDED_TOKENS_CACHE.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer:
        return cached[1], cached[2]
    try:
        contents = {t.content for t in tokenizer.added_tokens_decoder.values() if len(t.content) > 1}
    except AttributeError:
        contents = set(getattr(tokenizer, "all_special_tokens", []))
    contents = {c for c in contents if c and not c.isspace()}
    if contents:
        ordered = sorted(contents, key=len, reverse=True)
        pattern: re.Pattern | None = re.compile("|".join(re.escape(c) for c in ordered))
        longest = len(ordered[0])
    else:
        pattern, longest = None, 0
    if len(_ADDED_TOKENS_CACHE) > 16:
        _ADDED_TOKENS_CACHE.clear()
    _ADDED_TOKENS_CACHE[id(tokenizer)] = (tokenizer, pattern, longest)
    return pattern, longest


def _generation_spans(tokenizer: Any, template: str, messages: list[dict], full: str) -> list | None:
    """Character spans of the template's ``{% generation %}`` blocks, whitespace-trimmed."""
    try:
        from transformers.utils.chat_template_utils import render_jinja_template

        out: Any = render_jinja_template(  # (rendered texts, generation char spans per text)
            conversations=[messages],
            chat_template=template,
            return_assistant_tokens_mask=True,
            add_generation_prompt=False,
            **tokenizer.special_tokens_map,
        )
        rendered, indices = out
    except Exception:  # noqa: BLE001 — internal API: fall back to the content search
        return None
    if rendered[0] != full:
        return None
    spans = []
    for start, end in indices[0]:
        text = full[start:end]
        start += len(text) - len(text.lstrip())
        end -= len(text) - len(text.rstrip())
        if end > start:
            spans.append((start, end))
    return spans


def _content_span(
    tokenizer: Any, content: str, upto: str, full: str, cursor: int, i: int, where: str
) -> tuple[int, int]:
    """The answer text found verbatim in `full` after `cursor`, plus its end-of-turn text."""
    for needle in dict.fromkeys((content, content.strip())):
        if not needle:
            continue
        pos_last = upto.rfind(needle)  # in the rendering where this answer is the final turn
        pos = full.find(needle, cursor)
        if pos_last < 0 or pos < 0:
            continue
        end = _turn_end(tokenizer, full, pos + len(needle), upto, pos_last + len(needle))
        return pos, max(end, pos + len(needle.rstrip()))
    raise DataError(
        f"{where}: cannot locate the text of assistant turn {i} in the rendered conversation: the "
        "chat template rewrites it once later turns follow, or does not render string content "
        "(multimodal templates want a list of content blocks)",
        "use a chat template with {% generation %} markers around assistant answers (TRL ships "
        "training templates for common models), or set data.completion_only_loss=false",
    )


def _columns_to_messages(row: dict) -> list[dict] | None:
    """One exchange from `system`/`user`/`assistant` columns (as in seed 003's dataset), or None."""
    if not isinstance(row.get("user"), str) or not isinstance(row.get("assistant"), str):
        return None
    messages = [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) else []
    return messages + [
        {"role": "user", "content": row["user"]},
        {"role": "assistant", "content": row["assistant"]},
    ]


# ============================================================================ tokenisation


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _encode_pieces(tokenizer: Any, text: str, cuts: Sequence[int]) -> list[list[int]]:
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
        whole = _encode(tokenizer, text[:end])
        if whole[: len(ids)] == ids:
            piece = whole[len(ids) :]
        else:
            piece = _encode(tokenizer, text[start:end])
        pieces.append(piece)
        ids.extend(piece)
        start = end
    return pieces


def _special_prefix(tokenizer: Any) -> list[int]:
    """Ids the tokenizer puts before a text by itself (e.g. Llama's BOS); [] for most chat models."""
    probe = "x"
    with_special = list(tokenizer.encode(probe, add_special_tokens=True))
    without = list(tokenizer.encode(probe, add_special_tokens=False))
    for k in range(len(with_special) - len(without) + 1):
        if with_special[k : k + len(without)] == without:
            return with_special[:k]
    return []


def _eos_id(tokenizer: Any) -> int:
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
    pieces = _encode_pieces(tokenizer, text, cuts)
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
            prefix=_special_prefix(tokenizer),
            suffix=[_eos_id(tokenizer)],
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
            prefix=_special_prefix(tokenizer),
            suffix=[_eos_id(tokenizer)],
            label_all=True,
        )
    if fmt == "messages":
        raw = row.get(messages_field)
        if raw is None and messages_field not in row:
            raw = _columns_to_messages(row)  # seed 003's system/user/assistant columns
        messages = _validate_messages(
            raw if raw is not None else _field(row, messages_field, where, fmt), where, messages_field
        )
        _chat_template(tokenizer)
        if not completion_only_loss:
            text = _render(tokenizer, messages, where, add_generation_prompt=False)
            return _labelled(tokenizer, text, [(0, len(text))], prefix=[], suffix=[], label_all=True)
        text, spans = _messages_spans(tokenizer, messages, where)
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
