"""After training: finding a run's adapter, `tunefleet merge` and `tunefleet generate`.

Real runs of the demo model on CPU (a few steps each), merged and generated from for real: the
merged model's logits must equal base+adapter's, prompts must be rendered exactly as training
rendered them, and generation must stop at the end-of-turn token the model learnt to write.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fake_checkpoints import write_checkpoint
from tests.test_data import make_tokenizer
from tests.test_train import DATA, quick
from tunefleet.distributed import data as data_mod
from tunefleet.distributed import generate as gen
from tunefleet.distributed import sft
from tunefleet.distributed.artifacts import find_adapter
from tunefleet.distributed.merge import MERGE_INFO, merge
from tunefleet.launch.core import checkpoints as ckpt
from tunefleet.launch.core import recipe as R
from tunefleet.launch.core.args import StartOptions
from tunefleet.launch.core.errors import TunefleetError
from tunefleet.launch.core.recipe import DataConfig

ANSWER = "Yes, it is."
PROBES = ["### Instruction:\nSpell the word cat.\n\n### Response:\n", "Name the capital city of France."]


def _train(out: Path, *extra: str) -> Path:
    assert sft.run(quick(out, *extra)) == 0
    return out


def _answer_data(tmp: Path, fmt: str) -> Path:
    """Every example has the same short answer: a few steps teach the model to say it and stop."""
    question = "Is {} a number? Answer briefly."
    if fmt == "alpaca":
        rows = [{"instruction": question.format(i), "input": "", "output": ANSWER} for i in range(64)]
    else:
        rows = [
            {
                "messages": [
                    {"role": "user", "content": question.format(i)},
                    {"role": "assistant", "content": ANSWER},
                ]
            }
            for i in range(64)
        ]
    path = tmp / f"{fmt}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def answer_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One run per prompt format, trained to answer ANSWER (15 steps, high lr)."""
    tmp = tmp_path_factory.mktemp("answer")
    runs = {}
    for fmt in ("alpaca", "messages"):
        runs[fmt] = _train(
            tmp / fmt,
            f"data.path={_answer_data(tmp, fmt)}",
            f"data.format={fmt}",
            "train.max_steps=15",
            "train.lr=1e-2",
            # a small adapter for this high lr (the demo's r=64 is tuned for 3e-3 and overshoots here)
            "peft.r=16",
            "peft.alpha=32",
            "train.warmup_ratio=0",
            "train.logging_steps=5",
            "data.max_length=64",
        )
    return runs


def _logits(model, tokenizer, texts: list[str]):
    import torch

    with torch.no_grad():
        return [model(**tokenizer(t, return_tensors="pt")).logits.float() for t in texts]


def _base_plus_adapter(adapter_dir: Path, dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunefleet.distributed.demo_model import ensure_tiny_llama

    base = AutoModelForCausalLM.from_pretrained(ensure_tiny_llama(), dtype=dtype)
    plain = AutoModelForCausalLM.from_pretrained(ensure_tiny_llama(), dtype=dtype)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval(), plain.eval()


def _assert_merge_equal(merged_dir: Path, adapter_dir: Path, dtype, **tol) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert merged.dtype == dtype
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    reference, plain = _base_plus_adapter(adapter_dir, dtype)
    for got, want, base in zip(
        _logits(merged, tokenizer, PROBES),
        _logits(reference, tokenizer, PROBES),
        _logits(plain, tokenizer, PROBES),
        strict=True,
    ):
        torch.testing.assert_close(got, want, **tol)
        assert (want - base).abs().max() > 10 * tol.get("atol", 1e-5), "the adapter changed nothing"


# ----------------------------------------------------------------------------- finding the adapter


def _fake_run(tmp: Path) -> Path:
    run = tmp / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("# resolved recipe\n" + R.dump(quick(run)))
    return run


ADAPTER_FILES = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"x" * 64}


def _fake_adapter(path: Path, *, manifest: bool = False, complete: bool = False) -> Path:
    """An adapter directory; with `manifest`, a tunefleet checkpoint written by the format's own
    code (`checkpoints.finalize`), its COMPLETE marker removed unless `complete`."""
    if manifest:
        write_checkpoint(path.parent, ckpt.step_of(path), ADAPTER_FILES)
        if not complete:
            (path / ckpt.COMPLETE).unlink()
        return path
    path.mkdir(parents=True)
    for name, data in ADAPTER_FILES.items():
        (path / name).write_bytes(data)
    return path


def test_find_adapter_prefers_final_then_newest_complete_checkpoint(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    _fake_adapter(run / "checkpoint-2")  # a checkpoint-N without manifest: not tunefleet's, not usable
    _fake_adapter(run / "checkpoint-4", manifest=True, complete=True)  # atomic, complete
    _fake_adapter(run / "checkpoint-6", manifest=True, complete=False)  # atomic, unfinished
    found = find_adapter(run)
    assert found.adapter_dir.name == "checkpoint-4"
    assert found.note is not None and "checkpoint-6 is damaged (it is incomplete" in found.note
    _fake_adapter(run / "final")
    found = find_adapter(run)
    assert found.adapter_dir == run / "final" and found.run_dir == run and found.recipe == quick(run)
    # resume would refuse a checkpoint-N without manifest and marker: so do generate and merge
    with pytest.raises(TunefleetError, match="checkpoint-2' cannot be used: it is incomplete"):
        find_adapter(run / "checkpoint-2")
    _fake_adapter(run / "my-adapter")  # any other adapter directory inside the run: used as it is
    assert find_adapter(run / "my-adapter").adapter_dir == run / "my-adapter"
    assert find_adapter(run / "final").run_dir == run
    with pytest.raises(TunefleetError, match="incomplete"):
        find_adapter(run / "checkpoint-6")


def test_generate_and_merge_refuse_what_resume_refuses(tmp_path: Path) -> None:
    """The newest checkpoint's adapter corrupted at the same size (its last 64 bytes zeroed), no
    final/: resume passes it over for the one before, saying so, and so does `find_adapter` (what
    generate and merge use); named explicitly, it is refused with the reason."""
    from tunefleet.launch.core.rundir import decide_start

    run = _fake_run(tmp_path)
    _fake_adapter(run / "checkpoint-4", manifest=True, complete=True)
    newest = _fake_adapter(run / "checkpoint-6", manifest=True, complete=True)
    weights = newest / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64] + bytes(64))
    assert ckpt.is_complete(newest)  # sizes match: only the checksum tells
    start = decide_start(run, StartOptions())
    found = find_adapter(run)
    assert start.checkpoint == str(run / "checkpoint-4") and found.adapter_dir == run / "checkpoint-4"
    assert start.note == found.note
    assert "checkpoint-6 is damaged (adapter_model.safetensors differs from the checksum" in str(found.note)
    with pytest.raises(TunefleetError, match="adapter_model.safetensors differs from the checksum"):
        find_adapter(newest)


def test_find_adapter_errors(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    with pytest.raises(TunefleetError, match="no final/ adapter and no complete checkpoint"):
        find_adapter(run)
    write_checkpoint(run, 8, {"pytorch_model_fsdp_0/__0_0.distcp": b"x"})  # shards only
    with pytest.raises(TunefleetError, match="sharded FSDP checkpoint"):
        find_adapter(run)
    with pytest.raises(TunefleetError, match="sharded FSDP checkpoint"):
        find_adapter(run / "checkpoint-8")
    # an FSDP checkpoint with the adapter gathered next to its shards (what tunefleet writes): used
    gathered = write_checkpoint(run, 10, {**ADAPTER_FILES, "pytorch_model_fsdp_0/__0_0.distcp": b"x"})
    assert find_adapter(run).adapter_dir == gathered and find_adapter(gathered).adapter_dir == gathered
    shutil.rmtree(gathered)
    orphan = _fake_adapter(tmp_path / "elsewhere" / "final")
    with pytest.raises(TunefleetError, match="no recipe.yaml next to"):
        find_adapter(orphan)
    with pytest.raises(TunefleetError, match="is not a directory"):
        find_adapter(tmp_path / "missing")


# ----------------------------------------------------------------------------- prompts and stopping


def test_prompts_render_as_in_training(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    alpaca = DataConfig(path="x", format="alpaca")
    p = gen.render_prompt("Spell cat.", data=alpaca, tokenizer=tok)
    assert p.text == data_mod.alpaca_prompt("Spell cat.") and p.reference is None
    assert p.ids == [tok.bos_token_id] + tok.encode(p.text, add_special_tokens=False)
    # the prompt tokens of a training example are exactly the rendered prompt's ids
    row = {"instruction": "Spell cat.", "input": "c a t", "output": "C-A-T"}
    example = data_mod.tokenize_example(row, fmt="alpaca", tokenizer=tok, max_length=256)
    p = gen.render_prompt(row, data=alpaca, tokenizer=tok)
    n_prompt = sum(1 for label in example["labels"] if label == data_mod.IGNORE_INDEX)
    assert example["input_ids"][:n_prompt] == p.ids and p.reference == "C-A-T"

    chat = DataConfig(path="x", format="messages")
    p = gen.render_prompt("Hi there", data=chat, tokenizer=tok)
    assert p.text == tok.apply_chat_template(
        [{"role": "user", "content": "Hi there"}], tokenize=False, add_generation_prompt=True
    )
    assert p.text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert p.ids == tok.encode(p.text, add_special_tokens=False) and p.ids.count(tok.bos_token_id) == 1
    conversation = json.loads((DATA / "chat_demo.jsonl").read_text().splitlines()[0])
    p = gen.render_prompt(conversation, data=chat, tokenizer=tok)
    msgs = conversation["messages"]
    assert p.reference == msgs[-1]["content"] and p.shown == msgs[-2]["content"]
    example = data_mod.tokenize_example(conversation, fmt="messages", tokenizer=tok, max_length=1024)
    assert example["input_ids"][: len(p.ids)] == p.ids  # the generation prompt is what training saw
    seed003 = {"system": "Be brief.", "user": "Hello?", "assistant": "Hi."}
    p = gen.render_prompt(seed003, data=chat, tokenizer=tok)
    assert p.reference == "Hi." and "Be brief." in p.text


@pytest.mark.parametrize(
    ("kind", "eot"),
    [
        ("llama3", "<|eot_id|>"),
        ("qwen25", "<|im_end|>"),
        ("qwen3", "<|im_end|>"),
        ("phi3", "<|end|>"),
        ("gptoss", "<|return|>"),
    ],
)
def test_end_of_turn_token_of_chat_templates(kind: str, eot: str) -> None:
    tok = make_tokenizer(kind)
    eot_id = tok.convert_tokens_to_ids(eot)
    assert gen.end_of_turn_id(tok) == eot_id
    stops = gen.stop_token_ids(tok, "messages")
    assert eot_id in stops and tok.eos_token_id in stops
    if kind == "phi3":  # end of turn (<|end|>) differs from eos (<|endoftext|>): alpaca stops at eos only
        assert gen.stop_token_ids(tok, "alpaca") == [tok.eos_token_id]


# ----------------------------------------------------------------------------- merge


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merged_logits_equal_base_plus_adapter(tmp_path: Path, method: str) -> None:
    import torch

    run = _train(tmp_path / "run", f"peft.method={method}", "peft.modules_to_save=[lm_head]")
    result = merge(run, tmp_path / "merged", max_shard_size="300KB")
    assert result.adapter_dir == run / "final" and result.dtype == "float32" and not result.notes
    assert result.max_logit_diff is not None and result.max_logit_diff < 1e-4
    shards = sorted((tmp_path / "merged").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "merged" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "merged" / MERGE_INFO).read_text())["peft_method"] == method
    assert not list(tmp_path.glob(".merged*")), "temporary directory left behind"
    _assert_merge_equal(tmp_path / "merged", run / "final", torch.float32, atol=1e-5, rtol=1e-5)
    with pytest.raises(TunefleetError, match="already exists"):
        merge(run, tmp_path / "merged")


@pytest.mark.slow
def test_merge_from_checkpoints(tmp_path: Path) -> None:
    import torch

    run = _train(tmp_path / "run", "train.save_steps=2")
    assert (run / "checkpoint-2" / "COMPLETE").exists()  # tunefleet's atomic checkpoint format
    merge(run / "checkpoint-2", tmp_path / "from-ckpt2")
    _assert_merge_equal(tmp_path / "from-ckpt2", run / "checkpoint-2", torch.float32, atol=1e-5, rtol=1e-5)
    shutil.rmtree(run / "final")  # an unfinished run: its newest complete checkpoint
    assert merge(run, tmp_path / "from-run").adapter_dir == run / "checkpoint-4"


@pytest.mark.slow
def test_qlora_merges_into_dequantized_base(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")
    import torch

    run = _train(
        tmp_path / "run", "model.quantization=nf4", "model.dtype=bfloat16", "model.compute_dtype=bfloat16"
    )
    cmd = [sys.executable, "-m", "tunefleet.launch.cli", "merge", str(run), "--out", str(tmp_path / "merged")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "note: QLoRA run (nf4)" in proc.stdout and "unquantized base weights at bfloat16" in proc.stdout
    info = json.loads((tmp_path / "merged" / MERGE_INFO).read_text())
    assert info["dtype"] == "bfloat16" and info["training_quantization"] == "nf4"
    # equal to the unquantized bf16 base + adapter, within bf16 rounding of the merged weights
    _assert_merge_equal(tmp_path / "merged", run / "final", torch.bfloat16, atol=0.05, rtol=0.02)
    # generation from the QLoRA run works on CPU (the base is loaded unquantized there, and says so)
    cmd = [
        sys.executable,
        "-m",
        "tunefleet.launch.cli",
        "generate",
        str(run),
        "--prompt",
        "Spell cat.",
        "--max-new-tokens",
        "8",
        "--jsonl",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loads the nf4 base unquantized" in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["prompt"] == "Spell cat."


# ----------------------------------------------------------------------------- generate


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["alpaca", "messages"])
def test_generate_answers_and_stops_at_end_of_turn(answer_runs: dict[str, Path], fmt: str) -> None:
    prompts = ["Is 7 a number? Answer briefly.", "Is 1234 a number? Answer briefly.", "Hello"]
    adapter, results = gen.generate_for_run(answer_runs[fmt], prompts, compare_base=True, max_new_tokens=24)
    assert adapter.label == "final" and adapter.recipe.data.format == fmt
    for row in results:
        assert row["answer"] == ANSWER and row["stopped"], row  # stopped at <|eot_id|>, not at 24 tokens
        assert row["base_answer"] != ANSWER
    # the base answers are the plain base model's (adapter switched off), batched = one at a time
    from transformers import AutoModelForCausalLM

    from tunefleet.distributed.model import resolve_model_path

    model, tok = gen.load_run_model(adapter)
    rendered = [gen.render_prompt(p, data=adapter.recipe.data, tokenizer=tok) for p in prompts]
    stops = gen.stop_token_ids(tok, fmt, model.generation_config)
    plain = AutoModelForCausalLM.from_pretrained(resolve_model_path(adapter.recipe.model))
    one_by_one = [gen.generate(plain, tok, [p], stop_ids=stops, max_new_tokens=24)[0].text for p in rendered]
    assert [r["base_answer"] for r in results] == one_by_one
    # a stop token other than eos ends the answer there
    comma = tok.convert_tokens_to_ids(",")
    answers = gen.generate(model, tok, rendered, stop_ids=[*stops, comma], max_new_tokens=24)
    assert all(a.text == "Yes," and a.stopped for a in answers), answers


@pytest.mark.slow
def test_generate_cli_prompts_file_compare_base(answer_runs: dict[str, Path], tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Is 5 a number? Answer briefly."},
                    {"role": "assistant", "content": "Yes."},
                ]
            }
        )
        + "\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "tunefleet.launch.cli",
        "generate",
        str(answer_runs["messages"]),
        "--prompts-file",
        str(prompts),
        "--prompt",
        "Is 9 a number? Answer briefly.",
        "--compare-base",
        "--max-new-tokens",
        "16",
        "--jsonl",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["prompt"] for r in rows] == ["Is 9 a number? Answer briefly.", "Is 5 a number? Answer briefly."]
    assert all(r["answer"] == ANSWER and "base_answer" in r for r in rows)
    assert rows[1]["reference"] == "Yes."
    proc = subprocess.run(cmd[:5] + ["--max-new-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no prompts given" in proc.stderr
