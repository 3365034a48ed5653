"""Activated LoRA (`peft.alora_invocation`): the invocation string as tokens, and the check that
every training example holds it where it must.

PEFT switches an aLoRA adapter on from the last occurrence of the invocation tokens in each row
and leaves the base model alone before it. Tokens are not text: a string tokenised alone can come
out differently inside a prompt ("Response:" vs " Response:"), and PEFT does not complain when the
tokens never occur — the adapter then simply never acts on that example, and it trains nothing.
So the data is checked before any model loads: in every example the invocation must start before
the first trained token (the token whose prediction the adapter should change).
"""

from __future__ import annotations

from typing import Any

from tunefleet.distributed.data import IGNORE_INDEX
from tunefleet.launch.core.errors import DataError
from tunefleet.launch.core.recipe import Recipe


def invocation_tokens(tokenizer: Any, recipe: Recipe) -> list[int] | None:
    """`peft.alora_invocation` tokenised with the run's tokenizer (no special tokens), or None."""
    text = recipe.peft.alora_invocation
    if text is None:
        return None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def last_occurrence(ids: list[int], tokens: list[int]) -> int | None:
    """Where the last occurrence of `tokens` starts in `ids` (PEFT's rule), or None."""
    n = len(tokens)
    for start in range(len(ids) - n, -1, -1):
        if ids[start : start + n] == tokens:
            return start
    return None


def check_invocation(dataset: Any, tokens: list[int], text: str, tokenizer: Any) -> None:
    """Refuse when an example lacks the invocation tokens before its first trained token."""
    bad: list[int] = []
    for index, example in enumerate(dataset):
        ids, labels = list(example["input_ids"]), list(example["labels"])
        start = last_occurrence(ids, tokens)
        first_trained = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(ids))
        # the prediction of token i is made at position i - 1: the adapter must be on there
        if start is None or start > first_trained - 1:
            bad.append(index)
    if bad:
        shown = [tokenizer.decode([t]) for t in tokens]
        raise DataError(
            f"peft.alora_invocation={text!r} (tokens {tokens} = {shown}) does not occur before the first "
            f"trained token in {len(bad)} of {len(dataset)} training examples (first: example {bad[0] + 1}); "
            "the aLoRA adapter would never act on them",
            "use text that every prompt ends with, tokenised as it is inside the prompt (e.g. '### Response:\\n' "
            "for alpaca; mind a leading space or newline), or drop peft.alora_invocation",
        )
