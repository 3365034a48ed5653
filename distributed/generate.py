"""Answers from a trained adapter, in the prompt format the run was trained on.

A prompt is a plain string or a data row in the run's `data.format`; it is rendered exactly as
training rendered the prompt part of an example:

* `alpaca`: seed 000's template up to `### Response:\\n` (`data.alpaca_prompt`), after the
  tokenizer's own prefix (e.g. bos), as in training;
* `messages`: the model's chat template with the generation prompt added; a row's conversation
  is cut before its last assistant turn, which becomes the reference answer;
* `prompt-completion`: the prompt; `text`: the text, continued.

Decoding is greedy unless a temperature is given, batched with left padding, and stops at the
tokenizer's eos, the model's configured eos ids and, for chat templates, the token the template
writes right after an assistant answer (`<|eot_id|>`, `<|im_end|>`, `<end_of_turn>`, ...).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunefleet.launch.core.errors import DataError, TunefleetError
from tunefleet.launch.core.recipe import data_sources

if TYPE_CHECKING:  # pragma: no cover
    from tunefleet.distributed.artifacts import RunAdapter
    from tunefleet.launch.core.recipe import DataConfig

DEFAULT_MAX_NEW_TOKENS = 256
_PROBE_ANSWER = "tunefleet-probe-answer"


@dataclass(frozen=True, kw_only=True)
class Prompt:
    shown: str
    """What the user wrote (instruction, last user turn, prompt), for display."""
    text: str
    """The rendered prompt the model sees."""
    ids: list[int]
    """Its token ids, tokenised as in training."""
    reference: str | None = None
    """The reference answer when the prompt came from a data row that has one."""


@dataclass(frozen=True, kw_only=True)
class Answer:
    text: str
    """The generated answer, special tokens removed, stripped."""
    new_tokens: int
    """Tokens generated, including the stop token."""
    stopped: bool
    """True when generation ended on a stop token (not on max_new_tokens)."""


# ----------------------------------------------------------------------------- prompts


def _as_row(item: str | dict, data: DataConfig) -> dict:
    if isinstance(item, dict):
        return item
    rows: dict[str, dict] = {
        "alpaca": {"instruction": item, "input": ""},
        "messages": {data.messages_field: [{"role": "user", "content": item}]},
        "prompt-completion": {"prompt": item},
        "text": {data.text_field: item},
    }
    return rows[data.format]


def _conversation(row: dict, data: DataConfig, where: str) -> tuple[list[dict], str | None]:
    from tunefleet.distributed import data as data_mod

    messages = row.get(data.messages_field)
    if messages is None:
        messages = data_mod.columns_to_messages(row)  # seed 003's system/user/assistant columns
    ok = (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    )
    if not ok:
        raise DataError(
            f"{where}: expected {data.messages_field!r}: a list of {{role, content}} turns",
            'write the row as {"messages": [{"role": "user", "content": ...}]} or give a plain prompt',
        )
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if assistant and assistant[-1] > 0:
        return messages[: assistant[-1]], messages[assistant[-1]]["content"]
    return messages, None


def render_prompt(item: str | dict, *, data: DataConfig, tokenizer: Any, where: str = "prompt") -> Prompt:
    """Render one prompt (a string, or a row in `data.format`) as the run's training did."""
    from tunefleet.distributed import data as data_mod

    row = _as_row(item, data)
    fmt = data.format
    if fmt == "messages":
        messages, reference = _conversation(row, data, where)
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 — jinja errors from the template
            raise DataError(
                f"{where}: the chat template rejected the conversation: {exc}",
                "check the roles (most templates want user/assistant turns to alternate)",
            ) from None
        user = [m["content"] for m in messages if m["role"] == "user"]
        return Prompt(
            shown=user[-1] if user else messages[-1]["content"],
            text=text,
            ids=data_mod.encode(tokenizer, text),
            reference=reference,
        )

    def field(key: str, required: bool = True) -> str:
        value = row.get(key)
        if value is None and not required:
            return ""
        if not isinstance(value, str):
            raise DataError(
                f"{where}: the {fmt} format needs a string {key!r} (the row has: {', '.join(row)})",
                f"give a plain prompt, or a row with {key!r}",
            )
        return value

    if fmt == "alpaca":
        instruction, inp = field("instruction"), field("input", required=False)
        shown = instruction + (f"\n\n{inp}" if inp.strip() else "")
        text, reference = data_mod.alpaca_prompt(instruction, inp), row.get("output")
    elif fmt == "prompt-completion":
        text = shown = field("prompt")
        reference = row.get("completion")
    else:
        text = shown = field(data.text_field)
        reference = None
    ids = data_mod.special_prefix(tokenizer) + data_mod.encode(tokenizer, text)
    return Prompt(
        shown=shown, text=text, ids=ids, reference=reference if isinstance(reference, str) else None
    )


def read_prompts_file(path: str | Path) -> list[str | dict]:
    """`.jsonl`/`.json`/`.parquet`: rows in the run's data format; anything else: one prompt per line."""
    from tunefleet.distributed import data as data_mod

    path = Path(path)
    if path.suffix.lower() in data_mod.DATA_SUFFIXES:
        return list(data_mod.load_rows(str(path), what="--prompts-file"))
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except OSError as exc:
        raise TunefleetError(
            f"--prompts-file {str(path)!r} cannot be read: {exc.strerror or exc}",
            "pass a text file with one prompt per line, or a .jsonl file of rows",
        ) from None
    prompts: list[str | dict] = [line for line in lines if line]
    if not prompts:
        raise TunefleetError(f"--prompts-file {str(path)!r} holds no prompts", "write one prompt per line")
    return prompts


# ----------------------------------------------------------------------------- stopping


def stop_token_ids(tokenizer: Any, fmt: str, generation_config: Any = None) -> list[int]:
    """Token ids that end an answer: eos, the model's configured eos ids, and for chat formats the
    token the chat template writes right after an assistant answer."""
    ids: list[int] = []

    def add(value: Any) -> None:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)

    add(tokenizer.eos_token_id)
    if generation_config is not None:
        add(getattr(generation_config, "eos_token_id", None))
    if fmt == "messages":
        add(end_of_turn_id(tokenizer))
    return ids


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token the chat template writes right after an assistant answer, or None."""
    user = [{"role": "user", "content": "hello"}]
    try:
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            user + [{"role": "assistant", "content": _PROBE_ANSWER}],
            tokenize=False,
            add_generation_prompt=False,
        )
    except Exception:  # noqa: BLE001 — no template, or one that wants other roles
        return None
    at = full.find(_PROBE_ANSWER, len(prompt) if full.startswith(prompt) else 0)
    if at < 0:
        return None
    after = full[at + len(_PROBE_ANSWER) :]
    ids = tokenizer.encode(after, add_special_tokens=False) if after else []
    special = set(getattr(tokenizer, "all_special_ids", [])) | set(
        getattr(tokenizer, "added_tokens_decoder", {})
    )
    return ids[0] if ids and ids[0] in special else None


# ----------------------------------------------------------------------------- generation


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[Prompt],
    *,
    stop_ids: list[int],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 8,
) -> list[Answer]:
    """Generate one answer per prompt, `batch_size` prompts at a time (left-padded)."""
    import torch
    from transformers import GenerationConfig

    if not stop_ids:
        raise TunefleetError(
            "the tokenizer has no eos token, so generation could not stop",
            "set an eos token on the tokenizer",
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    sampling = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
        use_cache=True,
        **({"temperature": temperature, "top_p": top_p} if sampling else {}),
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # TRL turns on an MoE model's router logits for its load-balancing loss; transformers' generate
    # then fails in that loss once the KV cache is used (measured on gpt-oss: "The size of tensor a
    # (4) must match the size of tensor b (32)"). Generation needs no router loss.
    router_logits = getattr(model.config, "output_router_logits", None)
    if router_logits:
        model.config.output_router_logits = False
    answers: list[Answer] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            width = max(len(p.ids) for p in batch)
            input_ids = torch.tensor([[pad_id] * (width - len(p.ids)) + p.ids for p in batch], device=device)
            mask = torch.tensor([[0] * (width - len(p.ids)) + [1] * len(p.ids) for p in batch], device=device)
            with torch.no_grad():
                out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
            for row in out[:, width:].tolist():
                stop_at = next((i for i, t in enumerate(row) if t in stop_ids), None)
                kept = row if stop_at is None else row[: stop_at + 1]
                answers.append(
                    Answer(
                        text=tokenizer.decode(kept, skip_special_tokens=True).strip(),
                        new_tokens=len(kept),
                        stopped=stop_at is not None,
                    )
                )
    finally:
        model.train(was_training)
        if router_logits:
            model.config.output_router_logits = router_logits
    return answers


# ----------------------------------------------------------------------------- a run's model


def inference_precision(recipe: Any) -> Any:
    """The recipe's precision on this machine; fp16 runs fall back to fp32 on a CPU."""
    import torch

    from tunefleet.distributed import model as model_mod
    from tunefleet.launch.core.errors import RecipeError

    try:
        return model_mod.resolve_precision(recipe)
    except RecipeError:  # train.precision=fp16 read on a machine without a GPU
        return model_mod.Precision(mode="fp32", dtype=torch.float32, use_cpu=True)


def load_tokenizer(adapter: RunAdapter) -> Any:
    """The run's tokenizer (saved with the adapter), else the base model's."""
    from tunefleet.distributed import model as model_mod

    recipe = adapter.recipe
    source = (
        str(adapter.adapter_dir)
        if (adapter.adapter_dir / "tokenizer_config.json").is_file()
        else model_mod.resolve_model_path(recipe.model)
    )
    return model_mod.load_tokenizer(source, recipe.model)


def load_run_model(adapter: RunAdapter) -> tuple[Any, Any]:
    """(the fine-tuned model, the tokenizer): the base (the recipe's dtype and quantization) with the
    run's adapter, or a full/freeze run's whole model."""
    import torch
    from peft import PeftModel

    from tunefleet.distributed import model as model_mod

    recipe = adapter.recipe
    model_mod.check_loadable_here(recipe)
    tokenizer = load_tokenizer(adapter)
    if not torch.cuda.is_available() and recipe.model.quantization in ("nf4", "fp4", "int8"):
        # bitsandbytes' CPU 4-bit inference kernel rejects some layer widths: on CPU the base is
        # loaded unquantized (the answers can differ from the quantized model's by its rounding)
        print(f"note: CPU generation loads the {recipe.model.quantization} base unquantized", file=sys.stderr)
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, quantization="none"))
    if adapter.kind == "model":  # a full or partial fine-tune: the whole model
        tuned = model_mod.from_pretrained(str(adapter.adapter_dir), dtype=inference_precision(recipe).dtype)
        tuned.config.use_cache = True
        return (tuned.to("cuda") if torch.cuda.is_available() else tuned).eval(), tokenizer
    model = PeftModel.from_pretrained(load_base(recipe), str(adapter.adapter_dir))
    model.eval()
    return model, tokenizer


def load_base(recipe: Any) -> Any:
    """The recipe's base model for inference (its dtype and quantization), on the GPU when there is one."""
    import torch

    from tunefleet.distributed import model as model_mod

    base = model_mod.load_model(
        model_mod.resolve_model_path(recipe.model), recipe, inference_precision(recipe)
    )
    base.config.use_cache = True
    if torch.cuda.is_available() and recipe.model.quantization == "none":
        base = base.to("cuda")  # bitsandbytes models are placed on the GPU when they load
    return base.eval()


def bounded_new_tokens(model: Any, asked: int) -> int:
    """`--max-new-tokens`, at most the model's context (`max_position_embeddings`): beyond it a model
    has never seen a position, and a huge value would run for ever. Says so when it cuts."""
    config = getattr(model, "config", None)
    context = getattr(getattr(config, "text_config", None) or config, "max_position_embeddings", None)
    if isinstance(context, int) and asked > context:
        print(f"note: --max-new-tokens {asked:,} is beyond the model's context of {context:,} tokens: "
              f"generating at most {context:,}", file=sys.stderr)  # fmt: skip
        return context
    return asked


def generate_for_run(
    path: str | Path,
    items: list[str | dict],
    *,
    compare_base: bool = False,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.0,
    batch_size: int = 8,
) -> tuple[RunAdapter, list[dict[str, Any]]]:
    """Answer `items` with the run's adapter (and the base model with the adapter switched off)."""
    from tunefleet.distributed.artifacts import find_adapter

    adapter = find_adapter(path)
    model, tokenizer = load_run_model(adapter)
    max_new_tokens = bounded_new_tokens(model, max_new_tokens)
    data = data_sources(adapter.recipe.data)[0].data  # a mixture's prompts are rendered like its first source
    prompts = [
        render_prompt(item, data=data, tokenizer=tokenizer, where=f"prompt {i + 1}")
        for i, item in enumerate(items)
    ]
    stop_ids = stop_token_ids(tokenizer, data.format, model.generation_config)
    answer_all = functools.partial(
        generate,
        tokenizer=tokenizer,
        prompts=prompts,
        stop_ids=stop_ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        batch_size=batch_size,
    )
    tuned = answer_all(model)
    base = None
    if compare_base and adapter.kind == "model":  # the weights changed: the base model is read again
        base = answer_all(load_base(adapter.recipe))
    elif compare_base:
        with model.disable_adapter():
            base = answer_all(model)
    results = []
    for i, (prompt, answer) in enumerate(zip(prompts, tuned, strict=True)):
        row: dict[str, Any] = {"prompt": prompt.shown, "answer": answer.text, "stopped": answer.stopped}
        if base is not None:
            row["base_answer"] = base[i].text
        if prompt.reference is not None:
            row["reference"] = prompt.reference
        results.append(row)
    return adapter, results


def print_results(adapter: RunAdapter, results: list[dict[str, Any]], *, as_jsonl: bool = False) -> None:
    """One JSON object per line, or a table: prompt | base | fine-tuned (| reference)."""
    if as_jsonl:
        for row in results:
            print(json.dumps(row, ensure_ascii=False), flush=True)
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    prompt_format = data_sources(adapter.recipe.data)[0].data.format
    table = Table(
        title=f"{adapter.run_dir} ({adapter.label}, {prompt_format} prompts)",
        title_justify="left",
        show_lines=True,
    )
    table.add_column("prompt", style="bold")
    if any("base_answer" in r for r in results):
        table.add_column("base model")
    table.add_column(f"fine-tuned ({adapter.label})")
    if any("reference" in r for r in results):
        table.add_column("reference", style="dim")
    for r in results:  # Text cells: answers are shown verbatim, never read as rich markup
        cells = [Text(r["prompt"])]
        if "base_answer" in r:
            cells.append(Text(r["base_answer"]))
        cells.append(
            Text(r["answer"]) + Text("" if r["stopped"] else " (max_new_tokens reached)", style="dim")
        )
        if any("reference" in x for x in results):
            cells.append(Text(r.get("reference", "")))
        table.add_row(*cells)
    Console().print(table)
