"""Training throughput side by side: plain TRL `SFTTrainer` scripts vs `tunefleet train`.

    .venv/bin/python tools/bench_throughput.py            # the full comparison (~15-30 min on 2 cores)
    .venv/bin/python tools/bench_throughput.py --rows 192 # a quick look

Everything is built locally: a 4-layer, 256-wide Llama (random init, the demo tokenizer) and
alpaca-shaped rows with a long-tailed length mix (median ~200 tokens, p90 ~400, some beyond
`max_length` 512). LoRA r=16 on every linear layer, fp32, micro batch 8 x accumulation 8, one
epoch. Each contender runs in its own process, one after another:

- `trl-padded`: seed 000's script as a user writes it with plain TRL: a `text` field, padded
  micro batches in random order;
- `trl-packing`: plain TRL with `packing=True, packing_strategy="bfd", padding_free=True`, micro
  batch 1 (BFD packs rows of up to 512 tokens; micro batch 8 would attend over 4,096-token rows);
- `tunefleet-in-order`, `tunefleet-grouped` (the default), `tunefleet-padding-free`: `tunefleet
  train` with `batch.group_by_length` false / true and `batch.padding_free` true;
- full fine-tuning (every weight, no adapter, lr 2e-5): `trl-full` (plain TRL `SFTTrainer` without a
  PEFT config, padded, as above), `tunefleet-full-in-order` and `tunefleet-full` (`peft.method=full`,
  grouped by default). `--only trl-full tunefleet-full-in-order tunefleet-full` runs just these.

Reported per contender: non-padding tokens per second of training (from the end of the first
optimizer step to the end of the last, so start-up is not counted), the ratio to `trl-padded`,
padded tokens computed over real tokens (counted from the micro batches each one forms), the
wall time of the process, and the time from process start to the end of the first optimizer
step. tunefleet's three modes train the same steps: their per-step losses are compared too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MAX_LENGTH = 512
MICRO, ACCUM = 8, 8
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
LR = 2e-4
FULL_LR = 2e-5
SEED = 42


# ----------------------------------------------------------------------------- the model and the data


def build_model(out: Path) -> Path:
    """The 4-layer, 256-wide Llama with the demo tokenizer, saved like any checkpoint."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunefleet.distributed.demo_model import ensure_tiny_llama

    if (out / "config.json").is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_llama())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_rows(n: int, tokenizer: Any) -> list[dict[str, str]]:
    """Alpaca rows whose tokenised length follows a long tail: median ~200, p90 ~400, ~5% > 512."""
    from tunefleet.distributed.demo_model import CORPUS_FILE, demo_data_path

    words = demo_data_path(CORPUS_FILE).read_text(encoding="utf-8").split()
    rng = random.Random(SEED)
    probe = " ".join(rng.choice(words) for _ in range(2000))
    tokens_per_word = len(tokenizer(probe, add_special_tokens=False)["input_ids"]) / 2000
    rows = []
    for _ in range(n):
        target = max(24, int(rng.lognormvariate(5.3, 0.55)))
        instruction = " ".join(rng.choice(words) for _ in range(rng.randint(4, 16)))
        has_input = rng.random() < 0.4
        inp = " ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) if has_input else ""
        out_words = max(3, int((target - 12) / tokens_per_word) - len(instruction.split()) - len(inp.split()))
        rows.append(
            {
                "instruction": instruction,
                "input": inp,
                "output": " ".join(rng.choice(words) for _ in range(out_words)),
            }
        )
    return rows


def alpaca_text(row: dict[str, str], eos: str) -> str:
    """Seed 000's template, as a `text` field."""
    from tunefleet.distributed.data import alpaca_prompt

    return alpaca_prompt(row["instruction"], row["input"]) + row["output"] + eos


# ----------------------------------------------------------------------------- contenders (one process each)


class _StepClock:
    """Records, per optimizer step, the wall time and the non-padding tokens seen so far."""

    def __init__(self, path: Path, started: float) -> None:
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                clock.rows.append(
                    {
                        "step": state.global_step,
                        "t": time.time() - started,
                        "tokens": state.num_input_tokens_seen,
                    }
                )

        self.rows: list[dict[str, Any]] = []
        self.callback = Callback()
        self.path = path

    def losses_and_write(self, trainer: Any) -> None:
        losses = {r["step"]: r["loss"] for r in trainer.state.log_history if "loss" in r}
        for row in self.rows:
            row["loss"] = losses.get(row["step"])
        self.path.write_text(json.dumps(self.rows))


def run_trl(work: Path, *, packing: bool, started: float, full: bool = False) -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    model_dir = work / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    rows = json.loads((work / "rows.json").read_text())
    dataset = Dataset.from_list([{"text": alpaca_text(r, tokenizer.eos_token)} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    name = "trl-full" if full else "trl-packing" if packing else "trl-padded"
    config = SFTConfig(
        output_dir=str(work / name),
        per_device_train_batch_size=1 if packing else MICRO,
        gradient_accumulation_steps=ACCUM,
        num_train_epochs=1,
        learning_rate=FULL_LR if full else LR,
        lr_scheduler_type="constant",
        max_length=MAX_LENGTH,
        packing=packing,
        padding_free=packing,
        **({"packing_strategy": "bfd"} if packing else {}),
        dataset_text_field="text",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=SEED,
        include_num_input_tokens_seen="all" if packing else "non_padding",
        disable_tqdm=True,
    )
    clock = _StepClock(work / f"{name}.json", started)
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=None if full else LoraConfig(task_type="CAUSAL_LM", **LORA),
        callbacks=[clock.callback],
    )
    _count_padding(trainer, work / f"{name}.padding.json")
    trainer.train()
    clock.losses_and_write(trainer)


def _count_padding(trainer: Any, path: Path) -> None:
    """Padded tokens over real tokens in the micro batches the trainer's data loader forms."""
    padded = real = 0
    for batch in trainer.get_train_dataloader():
        ids = batch["input_ids"]
        padded += ids.numel()
        real += int(batch["attention_mask"].sum()) if "attention_mask" in batch else ids.numel()
    path.write_text(json.dumps({"padded_token_ratio": padded / real}))


def tunefleet_recipe(work: Path, mode: str) -> list[str]:
    batching = {
        "tunefleet-in-order": ["batch.group_by_length=false"],
        "tunefleet-grouped": [],
        "tunefleet-padding-free": ["batch.padding_free=true"],
        "tunefleet-full-in-order": ["batch.group_by_length=false", "peft.method=full", f"train.lr={FULL_LR}"],
        "tunefleet-full": ["peft.method=full", f"train.lr={FULL_LR}"],
    }[mode]
    return [
        f"output_dir={work / mode}",
        f"model.name_or_path={work / 'model'}",
        "model.dtype=float32",
        f"data.path={work / 'rows.jsonl'}",
        "data.format=alpaca",
        f"data.max_length={MAX_LENGTH}",
        f"peft.r={LORA['r']}",
        f"peft.alpha={LORA['lora_alpha']}",
        f"peft.dropout={LORA['lora_dropout']}",
        "train.epochs=1",
        f"train.lr={LR}",
        "train.lr_scheduler=constant",
        "train.warmup_ratio=0",
        "train.precision=fp32",
        "train.logging_steps=1",
        "train.save_steps=0",
        f"train.seed={SEED}",
        f"batch.micro_batch_size={MICRO}",
        f"batch.global_batch_size={MICRO * ACCUM}",
        *batching,
    ]


def run_tunefleet(work: Path, mode: str, started: float) -> None:
    from tunefleet.distributed import sft
    from tunefleet.launch.core import recipe as R

    recipe = R.load(
        Path(__file__).resolve().parent.parent / "recipes" / "demo.yaml", tunefleet_recipe(work, mode)
    )
    assert sft.run(recipe, overwrite=True) == 0
    rows = [json.loads(line) for line in (work / mode / "metrics.jsonl").read_text().splitlines()]
    plan = json.loads((work / mode / "plan.json").read_text())
    steps = [
        {"step": r["step"], "t": r["time"] - started, "tokens": r["tokens_seen"], "loss": r["loss"]}
        for r in rows
        if "loss" in r
    ]
    (work / f"{mode}.json").write_text(json.dumps(steps))
    ratio = plan["in_effect"]["batching"]["padded_token_ratio"]
    (work / f"{mode}.padding.json").write_text(json.dumps({"padded_token_ratio": ratio}))


# ----------------------------------------------------------------------------- the comparison


CONTENDERS = [
    "trl-padded",
    "trl-packing",
    "tunefleet-in-order",
    "tunefleet-grouped",
    "tunefleet-padding-free",
]
FULL_CONTENDERS = ["trl-full", "tunefleet-full-in-order", "tunefleet-full"]
"""Full fine-tuning (`--only` these, or `--full`)."""


def worker(name: str, work: Path) -> None:
    started = float(os.environ["BENCH_STARTED"])
    if name.startswith("trl"):
        run_trl(work, packing=name == "trl-packing", started=started, full=name == "trl-full")
    else:
        run_tunefleet(work, name, started)


def measure(name: str, work: Path) -> dict[str, Any]:
    started = time.time()
    env = {**os.environ, "BENCH_STARTED": repr(started), "TOKENIZERS_PARALLELISM": "false"}
    log = work / f"{name}.log"
    with log.open("w") as f:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", name, "--work", str(work)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )
    wall = time.time() - started
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}); see {log}")
    steps = json.loads((work / f"{name}.json").read_text())
    padding = json.loads((work / f"{name}.padding.json").read_text())
    first, last = steps[0], steps[-1]
    return {
        "name": name,
        "tokens_per_s": (last["tokens"] - first["tokens"]) / (last["t"] - first["t"]),
        "padded_token_ratio": padding["padded_token_ratio"],
        "wall_s": wall,
        "first_step_s": first["t"],
        "steps": len(steps),
        "losses": [s["loss"] for s in steps],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=960, help="training rows (a multiple of 64)")
    p.add_argument("--work", default="runs/bench-throughput", help="working directory")
    p.add_argument("--only", nargs="*", default=None, help="contenders to run (default: the LoRA ones)")
    p.add_argument("--full", action="store_true", help="the full fine-tuning contenders")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.work).absolute()
    if args.worker:
        worker(args.worker, work)
        return
    work.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    model = build_model(work / "model")
    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = build_rows(args.rows, tokenizer)
    (work / "rows.json").write_text(json.dumps(rows))
    (work / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lengths = [
        len(tokenizer(alpaca_text(r, tokenizer.eos_token), add_special_tokens=False)["input_ids"])
        for r in rows
    ]
    q = statistics.quantiles(lengths, n=10)
    print(
        f"{len(rows)} rows: median {statistics.median(lengths):.0f} tokens, p90 {q[8]:.0f}, "
        f"{sum(n > MAX_LENGTH for n in lengths)} beyond max_length {MAX_LENGTH}; micro {MICRO} x accum {ACCUM}, "
        "LoRA r=16 all-linear, fp32",
        flush=True,
    )
    results = []
    for name in args.only or (FULL_CONTENDERS if args.full else CONTENDERS):
        r = measure(name, work)
        results.append(r)
        print(f"  {name}: {r['tokens_per_s']:,.0f} tokens/s, {r['wall_s']:.0f} s", flush=True)
    base = next((r for r in results if r["name"] in ("trl-padded", "trl-full")), results[0])
    print(f"\n| contender | tokens/s | vs {base['name']} | padded/real tokens | wall s | first step s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['name']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
            f"{r['padded_token_ratio']:.2f} | {r['wall_s']:.0f} | {r['first_step_s']:.1f} |"
        )
    ours = [r for r in results if r["name"].startswith("tunefleet")]
    if len(ours) > 1:
        ref = ours[0]
        diff = max(abs(a - b) for r in ours[1:] for a, b in zip(ref["losses"], r["losses"], strict=True))
        print(f"\ntunefleet's modes train the same steps: max |loss difference| per step = {diff:.2e}")
    (work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
