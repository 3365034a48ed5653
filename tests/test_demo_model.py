"""The offline demo model (`tunefleet:tiny-llama`) and the bundled demo data."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunefleet.distributed import demo_model
from tunefleet.distributed.demo_model import (
    BOS_TOKEN,
    CHAT_TEMPLATE,
    END_HEADER_TOKEN,
    EOS_TOKEN,
    MARKER_FILE,
    START_HEADER_TOKEN,
    TINY_LLAMA_ID,
    demo_data_path,
    ensure_tiny_llama,
    resolve_name_or_path,
)

REPO = Path(__file__).resolve().parent.parent
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "  What is 2 plus 3?\n"},
    {"role": "assistant", "content": "2 + 3 = 5"},
]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return ensure_tiny_llama(tmp_path_factory.mktemp("cache-a"))


@pytest.fixture(scope="module")
def tokenizer(built):
    return AutoTokenizer.from_pretrained(built)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


# --- the model directory ------------------------------------------------------------------


def test_layout_and_size(built):
    assert built.name == f"tiny-llama-{demo_model.build_hash()}"
    names = {p.name for p in built.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        MARKER_FILE,
    } <= names
    assert not any(n.endswith(".bin") for n in names)
    total = sum(p.stat().st_size for p in built.iterdir())
    assert 500_000 < total < 5_000_000
    assert not [p for p in built.parent.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_loadable(built, tokenizer):
    model, info = AutoModelForCausalLM.from_pretrained(built, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    cfg = model.config
    assert (
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.intermediate_size,
        cfg.max_position_embeddings,
    ) == (128, 2, 4, 2, 352, 1024)
    assert cfg.tie_word_embeddings is False
    # the BPE trainer stops below the 2000 target when the corpus runs out of merges
    assert cfg.vocab_size == len(tokenizer) and 1500 <= len(tokenizer) <= demo_model.VOCAB_SIZE
    assert cfg.bos_token_id == tokenizer.bos_token_id
    assert cfg.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    marker = json.loads((built / MARKER_FILE).read_text())
    assert marker["id"] == TINY_LLAMA_ID and marker["build_hash"] == demo_model.build_hash()


def test_forward_loss_near_ln_vocab(built, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(built)
    row = json.loads(demo_data_path("alpaca_demo.jsonl").read_text().splitlines()[0])
    ids = tokenizer(f"{row['instruction']}\n{row['input']}\n{row['output']}", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert math.isfinite(loss)
    assert abs(loss - math.log(len(tokenizer))) < 1.0


def test_deterministic(built, tmp_path):
    other = ensure_tiny_llama(tmp_path)
    assert other != built and other.name == built.name
    assert (other / "tokenizer.json").read_bytes() == (built / "tokenizer.json").read_bytes()
    a, b = load_file(built / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _files(other) == _files(built)  # every file, byte for byte


def test_build_leaves_caller_rng_alone(tmp_path):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    ensure_tiny_llama(tmp_path)
    assert torch.equal(torch.rand(3), expected)


# --- the cache ----------------------------------------------------------------------------


def test_cache_reused(built, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in built.iterdir()}
    dir_mtime = built.stat().st_mtime_ns

    def no_build(out):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(demo_model, "_build", no_build)
    assert ensure_tiny_llama(built.parent) == built
    assert ensure_tiny_llama(str(built.parent)) == built
    assert {p.name: p.stat().st_mtime_ns for p in built.iterdir()} == before
    assert built.stat().st_mtime_ns == dir_mtime


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNEFLEET_CACHE", str(tmp_path / "c"))
    assert demo_model.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("TUNEFLEET_CACHE")
    assert demo_model.default_cache_dir() == Path.home() / ".cache" / "tunefleet"


def test_resolve_name_or_path(built, monkeypatch):
    monkeypatch.setenv("TUNEFLEET_CACHE", str(built.parent))
    assert resolve_name_or_path(TINY_LLAMA_ID) == str(built)
    assert resolve_name_or_path("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"


def _copying_build(src: Path):
    def fake_build(out: Path) -> None:
        for p in src.iterdir():
            shutil.copy2(p, out / p.name)

    return fake_build


def test_lost_race_uses_winner(built, tmp_path, monkeypatch):
    target = tmp_path / built.name

    def build_while_another_process_wins(out: Path) -> None:
        _copying_build(built)(out)
        shutil.copytree(built, target)  # the other process renames its build into place first
        (target / "winner").write_text("")

    monkeypatch.setattr(demo_model, "_build", build_while_another_process_wins)
    assert ensure_tiny_llama(tmp_path) == target
    assert (target / "winner").exists()
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # our temp dir is gone


def test_unfinished_dir_replaced(built, tmp_path, monkeypatch):
    target = tmp_path / built.name
    target.mkdir()
    (target / "config.json").write_text("{}")  # no marker: not a finished build
    monkeypatch.setattr(demo_model, "_build", _copying_build(built))
    assert ensure_tiny_llama(tmp_path) == target
    assert _files(target) == _files(built)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def broken(out: Path) -> None:
        (out / "half").write_text("")
        raise RuntimeError("boom")

    monkeypatch.setattr(demo_model, "_build", broken)
    with pytest.raises(RuntimeError, match="boom"):
        ensure_tiny_llama(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_fresh_process_build_is_quiet_and_identical(built, tmp_path):
    code = "from tunefleet.distributed.demo_model import ensure_tiny_llama; ensure_tiny_llama()"
    env = {**os.environ, "TUNEFLEET_CACHE": str(tmp_path)}
    for quietening in (
        "TOKENIZERS_PARALLELISM",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS",
        "TRANSFORMERS_VERBOSITY",
    ):
        env.pop(quietening, None)  # conftest sets some: the build must be quiet without them
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    assert _files(tmp_path / built.name) == _files(built)  # same bytes from another process


# --- the tokenizer ------------------------------------------------------------------------


def test_special_tokens(tokenizer):
    ids = {}
    for tok in (BOS_TOKEN, EOS_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN):
        enc = tokenizer(tok, add_special_tokens=False).input_ids
        assert len(enc) == 1, tok
        assert enc[0] == tokenizer.convert_tokens_to_ids(tok)
        ids[tok] = enc[0]
    assert len(set(ids.values())) == 4
    assert tokenizer.bos_token == BOS_TOKEN and tokenizer.eos_token == EOS_TOKEN
    assert tokenizer.pad_token is None and tokenizer.pad_token_id is None
    assert tokenizer.padding_side == "right"
    assert tokenizer.model_max_length == 1024
    # specials inside text stay single tokens
    enc = tokenizer(f"hi{EOS_TOKEN}{START_HEADER_TOKEN}user", add_special_tokens=False).input_ids
    assert ids[EOS_TOKEN] in enc and ids[START_HEADER_TOKEN] in enc


def test_bos_added_to_plain_text_not_eos(tokenizer):
    ids = tokenizer("Reverse the words.").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.eos_token_id not in ids
    assert tokenizer("Reverse the words.", add_special_tokens=False).input_ids == ids[1:]


def test_byte_level_round_trip(tokenizer):
    text = "Héllo, wörld! 12345 + 678 = 13023\n\n\tTabs, ünïcödé ✓ and emoji 🙂."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token is None


def test_chat_template_renders_as_specified(tokenizer):
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert re.search(r"\{%-?\s*(end)?generation\b", tokenizer.chat_template) is None  # no assistant masks
    expected = (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 plus 3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n2 + 3 = 5<|eot_id|>"
    )
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False) == expected
    prompt = tokenizer.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == expected.rsplit("2 + 3 = 5<|eot_id|>", 1)[0]
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_chat_template_tokenized_has_one_bos(tokenizer):
    out = tokenizer.apply_chat_template(MESSAGES, tokenize=True)  # transformers 5: a BatchEncoding
    ids = out["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids[-1] == tokenizer.eos_token_id
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert ids == tokenizer(rendered, add_special_tokens=False).input_ids
    assert tokenizer(rendered).input_ids[:2] == [tokenizer.bos_token_id] * 2  # the documented trap


def test_pad_as_eos_like_the_trainer(tokenizer):
    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tok.pad_token = tok.eos_token
    batch = tok(["a b c d", "a"], padding=True)
    assert batch.input_ids[1][-1] == tok.eos_token_id and batch.attention_mask[1][-1] == 0
    assert batch.input_ids[1][0] == tok.bos_token_id  # right padding, bos still first


# --- the bundled data ---------------------------------------------------------------------


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in demo_data_path(name).read_text(encoding="utf-8").splitlines()]


def test_alpaca_demo():
    """Facts the demo learns in about a minute: few rows, short fixed-format answers, the README's
    prompts first (samples.jsonl shows the first rows)."""
    rows = _jsonl("alpaca_demo.jsonl")
    assert 100 <= len(rows) <= 200
    assert all(set(r) == {"instruction", "input", "output"} for r in rows)
    assert all(isinstance(v, str) for r in rows for v in r.values())
    assert all(r["instruction"] and r["output"] for r in rows)
    with_input = sum(1 for r in rows if r["input"])
    assert 0.25 < with_input / len(rows) < 0.5
    assert max(len(r["output"].split()) for r in rows) <= 8
    assert len({(r["instruction"], r["input"]) for r in rows}) == len(rows)
    assert rows[0] == {"instruction": "Spell the word cat.", "input": "", "output": "C-A-T"}
    assert rows[1]["output"] == "The capital of France is Paris."


def test_chat_demo():
    rows = _jsonl("chat_demo.jsonl")
    assert 150 <= len(rows) <= 250
    with_system = 0
    for r in rows:
        assert set(r) == {"messages"}
        msgs = r["messages"]
        if msgs[0]["role"] == "system":
            with_system += 1
            msgs = msgs[1:]
        assert 2 <= len(msgs) <= 6 and len(msgs) % 2 == 0
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
        assert all(set(m) == {"role", "content"} and m["content"] == m["content"].strip() for m in msgs)
    assert 0.4 < with_system / len(rows) < 0.6


def test_data_small_and_reproducible(tmp_path):
    data = demo_data_path("corpus.txt").parent
    files = ["alpaca_demo.jsonl", "chat_demo.jsonl", "corpus.txt"]
    assert sum((data / f).stat().st_size for f in files) < 500_000
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "tools" / "make_demo_data.py")
    if spec is None or not (REPO / "tools" / "make_demo_data.py").exists():
        pytest.skip("tools/make_demo_data.py not in this checkout")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    rendered = gen.render()
    for f in files:
        assert rendered[f].encode("utf-8") == (data / f).read_bytes(), (
            f"{f} is stale: run tools/make_demo_data.py"
        )
