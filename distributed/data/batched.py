"""Many rows to token ids and labels at once, with exactly the reference's result per row.

`tokenization.tokenize_row` tokenises one row at a time, and a conversation's pieces by
re-tokenising every growing prefix of its text (`encode_pieces`). `Batcher` gives the same ids
and labels (tests compare them row by row) with:

* answer spans from `skeleton.SpanFinder` (the chat template once per row, not twice per turn);
* one fast-tokenizer call per batch for every row's whole text, and one for all the prefixes the
  pieces need (`Encoder.pieces`);
* a conversation's prefix tokenised only from the last special token before the cut: the
  `tokenizers` library splits a text at added tokens before anything else and tokenises each
  part on its own, so ``encode(text[:cut])`` is the whole text's ids up to that token followed
  by ``encode(text[token end:cut])``. That holds for the models, normalizers and pre-tokenizers
  `_anchor_ids` accepts and for the added tokens it names (not normalized, no right-strip, really
  split out); any other tokenizer tokenises whole prefixes, as the reference does.

The first rows of every process also go through the reference; if any differs, that process
uses the reference for the rest and says so (`Batcher.notes`), never a silently different result.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tunefleet.distributed.data.chat import messages_spans
from tunefleet.distributed.data.counts import Tally
from tunefleet.distributed.data.skeleton import SpanFinder
from tunefleet.distributed.data.tokenization import (
    Labelled,
    Rendered,
    _labelled,
    assemble,
    bound_chars,
    encode,
    labelled_bounded,
    piece_bounds,
    render_row,
)
from tunefleet.launch import hf_compat

if TYPE_CHECKING:  # pragma: no cover
    from tunefleet.launch.core.recipe import DataConfig

CHECK_ROWS = 8
"""Rows at the start of each process that also go through the per-row reference."""

_MODELS = ("BPE", "WordPiece", "WordLevel", "Unigram")


def _offset_dependent(node: Any) -> bool:
    """A pre-tokenizer that treats the start of the text differently from the start of a part
    (Metaspace prepending only to the first part): a part cannot be tokenised on its own."""
    if isinstance(node, dict):
        if node.get("type") == "Metaspace" and node.get("prepend_scheme", "first") == "first":
            return True
        return any(_offset_dependent(v) for v in node.values())
    if isinstance(node, list):
        return any(_offset_dependent(v) for v in node)
    return False


def _anchor_ids(tokenizer: Any, backend: Any) -> frozenset[int]:
    """Ids of the added tokens a prefix may be tokenised from (see the module docstring)."""
    try:
        config = json.loads(backend.to_str())
        added = backend.get_added_tokens_decoder()
    except Exception:  # noqa: BLE001 — not a `tokenizers` tokenizer we can read
        return frozenset()
    model = config.get("model") or {}
    if model.get("type") not in _MODELS or model.get("dropout") not in (None, 0, 0.0):
        return frozenset()  # BPE dropout: the same text tokenises differently each time
    if _offset_dependent(config.get("pre_tokenizer")) or _offset_dependent(config.get("normalizer")):
        return frozenset()
    split_special = bool(getattr(tokenizer, "split_special_tokens", False))
    return frozenset(
        i
        for i, t in added.items()
        if t.content and not t.rstrip and not t.normalized and not (t.special and split_special)
    )


class Encoder:
    """`tokenization.encode` for many texts per call, and `encode_pieces` for many texts."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer if hf_compat.plain_fast_tokenizer(tokenizer) else None
        self.anchor_ids = _anchor_ids(tokenizer, self.backend) if self.backend is not None else frozenset()
        self.pattern: Any = None
        """The anchor tokens' texts (longest first), to find where they may be."""
        if self.anchor_ids and self.backend is not None:
            added = self.backend.get_added_tokens_decoder()
            contents = sorted({added[i].content for i in self.anchor_ids}, key=len, reverse=True)
            self.pattern = re.compile("|".join(map(re.escape, contents)))

    def encode(self, texts: Sequence[str]) -> list[Any]:
        """One `tokenizers` Encoding (or, for a slow tokenizer, an id list) per text."""
        if self.backend is None:
            return [encode(self.tokenizer, t) for t in texts]
        b, split = self.backend, bool(getattr(self.tokenizer, "split_special_tokens", False))
        # what transformers sets before every call of `encode(..., add_special_tokens=False)`
        if b.truncation is not None:
            b.no_truncation()
        if b.padding is not None:
            b.no_padding()
        if b.encode_special_tokens != split:
            b.encode_special_tokens = split
        return b.encode_batch(list(texts), add_special_tokens=False)

    @staticmethod
    def ids(encoding: Any) -> list[int]:
        return encoding if isinstance(encoding, list) else encoding.ids

    def _anchor(
        self, matches: list[tuple[int, int]], encoding: Any, ids: list[int], end: int
    ) -> tuple[int, int]:
        """(character end, whole-text tokens up to it) of the last anchor token that ends by `end`:
        a match of an anchor's text that the whole text's encoding confirms as that token."""
        j = bisect.bisect_right(matches, (end, end)) - 1
        while j >= 0:
            a, b = matches[j]
            t = encoding.char_to_token(a) if b <= end else None
            if t is not None and ids[t] in self.anchor_ids:
                chars = encoding.token_to_chars(t)
                if chars is not None and chars[1] == b:
                    return b, t + 1
            j -= 1
        return 0, 0

    def pieces(self, items: Sequence[tuple[str, list[int]]]) -> list[list[list[int]]]:
        """`encode_pieces(text, bounds)` of every (text, bounds) item: the same pieces."""
        fulls = self.encode([text for text, _ in items])
        full_ids = [self.ids(e) for e in fulls]
        tails: list[str] = []
        starts: list[tuple[int, int, int]] = []  # (item, bound index, whole-text tokens kept)
        for n, (text, bounds) in enumerate(items):
            if len(bounds) == 1:
                continue
            matches = (
                [m.span() for m in self.pattern.finditer(text, 0, bounds[-2])]
                if self.pattern is not None
                else []
            )
            for k, end in enumerate(bounds[:-1]):
                anchor, kept = self._anchor(matches, fulls[n], full_ids[n], end)
                tails.append(text[anchor:end])
                starts.append((n, k, kept))
        prefixes: dict[tuple[int, int], list[int]] = {}
        for (n, k, kept), tail in zip(starts, self.encode(tails), strict=True):
            prefixes[n, k] = full_ids[n][:kept] + self.ids(tail)
        out = []
        for n, (text, bounds) in enumerate(items):
            ids: list[int] = []
            pieces = []
            start = 0
            for k, end in enumerate(bounds):
                whole = full_ids[n] if k == len(bounds) - 1 else prefixes[n, k]
                if whole[: len(ids)] == ids:
                    piece = whole[len(ids) :]
                else:  # a token would straddle the cut: the piece alone (as encode_pieces does)
                    piece = self.ids(self.encode([text[start:end]])[0])
                pieces.append(piece)
                ids.extend(piece)
                start = end
            out.append(pieces)
        return out


class Batcher:
    """Rows to examples in batches (see the module docstring). One per process: it keeps the
    shapes of the conversations it has seen and whether its first rows matched the reference."""

    def __init__(self, tokenizer: Any, cfg: DataConfig) -> None:
        self.tokenizer, self.cfg = tokenizer, cfg
        self.encoder = Encoder(tokenizer)
        self.spans = SpanFinder()
        self.checked_rows = 0
        self.disabled: str | None = None
        self.notes: list[str] = []

    def _render(self, row: dict, where: str, *, reference: bool) -> Rendered:
        c = self.cfg
        return render_row(
            row,
            fmt=c.format,
            tokenizer=self.tokenizer,
            completion_only_loss=c.completion_only_loss,
            text_field=c.text_field,
            messages_field=c.messages_field,
            where=where,
            spans=messages_spans if reference else self.spans,
        )

    def _reference(self, row: dict, where: str) -> tuple[Rendered, Labelled]:
        r = self._render(row, where, reference=True)
        return r, labelled_bounded(self.tokenizer, r, self.cfg.max_length)

    def rows(self, rows: Sequence[dict], first: int, where: str, tally: Tally) -> list[dict]:
        """The examples of `rows` (row numbers from `first` in error messages), counted in `tally`."""
        if not self.disabled:
            before = self.spans.reference_rows
            results = self._fast(rows, first, where)
            self._check(rows, first, where, results)
            if not self.disabled:
                tally.reference_rows += self.spans.reference_rows - before
        if self.disabled:
            results = [self._reference(row, f"{where} row {first + i}") for i, row in enumerate(rows)]
            tally.reference_rows += len(rows)
        examples = []
        for r, out in results:
            tally.bounded_rows += out.bounded
            example = tally.add(
                out.input_ids,
                out.labels,
                max_length=self.cfg.max_length,
                more_labelled=out.more_labelled,
                answers=r.answers,
                empty_answers=r.empty_answers,
            )
            if example is not None:
                examples.append(example)
        return examples

    def _fast(self, rows: Sequence[dict], first: int, where: str) -> list[tuple[Rendered, Labelled]]:
        rendered = [
            self._render(row, f"{where} row {first + i}", reference=False) for i, row in enumerate(rows)
        ]
        limit = 2 * bound_chars(self.tokenizer, self.cfg.max_length)
        batch = [n for n, r in enumerate(rendered) if len(r.text) <= limit]
        bounds = {n: piece_bounds(rendered[n].text, [c for s in rendered[n].spans for c in s]) for n in batch}
        pieces = self.encoder.pieces([(rendered[n].text, bounds[n]) for n in batch])
        results: dict[int, Labelled] = {
            n: Labelled(*assemble(rendered[n].text, rendered[n], bounds[n], p))
            for n, p in zip(batch, pieces, strict=True)
        }
        for n, r in enumerate(rendered):  # far longer than data.max_length: a prefix is enough
            if n not in results:
                results[n] = labelled_bounded(self.tokenizer, r, self.cfg.max_length)
        return [(rendered[n], results[n]) for n in range(len(rows))]

    def _check(self, rows: Sequence[dict], first: int, where: str, results: list) -> None:
        """The first CHECK_ROWS rows of this process, once more through the reference."""
        for i, row in enumerate(rows):
            if self.checked_rows >= CHECK_ROWS:
                return
            self.checked_rows += 1
            r, out = results[i]
            ref = self._render(row, f"{where} row {first + i}", reference=True)
            want = _labelled(self.tokenizer, ref) if not out.bounded else None
            got = (out.input_ids, out.labels)
            if ref.text != r.text or ref.spans != r.spans or (want is not None and want != got):
                self.disabled = (
                    f"row {first + i}: the batched tokenisation differs from the per-row reference"
                )
                self.notes.append(
                    f"batched tokenisation turned off in one process ({self.disabled}); the per-row path "
                    "tokenised its rows instead"
                )
                return
