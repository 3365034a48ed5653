"""Training data: load rows, render them in one of four formats, tokenise with answer-only labels.

Three layers, each a module: `loading` (data sources to rows, the evaluation hold-out), `chat`
(chat-template rendering and assistant-answer spans) and `tokenization` (rows to ids and labels).
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
is then tokenised piece by piece at the span boundaries (:func:`tokenization.encode_pieces`): each piece is
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
