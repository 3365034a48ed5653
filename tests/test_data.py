"""distributed/data.py: loading, formatting, tokenising with answer-only label masks.

Everything runs offline: the tokenizers are small byte-level BPEs trained here with the
`tokenizers` library and wrapped in `PreTrainedTokenizerFast` with Llama-3, ChatML (Qwen2.5)
and generation-marker chat templates.
"""

from __future__ import annotations

import json
import random
from functools import cache, lru_cache
from pathlib import Path

import pytest

from tunefleet.distributed import data as D
from tunefleet.launch.core.errors import DataError
from tunefleet.launch.core.recipe import DataConfig

# ----------------------------------------------------------------------------- tokenizers

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# as TRL's qwen2_5_training.jinja: the marked block is "\n" + content + "<|im_end|>\n"
GENERATION_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- generation %}{{- '\n' + message.content + '<|im_end|>\n' }}{%- endgeneration %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# Qwen3-like: the final assistant turn gets an (empty) think block, earlier ones do not, so the
# rendering of a turn changes once a later turn follows (not prefix-stable).
_QWEN3_LIKE_BODY = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\n' }}"
    "{%- if loop.last %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "@@{{- message.content + '<|im_end|>' }}##{{- '\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
QWEN3_LIKE_TEMPLATE = _QWEN3_LIKE_BODY.replace("@@", "").replace("##", "")
QWEN3_LIKE_GENERATION_TEMPLATE = _QWEN3_LIKE_BODY.replace("@@", "{%- generation %}").replace(
    "##", "{%- endgeneration %}"
)

# Phi-3: the eos is written only after the final turn (not prefix-stable at the conversation end)
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# gpt-oss-like: the final answer ends with <|return|>, earlier ones with <|end|>; the generation
# prompt stops before the channel, so the channel header is part of what the model writes
GPTOSS_LIKE_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + message.content }}"
    "{%- if loop.last %}{{- '<|return|>' }}{%- else %}{{- '<|end|>' }}{%- endif %}"
    "{%- else %}{{- '<|start|>' + message.role + '<|message|>' + message.content + '<|end|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start|>assistant' }}{%- endif %}"
)

SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<|start|>",
    "<|channel|>",
    "<|message|>",
    "<|return|>",
]
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
WORDS = (
    "the a quick brown fox jumps over lazy dog cat bird capital city of france paris is answer "
    "question what how many words are in this text reverse order sort letters alphabetical count "
    "sun moon planet rabbit garden purple winter orange table book candle door fire you assistant "
    "helpful model learns patterns examples tokens train language predicting next again window"
).split()


def _corpus() -> list[str]:
    rng = random.Random(0)
    lines = []
    for i in range(400):
        words = rng.choices(WORDS, k=rng.randint(3, 12))
        sep = rng.choice([" ", " ", " ", "\n", "\n\n", ", "])
        line = sep.join(words).capitalize() + rng.choice([".", "?", "!", ":", ""])
        if i % 7 == 0:
            line += f" {rng.randint(0, 999)} + {rng.randint(0, 99)} = {rng.randint(0, 999)}"
        if i % 5 == 0:
            line = "### Instruction:\n" + line + "\n\n### Response:\n" + line[::-1]
        lines.append(line)
    return lines


@lru_cache(maxsize=1)
def _base_tokenizer_json() -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


@cache
def make_tokenizer(kind: str):
    """`llama3` (BOS added by the tokenizer, eos <|eot_id|>), `qwen25` (ChatML, default system
    prompt), `generation` (ChatML with {% generation %} markers), `qwen3` / `qwen3-generation`."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_base_tokenizer_json())
    if kind == "llama3":
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>",
            pad_token="<|end_of_text|>",
            chat_template=LLAMA3_TEMPLATE,
            clean_up_tokenization_spaces=False,
        )
    template = {
        "qwen25": QWEN25_TEMPLATE,
        "generation": GENERATION_TEMPLATE,
        "qwen3": QWEN3_LIKE_TEMPLATE,
        "qwen3-generation": QWEN3_LIKE_GENERATION_TEMPLATE,
        "phi3": PHI3_TEMPLATE,
        "gptoss": GPTOSS_LIKE_TEMPLATE,
    }[kind]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token={"phi3": "<|endoftext|>", "gptoss": "<|return|>"}.get(kind, "<|im_end|>"),
        pad_token="<|endoftext|>",
        chat_template=template,
        clean_up_tokenization_spaces=False,
    )


EOT = {
    "llama3": "<|eot_id|>",
    "qwen25": "<|im_end|>",
    "generation": "<|im_end|>",
    "qwen3": "<|im_end|>",
    "qwen3-generation": "<|im_end|>",
    "phi3": "<|end|>",
    "gptoss": "<|end|>",
}


def labelled_runs(tok, example) -> list[str]:
    """Decode each maximal run of labelled tokens; checks labels equal input_ids where set."""
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels)
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label == -100:
            if current:
                runs.append(current)
                current = []
        else:
            assert label == token
            current.append(token)
    if current:
        runs.append(current)
    return [tok.decode(run, skip_special_tokens=False) for run in runs]


def conversation(n_exchanges: int, system: bool, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    msgs = [{"role": "system", "content": "You are a terse assistant."}] if system else []
    for i in range(n_exchanges):
        q = " ".join(rng.choices(WORDS, k=rng.randint(2, 8))).capitalize() + "?"
        a = " ".join(rng.choices(WORDS, k=rng.randint(1, 10))).capitalize() + f" {i + 17}."
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs


def tok_ex(row, fmt, tok, max_length=4096, **kw):
    return D.tokenize_example(row, fmt=fmt, tokenizer=tok, max_length=max_length, where="t.jsonl row 1", **kw)


# ----------------------------------------------------------------------------- messages


ALL_KINDS = ["llama3", "qwen25", "generation", "qwen3", "qwen3-generation", "phi3", "gptoss"]


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_messages_labels_are_exactly_the_answers_with_end_of_turn(kind, system, n):
    tok = make_tokenizer(kind)
    msgs = conversation(n, system, seed=n * 10 + system)
    ex = tok_ex({"messages": msgs}, "messages", tok)
    answers = [m["content"] + EOT[kind] for m in msgs if m["role"] == "assistant"]
    if kind.startswith("qwen3"):
        # the final turn is prefix-stable, and its think block is part of what the model writes
        answers[-1] = "<think>\n\n</think>\n\n" + answers[-1]
    if kind == "phi3":
        answers[-1] += "\n<|endoftext|>"  # the template closes the conversation with the eos
    if kind == "gptoss":
        answers = ["<|channel|>final<|message|>" + a for a in answers]
        answers[-1] = answers[-1].replace("<|end|>", "<|return|>")
    assert labelled_runs(tok, ex) == answers
    # the input is the template's own rendering, tokenised
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(ex["input_ids"], skip_special_tokens=False) == rendered


def test_llama3_token_by_token():
    tok = make_tokenizer("llama3")
    msgs = [
        {"role": "user", "content": "What is the capital of france?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And the moon?"},
        {"role": "assistant", "content": "No capital."},
    ]
    ex = tok_ex({"messages": msgs}, "messages", tok)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    # tokens entirely equal to the full-text tokenisation (no boundary straddled)
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert ex["input_ids"] == tok.encode(full, add_special_tokens=False)
    assert ex["input_ids"][0] == tok.bos_token_id and ex["labels"][0] == -100
    labelled = [i for i, lab in enumerate(ex["labels"]) if lab != -100]
    # the last labelled token of each answer is <|eot_id|>; the one after it is a header
    ends = [i for i in labelled if i + 1 not in labelled]
    assert [ex["input_ids"][i] for i in ends] == [eot, eot]
    for i in labelled:
        assert ex["labels"][i] == ex["input_ids"][i]
    assert tok.decode([ex["input_ids"][i] for i in labelled], skip_special_tokens=False) == (
        "Paris.<|eot_id|>No capital.<|eot_id|>"
    )


def test_chatml_default_system_prompt_and_trailing_newline_unlabelled():
    tok = make_tokenizer("qwen25")
    msgs = [{"role": "user", "content": "Count the words."}, {"role": "assistant", "content": "Three."}]
    ex = tok_ex({"messages": msgs}, "messages", tok)
    text = tok.decode(ex["input_ids"], skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou are Qwen")
    assert text.endswith("Three.<|im_end|>\n")
    assert ex["labels"][-1] == -100  # the "\n" after <|im_end|>
    assert labelled_runs(tok, ex) == ["Three.<|im_end|>"]


@pytest.mark.parametrize("kind", ["qwen25", "llama3"])
def test_answer_starting_with_newline_straddling_token(kind):
    # "assistant\n" + "\nanswer" would merge "\n\n" into one token across the boundary
    tok = make_tokenizer(kind)
    answer = "\n\nSort the letters." if kind == "qwen25" else "Sort\n\nthe letters."
    msgs = [{"role": "user", "content": "Sort?"}, {"role": "assistant", "content": answer}]
    ex = tok_ex({"messages": msgs}, "messages", tok)
    assert labelled_runs(tok, ex) == [answer + EOT[kind]]


def test_messages_completion_only_loss_false_labels_everything():
    tok = make_tokenizer("qwen25")
    ex = tok_ex({"messages": conversation(2, False)}, "messages", tok, completion_only_loss=False)
    assert ex["labels"] == ex["input_ids"]


def test_messages_custom_field_and_extra_keys():
    tok = make_tokenizer("llama3")
    row = {"conv": conversation(1, True), "id": 7}
    ex = tok_ex(row, "messages", tok, messages_field="conv")
    assert len(labelled_runs(tok, ex)) == 1


def test_content_search_failure_is_a_clear_error():
    # not prefix-stable AND the answer text is rewritten: the answer cannot be found
    from transformers import PreTrainedTokenizerFast

    base = make_tokenizer("qwen25")
    template = QWEN3_LIKE_TEMPLATE.replace(
        "message.content + '<|im_end|>'", "message.content | upper + '<|im_end|>'"
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer, eos_token="<|im_end|>", chat_template=template
    )
    with pytest.raises(DataError, match="cannot locate the text of assistant turn 1") as info:
        tok_ex({"messages": conversation(2, False)}, "messages", tok)
    assert "t.jsonl row 1" in str(info.value) and "generation" in info.value.fix


def test_generation_markers_used_when_not_prefix_stable():
    # same rewriting template, with {% generation %} markers: the marked blocks give the spans
    from transformers import PreTrainedTokenizerFast

    base = make_tokenizer("qwen25")
    template = QWEN3_LIKE_GENERATION_TEMPLATE.replace(
        "message.content + '<|im_end|>'", "message.content | upper + '<|im_end|>'"
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer, eos_token="<|im_end|>", chat_template=template
    )
    msgs = conversation(3, True)
    ex = tok_ex({"messages": msgs}, "messages", tok)
    # every turn comes from its marked block (the rewritten answer fails the incremental check)
    answers = [m["content"].upper() + "<|im_end|>" for m in msgs if m["role"] == "assistant"]
    assert labelled_runs(tok, ex) == answers


# ----------------------------------------------------------------------------- alpaca & co


@pytest.mark.parametrize("kind", ["llama3", "qwen25"])
@pytest.mark.parametrize("inp", ["bread plant table", "", "   "])
def test_alpaca_template_and_labels(kind, inp):
    tok = make_tokenizer(kind)
    row = {"instruction": "Reverse the order of the words.", "input": inp, "output": "table plant bread"}
    ex = tok_ex(row, "alpaca", tok)
    eos = tok.eos_token
    assert labelled_runs(tok, ex) == ["table plant bread" + eos]
    if inp.strip():
        prompt = "### Instruction:\nReverse the order of the words.\n\n### Input:\nbread plant table\n\n### Response:\n"
    else:
        prompt = "### Instruction:\nReverse the order of the words.\n\n### Response:\n"
    assert D.alpaca_prompt(row["instruction"], inp) == prompt
    bos = "<|begin_of_text|>" if kind == "llama3" else ""
    assert tok.decode(ex["input_ids"], skip_special_tokens=False) == bos + prompt + "table plant bread" + eos
    # the prompt tokens are exactly the prompt tokenised alone (what inference feeds the model)
    prompt_ids = tok.encode(prompt)  # with the BOS the tokenizer adds
    assert ex["input_ids"][: len(prompt_ids)] == prompt_ids
    assert all(lab == -100 for lab in ex["labels"][: len(prompt_ids)])


def test_alpaca_missing_input_key_and_leading_newline_output():
    tok = make_tokenizer("qwen25")
    ex = tok_ex({"instruction": "Say it.", "output": "\nYes!"}, "alpaca", tok)
    assert labelled_runs(tok, ex) == ["\nYes!<|im_end|>"]


def test_alpaca_completion_only_loss_false():
    tok = make_tokenizer("llama3")
    ex = tok_ex({"instruction": "Spell cat.", "output": "C-A-T"}, "alpaca", tok, completion_only_loss=False)
    assert ex["labels"][0] == -100  # BOS is never a target
    assert ex["labels"][1:] == ex["input_ids"][1:]


def test_prompt_completion():
    tok = make_tokenizer("qwen25")
    ex = tok_ex(
        {"prompt": "Question: what is the capital of france?\nAnswer:", "completion": " Paris."},
        "prompt-completion",
        tok,
    )
    assert labelled_runs(tok, ex) == [" Paris.<|im_end|>"]
    assert tok.decode(ex["input_ids"], skip_special_tokens=False).startswith("Question: what")


def test_text_format_labels_everything_plus_eos():
    tok = make_tokenizer("llama3")
    ex = tok_ex({"body": "The quick brown fox."}, "text", tok, text_field="body")
    assert ex["labels"][0] == -100 and ex["input_ids"][0] == tok.bos_token_id
    assert labelled_runs(tok, ex) == ["The quick brown fox.<|eot_id|>"]


def test_truncation_and_dropping():
    tok = make_tokenizer("qwen25")
    row = {"instruction": "Sort these letters in alphabetical order please.", "output": "a b c d"}
    full = tok_ex(row, "alpaca", tok)
    n = len(full["input_ids"])
    cut = tok_ex(row, "alpaca", tok, max_length=n - 2)
    assert cut["input_ids"] == full["input_ids"][: n - 2] and cut["labels"] == full["labels"][: n - 2]
    assert any(lab != -100 for lab in cut["labels"])

    cfg = DataConfig(path="x", format="alpaca", max_length=n - 2)
    short = {"instruction": "Hi.", "output": "Yo."}
    examples, stats = D.build_dataset([row, short, row], cfg=cfg, tokenizer=tok, where="t.jsonl")
    assert stats["rows"] == 3 and stats["examples"] == 3 and stats["truncated"] == 2
    assert stats["tokens"] == sum(len(e["input_ids"]) for e in examples)
    assert stats["labelled_tokens"] == sum(lab != -100 for e in examples for lab in e["labels"])
    assert stats["max_tokens"] == n

    n_prompt = full["labels"].index(next(lab for lab in full["labels"] if lab != -100))
    cfg = DataConfig(path="x", format="alpaca", max_length=n_prompt)  # answer cut off entirely
    examples, stats = D.build_dataset([row, short], cfg=cfg, tokenizer=tok, where="t.jsonl")
    assert stats["dropped_no_labels"] == 1 and len(examples) == 1
    with pytest.raises(DataError, match="no training examples left") as info:
        D.build_dataset([row], cfg=cfg, tokenizer=tok, where="t.jsonl")
    assert "max_length" in str(info.value)


def test_build_dataset_messages_multi():
    tok = make_tokenizer("llama3")
    rows = [{"messages": conversation(k, bool(k % 2), seed=k)} for k in (1, 2, 3)]
    examples, stats = D.build_dataset(
        rows, cfg=DataConfig(path="x", format="messages"), tokenizer=tok, where="chat.jsonl"
    )
    assert stats["examples"] == 3 and stats["dropped_no_labels"] == 0 and stats["truncated"] == 0
    for row, ex in zip(rows, examples, strict=True):
        assert labelled_runs(tok, ex) == [
            m["content"] + "<|eot_id|>" for m in row["messages"] if m["role"] == "assistant"
        ]


# ----------------------------------------------------------------------------- bad rows


BAD_ROWS = [
    ("alpaca", {"instruction": "x"}, "needs the field 'output'"),
    ("alpaca", {"messages": []}, "needs the field 'instruction'"),
    ("alpaca", {"instruction": "x", "output": 3}, "'output' must be a string"),
    ("prompt-completion", {"prompt": "x"}, "needs the field 'completion'"),
    (
        "prompt-completion",
        {"prompt": [{"role": "user", "content": "x"}], "completion": "y"},
        "must be a string",
    ),
    ("text", {"txt": "x"}, "needs the field 'text'"),
    ("text", {"text": "  "}, "is empty"),
    ("messages", {"text": "x"}, "needs the field 'messages'"),
    ("messages", {"messages": []}, "non-empty list"),
    ("messages", {"messages": "hello"}, "non-empty list"),
    ("messages", {"messages": [{"role": "user"}]}, "has no content"),
    ("messages", {"messages": [{"from": "human", "value": "x"}]}, "ShareGPT"),
    (
        "messages",
        {"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]},
        "unknown role 'bot'",
    ),
    (
        "messages",
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]},
        "content must be a string",
    ),
    ("messages", {"messages": [{"role": "user", "content": ["x"]}]}, "content must be a string"),
    (
        "messages",
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}]},
        "no assistant turn",
    ),
    ("messages", {"messages": [{"role": "assistant", "content": "x"}]}, "starts with an assistant turn"),
]


@pytest.mark.parametrize(("fmt", "row", "message"), BAD_ROWS)
def test_bad_rows_raise_data_error_with_location(fmt, row, message):
    tok = make_tokenizer("llama3")
    with pytest.raises(DataError) as info:
        D.tokenize_example(row, fmt=fmt, tokenizer=tok, max_length=64, where="data/chat.jsonl row 17")
    text = str(info.value)
    assert message in text and "data/chat.jsonl row 17" in text and info.value.fix
    assert "\n  fix: " in text


def test_build_dataset_reports_row_number():
    tok = make_tokenizer("llama3")
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": "b"}, {"instruction": "a"}]
    with pytest.raises(DataError, match=r"data/a\.jsonl row 3"):
        D.build_dataset(rows, cfg=DataConfig(path="x"), tokenizer=tok, where="data/a.jsonl")


def test_wrong_format_hint():
    tok = make_tokenizer("llama3")
    with pytest.raises(DataError) as info:
        tok_ex({"messages": conversation(1, False)}, "alpaca", tok)
    assert "data.format=messages" in info.value.fix


def test_template_exception_becomes_data_error():
    from transformers import PreTrainedTokenizerFast

    base = make_tokenizer("qwen25")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer,
        eos_token="<|im_end|>",
        chat_template="{% for m in messages %}{% if m.role == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{{ m.content }}{% endfor %}",
    )
    with pytest.raises(DataError, match="System role not supported"):
        tok_ex({"messages": conversation(1, True)}, "messages", tok)


def test_no_chat_template_and_no_eos():
    from transformers import PreTrainedTokenizerFast

    base = make_tokenizer("qwen25")
    bare = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer)
    with pytest.raises(DataError, match="no usable chat template"):
        tok_ex({"messages": conversation(1, False)}, "messages", bare)
    with pytest.raises(DataError, match="no eos token"):
        tok_ex({"text": "hello"}, "text", bare)


# ----------------------------------------------------------------------------- loading


ROWS = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(10)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_load_jsonl_json_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "b.json").write_text(json.dumps(ROWS), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "c.parquet")
    for name in ("a.jsonl", "b.json", "c.parquet"):
        assert D.load_rows(str(tmp_path / name)) == ROWS
        assert D.load_rows(str(tmp_path / name), limit=3) == ROWS[:3]
    # blank lines are skipped; JSON Lines in a .json file are accepted
    jsonl.write_text(jsonl.read_text() + "\n\n", encoding="utf-8")
    assert D.load_rows(str(jsonl)) == ROWS
    write_jsonl(tmp_path / "d.json", ROWS)
    assert D.load_rows(str(tmp_path / "d.json")) == ROWS


def test_load_save_to_disk(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert D.load_rows(str(tmp_path / "ds")) == ROWS
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ROWS[2:]),
            "test": datasets.Dataset.from_list(ROWS[:2]),
        }
    ).save_to_disk(str(tmp_path / "dd"))
    assert D.load_rows(str(tmp_path / "dd")) == ROWS[2:]
    assert D.load_rows(str(tmp_path / "dd"), split="test") == ROWS[:2]
    assert D.load_rows(str(tmp_path / "dd"), limit=1) == ROWS[2:3]
    with pytest.raises(DataError, match="no 'validation' split; it has train, test") as info:
        D.load_rows(str(tmp_path / "dd"), split="validation")
    assert "data.split" in info.value.fix


def test_load_directory_of_files(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    write_jsonl(plain / "part0.jsonl", ROWS[:4])
    write_jsonl(plain / "part1.jsonl", ROWS[4:])
    assert D.load_rows(str(plain)) == ROWS
    assert D.load_rows(str(plain), limit=6) == ROWS[:6]
    with pytest.raises(DataError, match="no file named after split 'test'"):
        D.load_rows(str(plain), split="test")

    split = tmp_path / "split"
    (split / "data").mkdir(parents=True)
    write_jsonl(split / "data" / "train-00000-of-00001.jsonl", ROWS[3:])
    write_jsonl(split / "data" / "test.jsonl", ROWS[:3])
    assert D.load_rows(str(split)) == ROWS[3:]
    assert D.load_rows(str(split), split="test") == ROWS[:3]
    with pytest.raises(DataError, match="has no 'dev' split; it has test, train"):
        D.load_rows(str(split), split="dev")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no data files"):
        D.load_rows(str(empty))


def test_malformed_jsonl_reports_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "ok"}\n{"text": "broken"\n{"text": "ok"}\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        D.load_rows(str(path))
    assert f"{path}:4: malformed JSON line" in str(info.value) and "line 4" in info.value.fix
    path.write_text('{"text": "ok"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected a JSON object"):
        D.load_rows(str(path))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.json", '{"data": [1, 2]}', "not a list of examples"),
        ("bad.json", '[{"a": 1},', "malformed JSON"),
        ("bad.parquet", "not parquet", "not a readable Parquet file"),
        ("bad.csv", "a,b\n1,2\n", "unsupported file type '.csv'"),
        ("empty.jsonl", "\n\n", "holds no rows"),
        ("empty.json", "[]", "holds no rows"),
        ("latin1.jsonl", b'{"text": "caf\xe9"}\n', "not UTF-8"),
    ],
)
def test_bad_files(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as info:
        D.load_rows(str(path), what="data.eval_path")
    assert info.value.fix


def test_missing_file(tmp_path):
    with pytest.raises(DataError) as info:
        D.load_rows(str(tmp_path / "nope.jsonl"))
    assert "nope.jsonl" in str(info.value) and "does not exist" in str(info.value)
    assert "data.path" in info.value.fix
    with pytest.raises(DataError, match="does not exist"):
        D.load_rows("data/missing.jsonl", what="data.eval_path")


def test_unknown_hub_dataset_offline(monkeypatch):
    import datasets

    def offline(name, split=None, **kw):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as info:
        D.load_rows("someone/no-such-dataset")
    assert "could not be found locally or on the Hub" in str(info.value)
    assert "OfflineModeIsEnabled" in str(info.value) and "data.path" in info.value.fix


def test_split_eval():
    rows = list(range(10))
    assert D.split_eval(rows, 0.0) == (rows, [])
    train, evals = D.split_eval(rows, 0.25)
    assert evals == [0, 1] and train == rows[2:]
    with pytest.raises(DataError, match="holds out no rows"):
        D.split_eval(rows, 0.05)
    with pytest.raises(DataError, match="holds out no rows") as info:
        D.split_eval([1], 0.99)
    assert "at least 2" in info.value.fix
    assert D.split_eval(rows, 0.99) == (rows[9:], rows[:9])


def test_demo_data_files_tokenise():
    """The demo data shipped in recipes/data (when present) loads and tokenises cleanly."""
    root = Path(__file__).resolve().parents[1] / "recipes" / "data"
    for name, fmt in (("alpaca_demo.jsonl", "alpaca"), ("chat_demo.jsonl", "messages")):
        if not (root / name).is_file():
            continue
        rows = D.load_rows(str(root / name), limit=40)
        for kind in ("llama3", "qwen25"):
            tok = make_tokenizer(kind)
            examples, stats = D.build_dataset(
                rows, cfg=DataConfig(path=name, format=fmt), tokenizer=tok, where=name
            )
            assert stats["examples"] == len(rows)


def test_build_dataset_without_rows():
    with pytest.raises(DataError, match="there are no rows"):
        D.build_dataset([], cfg=DataConfig(path="x"), tokenizer=make_tokenizer("llama3"), where="x.jsonl")


def test_transformers_5_apply_chat_template_returns_a_batch_encoding():
    # transformers 5.x: tokenize=True defaults to return_dict=True (a BatchEncoding, not ids);
    # data.py only renders strings (tokenize=False) and tokenises them itself.
    tok = make_tokenizer("qwen25")
    msgs = conversation(1, False)
    out = tok.apply_chat_template(msgs, tokenize=True)
    assert not isinstance(out, list) and "input_ids" in out
    ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
    assert isinstance(ids, list) and ids == list(out["input_ids"])
    assert isinstance(tok.apply_chat_template(msgs, tokenize=False), str)


def test_messages_from_system_user_assistant_columns() -> None:
    """Seed 003's dataset has system/user/assistant columns instead of a messages list."""
    from transformers import AutoTokenizer

    from tunefleet.distributed.demo_model import ensure_tiny_llama

    tok = AutoTokenizer.from_pretrained(ensure_tiny_llama())
    row = {"system": "Be brief.", "user": "Capital of France?", "assistant": "Paris."}
    ex = D.tokenize_example(row, fmt="messages", tokenizer=tok, max_length=256)
    labelled = [t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != -100]
    assert tok.decode(labelled) == "Paris.<|eot_id|>"
    assert "Be brief." in tok.decode(ex["input_ids"])


# ----------------------------------------------------------------------------- messages that say what is wrong


def test_null_field_says_null_not_missing() -> None:
    """`"output": null` is not a missing field, and the format is already right: say so."""
    tok = make_tokenizer("llama3")
    with pytest.raises(DataError) as info:
        tok_ex({"instruction": "Say hi.", "input": "", "output": None}, "alpaca", tok)
    assert "'output' is null in this row" in info.value.problem and "t.jsonl row 1" in info.value.problem
    assert "data.format" not in info.value.fix and "'output'" in info.value.fix
    with pytest.raises(DataError, match="'messages' is null in this row") as info:
        tok_ex({"messages": None}, "messages", tok)
    assert "data.format" not in info.value.fix


def test_sharegpt_rows_name_messages_field_and_the_shape() -> None:
    """ShareGPT rows with data.format=messages already set: not "set data.format=messages"."""
    tok = make_tokenizer("llama3")
    row = {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}
    with pytest.raises(DataError) as info:
        tok_ex(row, "messages", tok)
    assert "'conversations' field holds ShareGPT turns (from/value)" in info.value.problem
    assert "data.messages_field=conversations" in info.value.fix and "role/content" in info.value.fix
    assert "data.format" not in info.value.fix
    with pytest.raises(DataError, match="ShareGPT keys from/value") as info:
        tok_ex(row, "messages", tok, messages_field="conversations")
    assert "role/content" in info.value.fix
    # role/content turns under another name: the field to set
    with pytest.raises(DataError) as info:
        tok_ex({"chat": conversation(1, False)}, "messages", tok)
    assert info.value.fix == "set data.messages_field=chat"


@pytest.mark.parametrize("name", ["bom.jsonl", "bom.json"])
def test_utf8_byte_order_mark_is_accepted(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    body = "".join(json.dumps(r) + "\n" for r in ROWS) if name.endswith("l") else json.dumps(ROWS)
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert D.load_rows(str(path)) == ROWS


def test_bom_counted_by_the_planner(tmp_path: Path) -> None:
    from tunefleet.launch.plan_inputs import count_dataset_rows

    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS).encode())
    assert count_dataset_rows(DataConfig(path=str(path))) == (len(ROWS), None)


def test_missing_relative_path_names_both_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative data.path is looked for next to the recipe, then in the working directory: a
    missing one names both, in that order."""
    import yaml

    from tunefleet.launch.core import recipe as R

    recipe_dir, work = tmp_path / "recipes", tmp_path / "work"
    recipe_dir.mkdir()
    work.mkdir()
    (recipe_dir / "r.yaml").write_text(
        yaml.safe_dump(
            {"output_dir": "o", "model": {"name_or_path": "m"}, "data": {"path": "data/gone.jsonl"}}
        )
    )
    monkeypatch.chdir(work)
    recipe = R.load(recipe_dir / "r.yaml")
    with pytest.raises(DataError) as info:
        D.load_rows(recipe.data.path)
    text = info.value.problem
    near, cwd = str(recipe_dir.resolve() / "data/gone.jsonl"), str(work / "data/gone.jsonl")
    assert f"{near} (next to the recipe)" in text and f"{cwd} (the working directory)" in text
    assert text.index(near) < text.index(cwd)


def test_no_sequence_length_warning_while_tokenising() -> None:
    """transformers' "Token indices sequence length is longer than ..." is noise here: tunefleet
    truncates to data.max_length itself."""
    import logging

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from tunefleet.distributed.demo_model import ensure_tiny_llama

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler, logger = Keep(), hf_logging.get_logger("transformers")
    logger.addHandler(handler)
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    try:
        row = {"instruction": "Repeat.", "output": " ".join(WORDS * 20)}
        tok = AutoTokenizer.from_pretrained(ensure_tiny_llama())  # model_max_length 1024
        tok.encode(row["output"])  # the warning is live here (a test that can fail)
        assert any("Token indices sequence length" in m for m in seen)
        cfg = DataConfig(path="x", format="alpaca", max_length=2000)
        for build in (D.build_dataset, _batched_dataset):
            seen.clear()
            tok = AutoTokenizer.from_pretrained(ensure_tiny_llama())  # warns once per tokenizer object
            examples, stats = build([row], cfg=cfg, tokenizer=tok, where="long.jsonl")
            assert stats["max_tokens"] > 1024 and stats["truncated"] == 0
            assert not any("Token indices sequence length" in m for m in seen)
    finally:
        logger.removeHandler(handler)
        hf_logging.set_verbosity(before)


def _batched_dataset(rows, *, cfg, tokenizer, where):
    from tunefleet.distributed.data.batched import Batcher
    from tunefleet.distributed.data.counts import Tally

    tally = Tally()
    return Batcher(tokenizer, cfg).rows(rows, 1, where, tally), tally.to_dict()
