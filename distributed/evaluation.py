"""Evaluation at the end of training and the generation sample written next to the adapter.

* `FinalEvalCallback`: when the run has an eval split, the last optimizer step is always
  evaluated (with `train.eval_steps: 0` too), so every run with eval data ends with an eval loss
  in metrics.jsonl, loss.png and the trackers.
* `write_samples`: a few prompts from the eval split (the first training rows when there is none;
  with a mixture, those of its first source),
  their reference answers, the fine-tuned model's greedy answers and the base model's (the
  adapter switched off), in `samples.jsonl`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from tunefleet.launch.core.recipe import WEIGHT_METHODS, Recipe, data_sources

SAMPLE_PROMPTS = 4
SAMPLE_MAX_NEW_TOKENS = 64
SHARDED_STRATEGIES = ("fsdp", "fsdp-qlora", "deepspeed-zero3")
"""Strategies whose forward pass needs every rank: rank 0 cannot generate alone."""


class FinalEvalCallback(TrainerCallback):
    """Evaluate at the last step even without periodic evaluation (the stock flow does it only
    when `eval_strategy="steps"`; setting the flag twice is harmless)."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= state.max_steps:
            control.should_evaluate = True


def _base_model(recipe: Recipe, path: str | None, trained: Any) -> Any:
    """The base model as the run loaded it (its dtype and quantization), on the trained model's device."""
    from tunefleet.distributed import model as model_mod

    precision = model_mod.resolve_precision(recipe)
    base = model_mod.load_model(path or model_mod.resolve_model_path(recipe.model), recipe, precision)
    return base.to(next(trained.parameters()).device).eval()


def final_eval_loss(log_history: list[dict[str, Any]]) -> float | None:
    losses = [row["eval_loss"] for row in log_history if "eval_loss" in row]
    return losses[-1] if losses else None


def write_samples(
    model: Any,
    tokenizer: Any,
    recipe: Recipe,
    *,
    eval_rows: list[dict],
    train_rows: list[dict],
    path: Path,
    base_model_path: str | None = None,
    n: int = SAMPLE_PROMPTS,
    max_new_tokens: int = SAMPLE_MAX_NEW_TOKENS,
) -> str:
    """Write `samples.jsonl` (rank 0 only); return a one-line summary for the run table. The base
    model's answers come from the adapter switched off, or (full/freeze, which changed the weights
    themselves) from the base model loaded again from `base_model_path`."""
    from tunefleet.distributed.generate import generate, render_prompt, stop_token_ids

    split, rows = ("eval", eval_rows) if eval_rows else ("train", train_rows)
    # the rows are data.eval_path's (in data.format) or the first training source's (in its format)
    data = recipe.data if split == "eval" and recipe.data.eval_path else data_sources(recipe.data)[0].data
    if data.format == "text":
        return "skipped (data.format=text has no prompt/answer split)"
    if recipe.parallel.strategy in SHARDED_STRATEGIES:
        return f"skipped ({recipe.parallel.strategy} shards the model: use `tunefleet generate` on the run)"
    prompts = [
        render_prompt(row, data=data, tokenizer=tokenizer, where=f"{split} row {i + 1}")
        for i, row in enumerate(rows[:n])
    ]

    def answer_all(with_model: Any) -> list[Any]:
        return generate(
            with_model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            batch_size=n,
            stop_ids=stop_token_ids(tokenizer, data.format, with_model.generation_config),
        )

    try:
        answers = answer_all(model)
        if recipe.peft.method in WEIGHT_METHODS:  # the weights changed: the base is read again
            base = answer_all(_base_model(recipe, base_model_path, model))
        else:
            with model.disable_adapter():  # the same prompts without the adapter: what training changed
                base = answer_all(model)
    except Exception as exc:  # noqa: BLE001 — the run is finished and saved: a sample must not fail it
        # e.g. bitsandbytes' CPU 4-bit decoding kernel rejects the demo model's odd layer widths
        return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    with path.open("w", encoding="utf-8") as f:
        for prompt, answer, before in zip(prompts, answers, base, strict=True):
            row = {
                "split": split,
                "prompt": prompt.shown,
                "reference": prompt.reference,
                "generated": answer.text,
                "stopped": answer.stopped,
                "base": before.text,
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    right = sum(prompt.reference == answer.text for prompt, answer in zip(prompts, answers, strict=True))
    return (
        f"{path} ({len(prompts)} {split} prompts, greedy, max {max_new_tokens} new tokens; "
        f"{right} answered as the reference, base model in `base`)"
    )
