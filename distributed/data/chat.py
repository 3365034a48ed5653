"""Chat conversations: checking the turns, rendering them with the tokenizer's chat template, and
finding the character span of every assistant answer (what answer-only loss trains on)."""

from __future__ import annotations

import re
from typing import Any

from tunefleet.distributed.data.loading import first_line, short_repr
from tunefleet.launch.core.errors import DataError

ROLES = ("system", "user", "assistant")
"""Roles accepted in the `messages` format."""

_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")


def validate_messages(value: Any, where: str, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{where}: {field!r} must be a non-empty list of {{role, content}} turns, got {short_repr(value)}",
            'write the conversation as [{"role": "user", "content": ...}, {"role": "assistant", ...}]',
        )
    for i, msg in enumerate(value):
        at = f"{where}: {field}[{i}]"
        if not isinstance(msg, dict):
            raise DataError(
                f"{at} must be an object with role and content, got {short_repr(msg)}",
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
                f"{short_repr(msg['content'])}",
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


def render(tokenizer: Any, messages: list[dict], where: str, *, add_generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # noqa: BLE001 — jinja TemplateError / raise_exception() in the template
        raise DataError(
            f"{where}: the chat template rejected the conversation: {type(exc).__name__}: {first_line(exc)}",
            "fix the conversation (most templates want user/assistant turns to alternate)",
        ) from None
    if not isinstance(text, str):  # pragma: no cover — transformers API drift
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}")
    return text


def chat_template(tokenizer: Any) -> str:
    try:
        template = tokenizer.get_chat_template()
    except (ValueError, AttributeError) as exc:
        raise DataError(
            f"data.format=messages, but the tokenizer has no usable chat template ({first_line(exc)})",
            "use a model whose tokenizer ships a chat template (an instruct/chat model), "
            "or use data.format=alpaca/prompt-completion/text",
        ) from None
    return template


class Renderings:
    """The renderings of one conversation that the answer-span rule compares, each made by the
    chat template (the reference). `skeleton.SkeletonRenderings` gives the same strings without
    running the template once per turn."""

    def __init__(self, tokenizer: Any, messages: list[dict], where: str) -> None:
        self.tokenizer, self.messages, self.where = tokenizer, messages, where

    def full(self) -> str:
        """The whole conversation, without a generation prompt."""
        return render(self.tokenizer, self.messages, self.where, add_generation_prompt=False)

    def before(self, i: int) -> str:
        """The turns before turn `i`, with the generation prompt."""
        return render(self.tokenizer, self.messages[:i], self.where, add_generation_prompt=True)

    def upto(self, i: int) -> str:
        """The turns up to and including turn `i`."""
        return render(self.tokenizer, self.messages[: i + 1], self.where, add_generation_prompt=False)

    def generation(self) -> tuple[str, list[tuple[int, int]]] | None:
        """The whole conversation rendered with the character spans of its ``{% generation %}``
        blocks, untrimmed; None when transformers cannot say."""
        try:
            from tunefleet.launch.hf_compat import render_jinja_template

            out: Any = render_jinja_template(  # (rendered texts, generation char spans per text)
                conversations=[self.messages],
                chat_template=chat_template(self.tokenizer),
                return_assistant_tokens_mask=True,
                add_generation_prompt=False,
                **self.tokenizer.special_tokens_map,
            )
            rendered, indices = out
        except Exception:  # noqa: BLE001 — internal API: fall back to the content search
            return None
        return rendered[0], [(int(a), int(b)) for a, b in indices[0]]


def messages_spans(
    tokenizer: Any, messages: list[dict], where: str, renderings: Renderings | None = None
) -> tuple[str, list[tuple[int, int]]]:
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
    the final answer a think block). If all fail: DataError. `renderings` supplies the renderings
    (by default the template makes each: 2 per assistant turn).
    """
    r = renderings or Renderings(tokenizer, messages, where)
    full = r.full()
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans: list[tuple[int, int] | None] = []
    uptos: dict[int, str] = {}
    for i in assistant:
        before = r.before(i)
        upto = uptos[i] = r.upto(i)
        span = None
        if upto.startswith(before) and full.startswith(before):
            start = len(before)
            end = _turn_end(tokenizer, full, start, upto, start)
            if end > start and _holds_answer(full[start:end], messages[i]["content"]):
                span = (start, end)
        spans.append(span)
    if all(span is not None for span in spans):
        return full, spans  # type: ignore[return-value]
    template = chat_template(tokenizer)
    if _GENERATION_RE.search(template):
        marked = _generation_spans(r.generation(), full)
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
    end = pos + _agreement(full, pos, other, other_pos)
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


def _agreement(a: str, a_pos: int, b: str, b_pos: int) -> int:
    """How many characters `a` from `a_pos` and `b` from `b_pos` have in common at their start
    (a binary search over slice compares: a long answer costs a few compares, not a Python loop)."""
    lo, hi = 0, min(len(a) - a_pos, len(b) - b_pos)  # a[..lo] agree; a[..hi + 1] do not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[a_pos + lo : a_pos + mid] == b[b_pos + lo : b_pos + mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


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


def _generation_spans(generation: tuple[str, list[tuple[int, int]]] | None, full: str) -> list | None:
    """Character spans of the template's ``{% generation %}`` blocks, whitespace-trimmed."""
    if generation is None or generation[0] != full:
        return None
    spans = []
    for start, end in generation[1]:
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


def columns_to_messages(row: dict) -> list[dict] | None:
    """One exchange from `system`/`user`/`assistant` columns (as in seed 003's dataset), or None."""
    if not isinstance(row.get("user"), str) or not isinstance(row.get("assistant"), str):
        return None
    messages = [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) else []
    return messages + [
        {"role": "user", "content": row["user"]},
        {"role": "assistant", "content": row["assistant"]},
    ]
