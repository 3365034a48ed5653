"""Training data: load rows, render them in one of four formats, tokenise with answer-only labels.

Three layers (`tests/test_layers.py` checks that each module imports only its own layer and those
below):

1. `loading` (data sources to rows, the evaluation hold-out);
2. `chat` (chat-template rendering and assistant-answer spans, the reference) and `skeleton`
   (the same spans with one template run per conversation);
3. `tokenization` (rows to ids and labels, the per-row reference), `counts` (what was kept, cut
   and dropped), `batched` (the same ids and labels for many rows at once), then on top
   `parallel` (a split on several processes into Arrow shards) and `progress` (its display).

`datasets`, `pyarrow` and `transformers` are imported only inside the functions that need them,
so importing this package is cheap.

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
character spans that are trained on (:func:`chat.messages_spans` for chat templates). The string
is then tokenised piece by piece at the span boundaries (:func:`tokenization.encode_pieces`;
`batched.Encoder.pieces` computes the same for many rows at once): each piece is
the tail of the tokenisation of the whole text up to its end when that is a prefix-extension of
what came before (so, in the usual case, the ids are exactly the tokenisation of the full text),
and is tokenised on its own when a token would straddle the boundary. The labelled tokens
therefore always decode to exactly the answer text, and the prompt tokens are exactly what the
model sees at inference time (the prompt tokenised alone).
"""

from tunefleet.distributed.data.chat import ROLES, columns_to_messages
from tunefleet.distributed.data.loading import DATA_SUFFIXES, load_rows, split_eval
from tunefleet.distributed.data.tokenization import (
    IGNORE_INDEX,
    alpaca_prompt,
    build_dataset,
    encode,
    special_prefix,
    tokenize_example,
)

__all__ = [
    "DATA_SUFFIXES",
    "IGNORE_INDEX",
    "ROLES",
    "alpaca_prompt",
    "build_dataset",
    "columns_to_messages",
    "encode",
    "load_rows",
    "special_prefix",
    "split_eval",
    "tokenize_example",
]
