"""Real training runs on CPU with the demo model: formats, PEFT methods, outputs, output_dir rules."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from tunefleet.distributed import sft
from tunefleet.distributed.demo_model import ensure_tiny_llama
from tunefleet.launch import compat
from tunefleet.launch.core import recipe as R
from tunefleet.launch.core.errors import TunefleetError
from tunefleet.launch.core.hardware import Hardware

DEMO = Path(str(resources.files("tunefleet.recipes"))) / "demo.yaml"
DATA = DEMO.parent / "data"

pytestmark = pytest.mark.slow


QUICK = [
    "train.max_steps=4",
    "train.logging_steps=1",
    "train.save_steps=0",
    "batch.micro_batch_size=4",
    "batch.global_batch_size=8",
    "data.max_length=128",
]
"""The demo recipe's overrides for a run of a few steps."""


def quick(out: Path, *extra: str) -> R.Recipe:
    """The demo recipe, shortened to a few steps."""
    return R.load(DEMO, [f"output_dir={out}", *QUICK, *extra])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_demo_learns_its_facts(tmp_path: Path) -> None:
    """The shipped demo, as `make demo` runs it: the loss ends clearly low, and the fine-tuned model
    answers the demo prompts as the references do where the base model does not (samples.jsonl, and
    `tunefleet generate --compare-base` on every training prompt)."""
    from tunefleet.distributed import generate as gen

    out = tmp_path / "demo"
    recipe = R.load(DEMO, [f"output_dir={out}"])
    assert sft.run(recipe) == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(10, 241, 10))  # 30 epochs of 8 steps
    for r in rows:
        assert {"step", "loss", "lr", "samples_seen", "tokens_seen", "epoch"} <= r.keys()
        assert r["samples_seen"] == r["step"] * recipe.batch.global_batch_size
    print(f"\ndemo loss: {rows[0]['loss']:.3f} at step 10 -> {rows[-1]['loss']:.3f} at step 240")
    assert rows[0]["loss"] > 5 and rows[-1]["loss"] < 0.3, [r["loss"] for r in rows]  # measured 0.108
    assert (out / "loss.png").stat().st_size > 1000
    resolved = R.load(out / "recipe.yaml")  # what the run carried out on this hardware, every default written
    assert resolved == compat.resolve(recipe, Hardware(use_cpu=True))
    assert resolved.parallel.strategy == "single" and resolved.batch.padding_free is False

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples][:2] == ["Spell the word cat.", "What is the capital of France?"]
    assert all(s["generated"] == s["reference"] and s["base"] != s["reference"] for s in samples), samples

    prompts = [json.loads(line) for line in (DATA / "alpaca_demo.jsonl").read_text().splitlines()]
    _, answers = gen.generate_for_run(out, prompts, compare_base=True, max_new_tokens=24, batch_size=64)
    tuned = sum(a["answer"] == a["reference"] for a in answers)
    base = sum(a["base_answer"] == a["reference"] for a in answers)
    print(f"demo prompts answered as the reference: fine-tuned {tuned}/{len(answers)}, base {base}")
    assert tuned >= 0.9 * len(answers) and base <= 0.05 * len(answers)  # measured 136/136 and 0


def test_final_adapter_loads_with_peft(tmp_path: Path) -> None:
    import signal

    import torch
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunefleet.distributed.demo_model import ensure_tiny_llama

    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    assert sft.run(quick(out)) == 0
    # the run's checkpoint-and-stop handlers are gone with it (forked processes would inherit them)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before
    final = out / "final"
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids = tokenizer("### Instruction:\nSpell the word cat.", return_tensors="pt")
    auto = AutoPeftModelForCausalLM.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(ensure_tiny_llama())
    plain_logits = base(**ids).logits
    wrapped = PeftModel.from_pretrained(base, final)
    with torch.no_grad():
        a, b = auto(**ids).logits, wrapped(**ids).logits
    torch.testing.assert_close(a, b)
    assert not torch.allclose(plain_logits, b), "the adapter changed nothing"


@pytest.mark.parametrize(
    ("fmt", "rows"),
    [
        ("messages", None),
        ("text", [{"text": f"The number {i} is {'even' if i % 2 == 0 else 'odd'}."} for i in range(40)]),
        ("prompt-completion", [{"prompt": f"Double {i}: ", "completion": str(2 * i)} for i in range(40)]),
    ],
)
def test_each_format_trains(tmp_path: Path, fmt: str, rows: list[dict] | None) -> None:
    if rows is None:
        path = DATA / "chat_demo.jsonl"
    else:
        path = tmp_path / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert sft.run(quick(out, f"data.path={path}", f"data.format={fmt}")) == 0
    assert len(metrics(out)) == 4
    assert (out / "final" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    "extra",
    [
        ["peft.method=dora"],
        ["peft.use_rslora=true", "peft.target_modules=[q_proj,v_proj]"],
        ["peft.init=gaussian", "peft.bias=lora_only"],
        ["peft.init=pissa"],
        ["model.quantization=nf4", "model.dtype=bfloat16", "model.compute_dtype=bfloat16"],
    ],
    ids=["dora", "rslora", "gaussian-bias", "pissa", "qlora-nf4"],
)
def test_peft_methods_train(tmp_path: Path, extra: list[str]) -> None:
    out = tmp_path / "run"
    assert sft.run(quick(out, *extra)) == 0
    losses = [r["loss"] for r in metrics(out)]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    quantized = json.loads((out / "plan.json").read_text())["in_effect"]["quantized_modules"]
    if "model.quantization=nf4" in extra:  # the base really was 4-bit: every linear layer but the head
        layers = json.loads((ensure_tiny_llama() / "config.json").read_text())["num_hidden_layers"]
        assert quantized == {"Linear4bit": 7 * layers}, quantized
    else:
        assert quantized == {}, quantized
    if "peft.method=dora" in extra:
        assert config["use_dora"] is True
    if "peft.use_rslora=true" in extra:
        assert config["use_rslora"] is True and sorted(config["target_modules"]) == ["q_proj", "v_proj"]


def test_finished_run_is_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert sft.run(quick(out)) == 0
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(TunefleetError, match="already holds a finished run"):
        sft.run(quick(out))
    assert (out / "metrics.jsonl").read_text() == before
    assert sft.run(quick(out), overwrite=True) == 0
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(moved) == 1 and (moved[0] / "metrics.jsonl").read_text() == before
    assert (out / "final").is_dir()


def test_unfinished_run_resumes_from_newest_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert sft.run(quick(out, "train.save_steps=2")) == 0
    # make it unfinished: drop final/ and the last checkpoint
    import shutil

    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoint-4")
    with pytest.raises(TunefleetError, match="--no-resume"):
        sft.run(quick(out, "train.save_steps=2"), no_resume=True)
    assert sft.run(quick(out, "train.save_steps=2")) == 0
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]  # appended, no duplicated steps
    assert (out / "final").is_dir()


def test_foreign_output_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(TunefleetError, match="not a tunefleet run"):
        sft.run(quick(tmp_path))
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_too_little_data_for_one_global_batch(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "one row"}) + "\n")
    with pytest.raises(TunefleetError, match="fewer than one global batch"):
        sft.run(quick(tmp_path / "run", f"data.path={path}", "data.format=text"))


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        ("missing", "does not exist"),
        ("badline", "line 2"),
        ("nofield", "instruction"),
        ("badkey", "did you mean peft.r?"),
    ],
)
def test_cli_bad_input_is_one_readable_message(tmp_path: Path, setup: str, fragment: str) -> None:
    data = tmp_path / "d.jsonl"
    overrides = [f"output_dir={tmp_path / 'run'}", f"data.path={data}"]
    if setup == "badline":
        data.write_text('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": oops}\n')
    elif setup == "nofield":
        data.write_text('{"question": "a", "answer": "b"}\n')
    elif setup == "badkey":
        data.write_text('{"instruction": "a", "input": "", "output": "b"}\n')
        overrides.append("peft.rank=8")
    cmd = [sys.executable, "-m", "tunefleet.launch.cli", "train", str(DEMO)]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "final").exists()


def test_plan_json_total_steps_is_what_the_trainer_runs(tmp_path: Path) -> None:
    """Examples dropped for having no answer token left, and an evaluation split: plan.json's step
    counts come from the same schedule the trainer runs (one batch path)."""
    rows = [json.loads(line) for line in (DATA / "alpaca_demo.jsonl").read_text().splitlines()][:60]
    long_prompt = "word " * 200  # every answer token is cut at data.max_length: the example is dropped
    rows[10:19] = [{**r, "instruction": long_prompt} for r in rows[10:19]]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    recipe = R.load(
        DEMO,
        [
            f"output_dir={out}",
            f"data.path={path}",
            "data.eval_ratio=0.2",  # the first 12 rows: 2 of the long ones (rows 10, 11) are held out
            "data.max_length=64",
            "train.epochs=2",
            "train.logging_steps=1",
            "train.save_steps=0",
            "batch.micro_batch_size=4",
            "batch.global_batch_size=8",
        ],
    )
    assert sft.run(recipe) == 0
    plan = json.loads((out / "plan.json").read_text())
    examples = 48 - 7  # 48 training rows, 7 of them (rows 12-18) lose every answer token
    assert plan["dataset_rows"] == plan["in_effect"]["train_examples"] == examples
    assert plan["eval_rows"] == 12 and plan["data_counted"] == "examples"
    assert plan["steps_per_epoch"] == plan["in_effect"]["steps_per_epoch"] == examples // 8
    trained = [r["step"] for r in metrics(out) if "loss" in r]
    assert plan["total_steps"] == trained[-1] == 2 * (examples // 8)


MIXTURE = DEMO.parent / "mixture.yaml"


def recording_sampler(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The micro batches the trainer's data loader takes from its sampler, in order."""
    from tunefleet.distributed import trainer as trainer_mod

    seen: list[list[int]] = []

    class Recording(trainer_mod.GlobalBatchSampler):
        def __iter__(self):  # type: ignore[no-untyped-def]
            for rows in super().__iter__():
                seen.append(list(rows))
                yield rows

    monkeypatch.setattr(trainer_mod, "GlobalBatchSampler", Recording)
    return seen


def test_the_mixture_recipe_trains_on_both_sources_by_weight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """recipes/mixture.yaml for one epoch: plan.json has each source's examples and share, and the
    samples trained are exactly the epoch's mixture order: 2:1 from the alpaca and the chat source."""
    from collections import Counter

    from tunefleet.distributed.sampler import mixture_order

    seen = recording_sampler(monkeypatch)
    out = tmp_path / "run"
    recipe = R.load(MIXTURE, [f"output_dir={out}", "train.epochs=1", "train.save_steps=0"])
    assert sft.run(recipe) == 0
    plan = json.loads((out / "plan.json").read_text())
    alpaca, chat = plan["mixture"]
    assert (alpaca["format"], chat["format"]) == ("alpaca", "messages")
    assert (alpaca["rows"], chat["rows"]) == (130, 190)  # 5% of 136 and of 200 held out, nothing dropped
    assert (alpaca["samples_per_epoch"], chat["samples_per_epoch"]) == (213, 107)
    assert (alpaca["share"], chat["share"]) == (0.6656, 0.3344) and alpaca["weight_share"] == 0.6667
    assert plan["eval_rows"] == 6 + 10 and plan["in_effect"]["train_examples"] == 320
    steps = plan["total_steps"]
    assert steps == 20 and plan["dropped_rows_per_epoch"] == 0
    trained = [i for rows in seen[: steps * plan["grad_accum_steps"]] for i in rows]
    assert sorted(trained) == sorted(mixture_order([130, 190], [2.0, 1.0], seed=42, epoch=0))
    by_source = Counter("alpaca" if i < 130 else "chat" for i in trained)
    assert by_source == {"alpaca": 213, "chat": 107}
    assert [r["samples_seen"] for r in metrics(out) if "loss" in r][-1] == 320
