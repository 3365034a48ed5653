"""Answer spans of a conversation without rendering a growing prefix per turn (`SpanFinder`).

`chat.messages_spans` compares, for every assistant turn, the rendering of the turns before it
(with the generation prompt), the rendering up to it and the whole conversation: two template
runs per turn over ever longer prefixes, O(turns²) per row. Here the template runs once per
conversation *shape* (the roles and every other field of each turn, with each content replaced
by a probe string); every rendering the rule compares is then that skeleton with each probe
replaced by the row's own content, and `chat.messages_spans` runs unchanged on those strings.

Why the strings are the template's own: a probe is a `str` that records what the template does
with it — tests (``'</think>' in content``, ``content.startswith(...)``, truthiness, comparisons,
``length``) with their results, and ``trim``/``strip`` (which give new probes). A row uses the
skeleton only when every recorded test gives the same result on its own contents, so the
template takes the same branches and writes the same text around the contents. A template that
changes a content any other way (``upper``, ``replace``, slicing, escaping, JSON) is either
recorded as untrackable or breaks the probe's text, which starts and ends with whitespace and
holds characters every escaping changes; such a shape is not used. On top: each shape's
skeleton, filled with plain sentinel strings, must equal `apply_chat_template`'s rendering of
them; every row's whole conversation is still rendered by the template once and must equal the
filled skeleton; the first rows of each shape also go through the reference and must agree.
Whatever does not hold falls back to `chat.messages_spans`, row by row.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass, field
from typing import Any

from tunefleet.distributed.data.chat import _GENERATION_RE, Renderings, chat_template, messages_spans, render

_PROBE = " \n\ue000{key}\ue001\"'<&\\\n "
_PROBE_RE = re.compile(re.escape(_PROBE).replace(re.escape("{key}"), r"(\d+)"))

CHECK_ROWS = 2
"""Rows of each shape (per process) that also go through the reference and must give the same."""

MAX_SHAPES = 4096
"""Shapes kept per tokenizer; beyond, the cache starts over (rows with unique extra fields)."""

_PREDICATES = frozenset(
    "startswith endswith find rfind count isalnum isalpha isascii isdecimal isdigit isidentifier "
    "islower isnumeric isprintable isspace istitle isupper".split()
)
"""str methods whose result the template may test: recorded, and replayed on each row's content."""

_TRANSFORMS = frozenset(("strip", "lstrip", "rstrip"))

_OPS: dict[str, Any] = {
    "__contains__": lambda v, x: x in v,
    "__eq__": lambda v, x: v == x,
    "__ne__": lambda v, x: v != x,
    "__lt__": lambda v, x: v < x,
    "__le__": lambda v, x: v <= x,
    "__gt__": lambda v, x: v > x,
    "__ge__": lambda v, x: v >= x,
    "__len__": len,
    "__bool__": bool,
    "__hash__": hash,
}


def _text(value: str) -> str:
    return str.__str__(value)


def _plain_args(args: tuple) -> bool:
    return all(
        type(a) in (str, int, float, bool, type(None)) or (type(a) is tuple and _plain_args(a)) for a in args
    )


# ----------------------------------------------------------------------------- the probe


class _Recorder:
    """What the template did with the probes of one shape."""

    def __init__(self) -> None:
        self.variants: list[tuple[int, tuple]] = []
        """Probe key -> (message index, transforms applied, e.g. (("strip", None),))."""
        self.checks: list[tuple[int, str, tuple, Any]] = []
        """(probe key, operation, arguments, result) of every test the template made."""
        self.untrackable: str | None = None

    def probe(self, message: int, transforms: tuple = ()) -> _Probe:
        variant = (message, transforms)
        key = self.variants.index(variant) if variant in self.variants else len(self.variants)
        if key == len(self.variants):
            self.variants.append(variant)
        return _Probe(key, self)


class _Probe(str):
    """A message's content while the template renders a skeleton (see the module docstring)."""

    def __new__(cls, key: int, recorder: _Recorder) -> _Probe:
        obj = str.__new__(cls, _PROBE.format(key=key))
        obj.__dict__.update(tf_key=key, tf_recorder=recorder)
        return obj

    def _test(self, op: str, args: tuple, result: Any) -> Any:
        d = object.__getattribute__(self, "__dict__")
        if _plain_args(args):
            d["tf_recorder"].checks.append((d["tf_key"], op, args, result))
        else:
            d["tf_recorder"].untrackable = f"the template compares a content with {op} and a non-plain value"
        return result

    def _untrackable(self, why: str) -> None:
        object.__getattribute__(self, "__dict__")["tf_recorder"].untrackable = why

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("_") or name in _TRANSFORMS or not hasattr(str, name):
            return super().__getattribute__(name)
        plain = getattr(_text(self), name)
        if name in _PREDICATES:
            return lambda *args: self._test(name, args, plain(*args))
        self._untrackable(f"the template calls {name}() on a content")
        return plain

    def __str__(self) -> str:
        return self  # str(content).replace(...) stays a probe, so the replace is seen

    def __format__(self, spec: str) -> str:
        if spec:
            self._untrackable("the template formats a content with a width or alignment")
        return str.__format__(_text(self), spec)

    def _transform(self, name: str, chars: Any) -> _Probe:
        if chars is not None and type(chars) is not str:
            self._untrackable(f"the template calls {name}() with a non-plain argument")
        d = object.__getattribute__(self, "__dict__")
        message, transforms = d["tf_recorder"].variants[d["tf_key"]]
        return d["tf_recorder"].probe(message, (*transforms, (name, chars)))

    def strip(self, chars: Any = None) -> _Probe:
        return self._transform("strip", chars)

    def lstrip(self, chars: Any = None) -> _Probe:
        return self._transform("lstrip", chars)

    def rstrip(self, chars: Any = None) -> _Probe:
        return self._transform("rstrip", chars)

    def __iter__(self) -> Any:
        self._untrackable("the template iterates over a content")
        return iter(_text(self))

    def __getitem__(self, index: Any) -> str:
        self._untrackable("the template slices a content")
        return _text(self)[index]

    def __mul__(self, n: Any) -> str:
        self._untrackable("the template repeats a content")
        return _text(self) * n

    __rmul__ = __mul__

    def __mod__(self, args: Any) -> str:
        self._untrackable("the template formats a content with %")
        return _text(self) % args


def _dunder_test(op: str) -> Any:
    def method(self: _Probe, *args: Any) -> Any:
        return self._test(op, args, _OPS[op](_text(self), *args))

    method.__name__ = op
    return method


for _op in _OPS:
    setattr(_Probe, _op, _dunder_test(_op))


def _apply(transforms: tuple, text: str) -> str:
    for name, chars in transforms:
        text = getattr(text, name)(chars)
    return text


# ----------------------------------------------------------------------------- one shape


@dataclass
class _Shape:
    """The skeleton renderings of one conversation shape, as parts: glue text or a probe key."""

    parts: dict[tuple[int, bool], list[str | int]]
    """(turns rendered, with the generation prompt) -> parts."""
    generation: tuple[list[str | int], list[tuple[int, int]]] | None
    """The whole conversation's parts and its {% generation %} blocks (skeleton positions)."""
    variants: list[tuple[int, tuple]]
    checks: list[tuple[int, str, tuple, Any]]
    render_full: Any
    """The template itself on a whole conversation (as `apply_chat_template` runs it, without its
    per-call set-up): every row's own rendering, compared with the filled skeleton."""
    rows_checked: int = 0
    broken: str | None = None

    def values(self, messages: list[dict]) -> list[str] | None:
        """What each probe stands for in this row, or None when a recorded test differs."""
        values = [_apply(transforms, messages[m]["content"]) for m, transforms in self.variants]
        for key, op, args, result in self.checks:
            try:
                got = _OPS[op](values[key], *args) if op in _OPS else getattr(values[key], op)(*args)
            except Exception:  # noqa: BLE001 — the template's test would raise on this content
                return None
            if type(got) is not type(result) or got != result:
                return None
        return values


def _fill(parts: list[str | int], values: list[str]) -> str:
    return "".join(p if isinstance(p, str) else values[p] for p in parts)


def _parse(text: str, n_variants: int) -> list[str | int] | None:
    parts: list[str | int] = []
    pos = 0
    for m in _PROBE_RE.finditer(text):
        key = int(m.group(1))
        if key >= n_variants:
            return None
        parts += [text[pos : m.start()], key]
        pos = m.end()
    parts.append(text[pos:])
    if any(isinstance(p, str) and ("\ue000" in p or "\ue001" in p) for p in parts):
        return None  # a probe whose text the template changed (escaped, stripped as plain text, ...)
    return parts


def _map_position(parts: list[str | int], lengths: list[int], pos: int, real: list[int]) -> int | None:
    """A position in the skeleton -> the same position in the filled text (None inside a probe)."""
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    i = bisect.bisect_right(starts, pos) - 1
    i = min(i, len(parts) - 1)
    offset = pos - starts[i]
    if isinstance(parts[i], int) and 0 < offset < lengths[i]:
        return None
    real_start = sum(real[:i])
    return real_start + (real[i] if isinstance(parts[i], int) and offset == lengths[i] else offset)


def _build_shape(tokenizer: Any, template: str, messages: list[dict], where: str) -> _Shape | None:
    """Render the skeleton of `messages`' shape; None when it cannot be used (see the module doc)."""
    from tunefleet.launch.hf_compat import template_internals

    ctu = template_internals()
    if ctu is None:  # transformers moved its internals: the reference serves every row
        return None
    _alias_reasoning_fields, _compile_jinja_template = (
        ctu._alias_reasoning_fields,
        ctu._compile_jinja_template,
    )
    _plain_template_data, _render_with_assistant_indices = (
        ctu._plain_template_data,
        ctu._render_with_assistant_indices,
    )
    recorder = _Recorder()
    probes = [recorder.probe(j) for j in range(len(messages))]
    skeleton = _alias_reasoning_fields(
        [
            {
                k: (probes[j] if k == "content" else _plain_template_data(v))
                for k, v in m.items()
                if v is not None
            }
            for j, m in enumerate(messages)
        ]
    )
    compiled = _compile_jinja_template(template)
    kwargs = _plain_template_data(tokenizer.special_tokens_map)
    wanted = {(len(messages), False)}
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            wanted |= {(i, True), (i + 1, False)}
    try:
        texts = {
            (n, g): compiled.render(
                messages=skeleton[:n], tools=None, documents=None, add_generation_prompt=g, **kwargs
            )
            for n, g in sorted(wanted)
        }
        marked = None
        if _GENERATION_RE.search(template):
            marked = _render_with_assistant_indices(
                compiled_template=compiled,
                messages=skeleton,
                tools=None,
                documents=None,
                add_generation_prompt=False,
                **kwargs,
            )
    except Exception:  # noqa: BLE001 — the template rejects this shape: the reference says why
        return None
    if recorder.untrackable:
        return None
    parts: dict[tuple[int, bool], list[str | int]] = {}
    for spec, text in texts.items():
        parsed = _parse(text, len(recorder.variants))
        if parsed is None:
            return None
        parts[spec] = parsed
    generation = None
    if marked is not None:
        marked_parts = _parse(marked[0], len(recorder.variants))
        if marked_parts is None:
            return None
        generation = (marked_parts, [(int(a), int(b)) for a, b in marked[1]])
    shape = _Shape(
        parts=parts,
        generation=generation,
        variants=recorder.variants,
        checks=recorder.checks,
        render_full=lambda msgs: compiled.render(
            messages=_alias_reasoning_fields(
                # transformers rebuilds the messages from plain types; plain strings need no rebuilding
                msgs if all(type(v) is str for m in msgs for v in m.values()) else _plain_template_data(msgs)
            ),
            tools=None,
            documents=None,
            add_generation_prompt=False,
            **kwargs,
        ),
    )
    return shape if _same_as_template(shape, tokenizer, messages, where) else None


def _same_as_template(shape: _Shape, tokenizer: Any, messages: list[dict], where: str) -> bool:
    """The skeleton filled with plain sentinel strings equals `apply_chat_template`'s rendering of
    a conversation holding those strings (the path here renders as transformers does)."""
    plain = [{**m, "content": _PROBE.format(key=j)} for j, m in enumerate(messages)]
    values = shape.values(plain)
    if values is None:
        return False
    try:
        for (n, g), parts in shape.parts.items():
            if _fill(parts, values) != render(tokenizer, plain[:n], where, add_generation_prompt=g):
                return False
        if shape.generation is not None:
            filled = SkeletonRenderings(shape, values, plain).generation()
            if filled != Renderings(tokenizer, plain, where).generation():
                return False
    except Exception:  # noqa: BLE001 — any doubt: not used
        return False
    return True


def _shape_key(messages: list[dict]) -> tuple:
    def frozen(value: Any) -> Any:
        if type(value) in (str, int, float, bool):
            return value
        return json.dumps(value, sort_keys=True, default=repr)

    return tuple(
        tuple((k, None if k == "content" else frozen(v)) for k, v in m.items() if v is not None)
        for m in messages
    )


# ----------------------------------------------------------------------------- one row


class _Unprovable(Exception):
    pass


class SkeletonRenderings(Renderings):
    """`chat.Renderings` made by filling a shape's skeleton with one row's contents."""

    def __init__(
        self, shape: _Shape, values: list[str], messages: list[dict], full: str | None = None
    ) -> None:
        self.shape, self.values, self.messages, self._full = shape, values, messages, full

    def full(self) -> str:
        if self._full is None:
            self._full = _fill(self.shape.parts[(len(self.messages), False)], self.values)
        return self._full

    def before(self, i: int) -> str:
        return _fill(self.shape.parts[(i, True)], self.values)

    def upto(self, i: int) -> str:
        return _fill(self.shape.parts[(i + 1, False)], self.values)

    def generation(self) -> tuple[str, list[tuple[int, int]]] | None:
        if self.shape.generation is None:
            raise _Unprovable("no skeleton of the marked rendering")
        parts, indices = self.shape.generation
        lengths = [len(p) if isinstance(p, str) else len(_PROBE.format(key=p)) for p in parts]
        real = [len(p) if isinstance(p, str) else len(self.values[p]) for p in parts]
        mapped = []
        for a, b in indices:
            start, end = _map_position(parts, lengths, a, real), _map_position(parts, lengths, b, real)
            if start is None or end is None:
                raise _Unprovable("a {% generation %} block starts or ends inside a content")
            mapped.append((start, end))
        return _fill(parts, self.values), mapped


@dataclass
class SpanFinder:
    """`chat.messages_spans` for many rows, each shape's template runs shared (see the module
    docstring); rows it cannot prove go through the reference and are counted."""

    reference_rows: int = 0
    _shapes: dict[int, tuple[Any, str, dict[tuple, _Shape | None]]] = field(default_factory=dict)
    """id(tokenizer) -> (the tokenizer, its chat template, the shapes seen with them)."""

    def __call__(self, tokenizer: Any, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
        shape = self._shape(tokenizer, messages, where)
        values = shape.values(messages) if shape is not None and shape.broken is None else None
        if shape is None or values is None:
            return self._reference(tokenizer, messages, where)
        renderings = SkeletonRenderings(shape, values, messages)
        try:
            same = renderings.full() == shape.render_full(messages)  # the one template run of this row
        except Exception:  # noqa: BLE001 — the template rejects this row: the reference says why
            same = False
        if not same:
            return self._reference(tokenizer, messages, where)
        try:
            found = messages_spans(tokenizer, messages, where, renderings)
        except _Unprovable:
            return self._reference(tokenizer, messages, where)
        if shape.rows_checked < CHECK_ROWS:
            shape.rows_checked += 1
            reference = messages_spans(tokenizer, messages, where)
            if reference != found:
                shape.broken = "the skeleton's spans differ from the reference's"
            return reference
        return found

    def _reference(
        self, tokenizer: Any, messages: list[dict], where: str
    ) -> tuple[str, list[tuple[int, int]]]:
        self.reference_rows += 1
        return messages_spans(tokenizer, messages, where)

    def _shape(self, tokenizer: Any, messages: list[dict], where: str) -> _Shape | None:
        entry = self._shapes.get(id(tokenizer))
        template = chat_template(tokenizer)
        if entry is None or entry[0] is not tokenizer or entry[1] != template:
            entry = self._shapes[id(tokenizer)] = (tokenizer, template, {})
        shapes = entry[2]
        key = _shape_key(messages)
        if key not in shapes:
            if len(shapes) >= MAX_SHAPES:
                shapes.clear()
            shapes[key] = _build_shape(tokenizer, template, messages, where)
        return shapes[key]
