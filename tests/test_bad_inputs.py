"""The catalogue of bad and unusual inputs: every one must end in ONE clear error (what was wrong,
where, and a `fix:` line), exit code 2 from the command line, and nothing written that was not
there before. No traceback, no silent acceptance.

Each entry is (id, what to run, a fragment the message must contain). The commands run in this
process through `tunefleet.launch.cli.main` (the real argument parsing, checks and messages; an
unexpected exception fails the test with its traceback). Add an entry for every bug of this kind.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pytest

from tunefleet.launch import cli

DEMO = Path(str(resources.files("tunefleet.recipes"))) / "demo.yaml"
DATA = DEMO.parent / "data" / "alpaca_demo.jsonl"


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Path], list[str]]
    """The command line (after `tunefleet`), given a fresh scratch directory."""
    expect: str
    """A fragment of the error message."""
    setup: Callable[[Path], None] | None = None
    keeps: str | None = None
    """What a refusal may leave behind on purpose (a path under the scratch directory)."""


def _half_downloaded_model(to: Path) -> None:
    """The demo model with its weights file cut at half (a download cut short)."""
    from tunefleet.distributed.demo_model import ensure_tiny_llama

    shutil.copytree(ensure_tiny_llama(), to)
    weights = to / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def recipe_file(tmp: Path, text: str) -> str:
    path = tmp / "r.yaml"
    path.write_text(text)
    return str(path)


BASE_YAML = "output_dir: {out}\nmodel:\n  name_or_path: tunefleet:tiny-llama\ndata:\n  path: {data}\n"


def yaml_recipe(extra: str) -> Callable[[Path], list[str]]:
    return lambda t: ["plan", recipe_file(t, BASE_YAML.format(out=t / "run", data=DATA) + extra)]


def plan(*sets: str) -> Callable[[Path], list[str]]:
    return lambda t: [
        "plan",
        str(DEMO),
        "--set",
        f"output_dir={t / 'run'}",
        *[a for s in sets for a in ("--set", s)],
    ]


def launch(*sets: str, nproc: int = 2, extra: tuple[str, ...] = ()) -> Callable[[Path], list[str]]:
    return lambda t: [
        "launch",
        str(DEMO),
        "--nproc",
        str(nproc),
        "--dry-run",
        "--set",
        f"output_dir={t / 'run'}",
        *[a for s in sets for a in ("--set", s)],
        *extra,
    ]


def train(*sets: str, extra: tuple[str, ...] = ()) -> Callable[[Path], list[str]]:
    return lambda t: [
        "train",
        str(DEMO),
        "--set",
        f"output_dir={t / 'run'}",
        *[a for s in sets for a in ("--set", s)],
        *extra,
    ]


def slurm(*flags: str, sets: tuple[str, ...] = ()) -> Callable[[Path], list[str]]:
    return lambda t: [
        "slurm",
        str(DEMO),
        "--nodes",
        "1",
        "--gpus-per-node",
        "0",
        "--time",
        "00:30:00",
        "--set",
        f"output_dir={t / 'run'}",
        *[a for s in sets for a in ("--set", s)],
        *flags,
    ]


# ----------------------------------------------------------------------------- setups


def finished_run(t: Path) -> None:
    (t / "run" / "final").mkdir(parents=True)
    (t / "run" / "recipe.yaml").write_text("# resolved recipe\n")


def foreign_dir(t: Path) -> None:
    (t / "run").mkdir()
    (t / "run" / "notes.txt").write_text("mine")


def checkpoint(t: Path, *, step: int = 2, sets: tuple[str, ...] = (), **manifest: object) -> Path:
    """A complete checkpoint as the trainer writes it, of the demo recipe run with `output_dir`
    (and `sets`)."""
    from tunefleet.launch.core import checkpoints as ckpt
    from tunefleet.launch.core import recipe as R
    from tunefleet.launch.core.data_identity import data_fingerprint

    recipe = R.load(
        DEMO, [f"output_dir={t / 'run'}", "parallel.strategy=single", "batch.padding_free=false", *sets]
    )
    run = t / "run"
    run.mkdir(exist_ok=True)
    (run / "recipe.yaml").write_text("# resolved recipe\n" + R.dump(recipe))
    tmp = run / f".tmp-checkpoint-{step}"
    tmp.mkdir()
    (tmp / "adapter_model.safetensors").write_bytes(b"0123456789" * 10)
    base = {
        "recipe": R.to_dict(recipe),
        "world_size": 1,
        "strategy": "single",
        "batch_plan": {
            "global_batch_size": 16,
            "world_size": 1,
            "micro_batch_size": 8,
            "grad_accum_steps": 2,
        },
        "data_fingerprint": data_fingerprint(recipe.data),
        "step": step,
        "samples_seen": step * 16,
    }
    made = ckpt.Manifest.from_dict({"recipe_hash": R.fingerprint(recipe), "epoch": 0.0, **base, **manifest})
    ckpt.finalize(tmp, run / f"checkpoint-{step}", made)
    return run / f"checkpoint-{step}"


def users_recipe_in_output_dir(t: Path) -> None:
    """One folder per experiment: the user keeps the recipe in the directory the run writes to."""
    (t / "run").mkdir()
    (t / "run" / "recipe.yaml").write_text("# my experiment\n" + DEMO.read_text())


def zero2_full_checkpoint(t: Path) -> Path:
    """A complete checkpoint of a 2-process ZeRO-2 full fine-tune of the demo recipe."""
    return checkpoint(
        t,
        sets=("peft.method=full", "parallel.strategy=deepspeed-zero2"),
        world_size=2,
        strategy="deepspeed-zero2",
        batch_plan={"global_batch_size": 16, "world_size": 2, "micro_batch_size": 8, "grad_accum_steps": 1},
    )


def damaged_checkpoint(t: Path) -> None:
    path = checkpoint(t)
    (path / "adapter_model.safetensors").write_bytes(b"9876543210" * 10)  # same size, other bytes


def changed_data(t: Path) -> None:
    checkpoint(t, data_fingerprint="0000000000000000")


def incomplete_checkpoint(t: Path) -> None:
    path = checkpoint(t)
    (path / "COMPLETE").unlink()


def data_dir_with_run_inside(t: Path) -> None:
    (t / "data").mkdir()
    shutil.copy(DATA, t / "data" / "train.jsonl")


def file_in_the_way(t: Path) -> None:
    (t / "blocker").write_text("a file")


def existing_script(t: Path) -> None:
    (t / "job.sh").write_text("#!/bin/bash\necho my own job script\n")


def not_a_run(t: Path) -> None:
    (t / "somedir").mkdir()
    (t / "somedir" / "x.txt").write_text("x")


def fake_run(t: Path, *sets: str) -> None:
    """A finished run of the demo recipe with `sets`, its adapter files stand-ins (never loaded)."""
    from tunefleet.launch.core import recipe as R

    run = t / "run"
    (run / "final").mkdir(parents=True)
    (run / "recipe.yaml").write_text(R.dump(R.load(DEMO, [f"output_dir={run}", *sets])))
    (run / "final" / "adapter_config.json").write_text("{}")
    (run / "final" / "adapter_model.safetensors").write_bytes(b"x")


def nonempty_merge_out(t: Path) -> None:
    (t / "merged").mkdir()
    (t / "merged" / "keep.txt").write_text("x")


CHAT = DEMO.parent / "data" / "chat_demo.jsonl"


def mixture(*sources: str) -> str:
    """`data.mixture=[...]` of the given `{...}` sources, for --set (data.path cleared)."""
    return f"data.mixture=[{', '.join(sources)}]"


MIXTURE = ("data.path=", mixture(f"{{path: {DATA}, weight: 2}}", f"{{path: {CHAT}, format: messages}}"))
"""The demo's alpaca data and the chat data, 2:1."""


def mixture_yaml(sources: str, extra: str = "") -> Callable[[Path], list[str]]:
    """A recipe file whose data section is `sources` (YAML lines under `data:`)."""
    head = "output_dir: {out}\nmodel:\n  name_or_path: tunefleet:tiny-llama\ndata:\n"
    return lambda t: ["plan", recipe_file(t, head.format(out=t / "run") + sources + extra)]


def mixture_checkpoint(t: Path) -> None:
    checkpoint(t, sets=MIXTURE)


CATALOGUE = [
    # ------------------------------------------------------------------ the recipe and --set
    Case("unknown key", plan("peft.rank=8"), "did you mean peft.r?"),
    Case("other tools' key name", plan("train.learning_rate=1e-4"), "did you mean train.lr?"),
    Case(
        "HF batch size name",
        plan("batch.per_device_train_batch_size=4"),
        "did you mean batch.micro_batch_size?",
    ),
    Case(
        "duplicate key",
        yaml_recipe("train:\n  lr: 1e-4\n  epochs: 1\n  lr: 3e-4\n"),
        "train.lr is written twice (lines",
    ),
    Case("# in a --set value", plan("output_dir=/runs/exp #3"), "as a comment"),
    Case("negative seed", plan("train.seed=-1"), "train.seed: must be in"),
    Case("rank 0", plan("peft.r=0"), "peft.r: must be > 0"),
    Case("dropout 1", plan("peft.dropout=1"), "peft.dropout: must be in [0, 1)"),
    Case("eval ratio 1.5", plan("data.eval_ratio=1.5"), "data.eval_ratio: must be in [0, 1)"),
    Case(
        "eval path and ratio",
        plan("data.eval_ratio=0.1", f"data.eval_path={DATA}"),
        "both data.eval_path and data.eval_ratio",
    ),
    Case("max_steps 0", plan("train.max_steps=0"), "train.max_steps: must be -1"),
    Case("epochs 0", plan("train.epochs=0"), "train.epochs: must be > 0"),
    Case("micro batch 0", plan("batch.micro_batch_size=0"), "batch.micro_batch_size: must be > 0"),
    Case(
        "global not a multiple of micro",
        plan("batch.global_batch_size=10"),
        "not a multiple of batch.micro_batch_size=8",
    ),
    Case(
        "token budget not a multiple",
        plan("batch.global_batch_tokens=1000"),
        "is not a multiple of data.max_length=256",
    ),
    Case(
        "token budget and samples disagree",
        plan("batch.global_batch_tokens=4096", "batch.global_batch_size=32"),
        "disagrees with batch.global_batch_tokens",
    ),
    Case("fsdp key without fsdp", plan("parallel.fsdp_version=1"), "only the fsdp strategies read it"),
    Case(
        "ZeRO-3 window without ZeRO-3",
        plan("parallel.strategy=fsdp", "parallel.zero3_gathered_params=1e8"),
        "only deepspeed-zero3 reads it",
    ),
    Case(
        "ZeRO-3 sub-group of 0 elements",
        plan("parallel.strategy=deepspeed-zero3", "parallel.zero3_sub_group_size=0"),
        "must be a whole number of parameters >= 1",
    ),
    Case(
        "ZeRO-3 window that is not a count",
        plan("parallel.strategy=deepspeed-zero3", "parallel.zero3_gathered_params=1.5"),
        "must be a whole number of parameters >= 0",
    ),
    Case("offload without sharding", plan("parallel.offload=optimizer"), "needs a sharding strategy"),
    Case(
        "ZeRO-2 param offload",
        plan("parallel.strategy=deepspeed-zero2", "parallel.offload=optimizer+params"),
        "ZeRO-2 does not partition parameters",
    ),
    Case(
        "loftq on 4-bit", plan("peft.init=loftq", "model.quantization=nf4"), "loftq needs an unquantized base"
    ),
    Case(
        "pissa on 4-bit",
        plan("peft.init=pissa", "model.quantization=nf4"),
        "pissa decomposes the base weights",
    ),
    Case("quantization typo", plan("model.quantization=nf5"), "did you mean 'nf4'"),
    Case("precision fp8", plan("train.precision=fp8"), "train.precision: 'fp8' is not one of"),
    Case(
        "recipe is a list",
        lambda t: ["plan", recipe_file(t, "- a\n- b\n")],
        "a recipe is a mapping of sections",
    ),
    Case("recipe file missing", lambda t: ["plan", str(t / "nope.yaml")], "does not exist"),
    Case("invalid YAML", lambda t: ["plan", recipe_file(t, "model: [unclosed\n")], "is not valid YAML"),
    Case("--set without =", plan("train.lr"), "expected section.key=value"),
    Case("--set bad key", plan("train..lr=1"), "is not a dotted key"),
    Case("--set bad YAML", plan("train.lr=[1"), "the value is not valid YAML"),
    Case("unknown tracker", plan("train.report_to=[neptune]"), "is not one of"),
    Case("empty target list", plan("peft.target_modules=[]"), "peft.target_modules: is an empty list"),
    Case("limit 0", plan("data.limit=0"), "data.limit: must be > 0"),
    Case("max_length 0", plan("data.max_length=0"), "data.max_length: must be > 0"),
    Case("keep_last 0", plan("checkpoint.keep_last=0"), "checkpoint.keep_last: must be >= 1"),
    Case("empty output_dir", plan("output_dir="), "output_dir: is empty"),
    Case("lr 0", plan("train.lr=0"), "train.lr: must be > 0"),
    Case("unknown section", plan("trian.lr=1e-4"), "did you mean train"),
    Case("wrong type", plan("peft.r=eight"), "peft.r: expected int"),
    # ------------------------------------------------------------------ the LoRA variants (seed 003)
    Case(
        "rank pattern matching nothing", plan("peft.rank_pattern={mlp: 4}"), "'mlp' matches no adapted module"
    ),
    Case("rank pattern not a regex", plan("peft.rank_pattern={'q_proj(': 4}"), "is not a regular expression"),
    Case("alpha pattern 0", plan("peft.alpha_pattern={q_proj: 0}"), "must be > 0"),
    Case(
        "target parameter the model lacks",
        plan("peft.target_parameters=[mlp.experts.gate_up_proj]"),
        "'mlp.experts.gate_up_proj' matches no parameter of LlamaForCausalLM",
    ),
    Case(
        "target parameters with dropout",
        plan("peft.target_parameters=[mlp.experts.gate_up_proj]", "peft.dropout=0.05"),
        "has no dropout",
    ),
    Case(
        "trainable token beyond the vocabulary",
        plan("peft.trainable_token_indices=[5, 99999]"),
        "token id(s) [99999] are beyond the input embedding's",
    ),
    Case(
        "trainable tokens repeated", plan("peft.trainable_token_indices=[5, 5]"), "must be >= 0 and distinct"
    ),
    Case(
        "replicated layers beyond the model",
        plan("peft.layer_replication=[[0, 2], [1, 3]]"),
        "reach beyond the model's 2 layers",
    ),
    Case("replication range backwards", plan("peft.layer_replication=[[2, 0]]"), "0 <= start < end"),
    Case(
        "layer replication that shrinks the model",
        plan("peft.layer_replication=[[0, 1]]"),
        "stacks 1 layers, fewer than the model's 2: layer(s) [1] would be dropped",
    ),
    Case("eva_rho without EVA", plan("peft.eva_rho=2"), "only peft.init=eva reads it"),
    Case("eva_rho below 1", plan("peft.init=eva", "peft.eva_rho=0.5"), "peft.eva_rho: must be >= 1"),
    Case("LoRA+ ratio 0", plan("peft.loraplus_lr_ratio=0"), "peft.loraplus_lr_ratio: must be > 0"),
    Case(
        "LoRA-FA with LoRA+",
        plan("peft.lora_fa=true", "peft.loraplus_lr_ratio=16"),
        "each build the optimizer",
    ),
    Case(
        "LoRA-FA with another optimizer",
        plan("peft.lora_fa=true", "train.optimizer=paged_adamw_8bit"),
        "LoRA-FA trains with its own AdamW",
    ),
    Case("LoRA-FA with DoRA", plan("peft.lora_fa=true", "peft.method=dora"), "DoRA's magnitude vectors"),
    Case("empty aLoRA invocation", plan("peft.alora_invocation=' '"), "peft.alora_invocation: is empty"),
    Case(
        "aLoRA invocation not in the prompts",
        train("peft.alora_invocation='Response:'"),
        "does not occur before the first trained token in 136 of 136 training examples",
        keeps="run/.cache",  # checked on the tokenised examples: the cache stays for the fixed rerun
    ),
    Case(
        "EVA without enough tokens per micro batch",
        train("peft.init=eva", "peft.r=256"),
        "EVA's SVD needs micro batches of at least 512 trained tokens",
        keeps="run/.cache",  # checked on the tokenised examples: the cache stays for the fixed rerun
    ),
    Case(
        "merge of an Activated LoRA run",
        lambda t: ["merge", str(t / "run"), "--out", str(t / "merged")],
        "which no merged weight can do",
        lambda t: fake_run(t, "peft.alora_invocation=go"),
    ),
    Case(
        "merge of a LoftQ run on CPU",
        lambda t: ["merge", str(t / "run"), "--out", str(t / "merged")],
        "PEFT rebuilds LoftQ's quantized base weights when it loads the adapter, and only on a CUDA GPU",
        lambda t: fake_run(t, "peft.init=loftq"),
    ),
    Case(
        "LoRA+ ratio infinite",
        plan("peft.loraplus_lr_ratio=.inf"),
        "peft.loraplus_lr_ratio: must be > 0 and finite",
    ),
    Case(
        "port 0 on several machines",
        lambda t: [
            "launch",
            str(DEMO),
            "--nproc",
            "1",
            "--nnodes",
            "2",
            "--node-rank",
            "0",
            "--main-address",
            "127.0.0.1",
            "--main-port",
            "0",
            "--set",
            f"output_dir={t / 'run'}",
        ],  # fmt: skip
        "--main-port 0 with --nnodes 2: each machine would pick its own random port",
    ),
    Case(
        "negative non-finite allowance",
        train("train.max_nonfinite_steps=-1"),
        "train.max_nonfinite_steps: must be >= 0",
    ),
    Case(
        "skipping non-finite steps under DeepSpeed",
        launch("train.max_nonfinite_steps=2", "parallel.strategy=deepspeed-zero2"),
        "a non-finite step cannot be skipped there",
    ),
    # ------------------------------------------------------------------ full and partial fine-tuning (seed 004)
    Case(
        "full fine-tuning of a 4-bit base",
        train("peft.method=full", "model.quantization=nf4"),
        "stores them quantized, where no gradient can move them",
    ),
    Case(
        "partial fine-tuning of an 8-bit base",
        launch(
            "peft.method=freeze",
            "peft.trainable_layers=1",
            "model.quantization=int8",
            "parallel.strategy=ddp",
        ),
        "bitsandbytes int8 stores them quantized",
    ),
    Case(
        "fsdp-qlora with full",
        launch("peft.method=full", "parallel.strategy=fsdp-qlora"),
        "fsdp-qlora shards a 4-bit base under adapters",
    ),
    Case("freeze without a selection", train("peft.method=freeze"), "freeze trains nothing unless"),
    Case(
        "freeze: more layers than the model has",
        plan("peft.method=freeze", "peft.trainable_layers=5"),
        "LlamaForCausalLM has 2 decoder layers (model.layers)",
    ),
    Case(
        "freeze: a submodule name typo",
        plan("peft.method=freeze", "peft.trainable_layers=1", "peft.trainable_modules=[mpl]"),
        "'mpl' matches no submodule of a decoder layer (LlamaDecoderLayer) (closest: mlp)",
    ),
    Case(
        "freeze: an extra module typo",
        train("peft.method=freeze", "peft.extra_modules=[lm_haed]"),
        "'lm_haed' matches no module outside the decoder layers (closest: lm_head)",
    ),
    Case(
        "freeze keys with lora",
        train("peft.trainable_layers=2"),
        "peft.trainable_layers: only peft.method=freeze reads it",
    ),
    Case(
        "a LoRA variant with full",
        train("peft.method=full", "peft.use_rslora=true"),
        "peft.use_rslora: is a LoRA setting, and peft.method=full trains the model's own weights",
    ),
    Case(
        "trainable_modules without layers",
        train("peft.method=freeze", "peft.extra_modules=[lm_head]", "peft.trainable_modules=[mlp]"),
        "names submodules of the trainable layers, but peft.trainable_layers selects none",
    ),
    Case(
        "export dtype of an adapter",
        train("train.export_dtype=bfloat16"),
        "only peft.method=full/freeze export a model",
    ),
    Case(
        "ZeRO-2 full checkpoint on another world size",
        launch("peft.method=full", "parallel.strategy=deepspeed-zero2", nproc=1),
        "tunefleet re-cuts ZeRO-3 and FSDP2 checkpoints of a full or partial fine-tune, not ZeRO-2's",
        lambda t: zero2_full_checkpoint(t) and None,
    ),
    # ------------------------------------------------------------------ hardware and strategy (tunefleet launch)
    Case(
        "single on 2 processes",
        launch("parallel.strategy=single"),
        "`single` runs one process, but 2 were asked for",
    ),
    Case("FSDP1 on CPU", launch("parallel.strategy=fsdp", "parallel.fsdp_version=1"), "FSDP1 needs GPUs"),
    Case(
        "fsdp with a 4-bit base",
        launch("parallel.strategy=fsdp", "model.quantization=nf4"),
        "use parallel.strategy=fsdp-qlora",
    ),
    Case(
        "fsdp-qlora without 4-bit",
        launch("parallel.strategy=fsdp-qlora"),
        "fsdp-qlora shards a bitsandbytes 4-bit base",
    ),
    Case(
        "int8 under FSDP",
        launch("parallel.strategy=fsdp-qlora", "model.quantization=int8"),
        "fsdp-qlora shards a bitsandbytes 4-bit base",
    ),
    Case(
        "paged 8-bit under FSDP-QLoRA",
        launch("parallel.strategy=fsdp-qlora", "model.quantization=nf4", "train.optimizer=paged_adamw_8bit"),
        "paged_adamw_8bit fails",
    ),
    Case(
        "QDoRA under ZeRO-3",
        launch("parallel.strategy=deepspeed-zero3", "model.quantization=nf4", "peft.method=dora"),
        "DoRA on a 4-bit base crashes under ZeRO-3",
    ),
    Case(
        "SGD with ZeRO offload",
        launch("parallel.strategy=deepspeed-zero3", "parallel.offload=optimizer", "train.optimizer=sgd"),
        "DeepSpeed's CPU Adam",
    ),
    Case(
        "bitsandbytes on gpt-oss",
        launch("model.name_or_path=openai/gpt-oss-20b", "model.quantization=nf4", nproc=1),
        "ships MXFP4 weights",
    ),
    Case(
        "flash attention on CPU",
        launch("model.attn_implementation=flash_attention_2", nproc=1),
        "is a CUDA kernel",
    ),
    Case(
        "Liger on CPU", launch("train.liger_kernel=true", nproc=1), "Liger's Triton kernels need a CUDA GPU"
    ),
    Case(
        "LoftQ on CPU",
        launch("peft.init=loftq", nproc=1),
        "PEFT runs LoftQ's quantization on a CUDA GPU only",
    ),
    Case(
        "EVA under ZeRO-3",
        launch("parallel.strategy=deepspeed-zero3", "peft.init=eva"),
        "ZeRO-3 has partitioned its weights by then",
    ),
    Case(
        "LoRA-FA under FSDP",
        launch("parallel.strategy=fsdp", "peft.lora_fa=true"),
        "LoRA-FA's optimizer multiplies whole A matrices",
    ),
    Case(
        "layer replication under FSDP",
        launch("parallel.strategy=fsdp", "peft.layer_replication=[[0, 2], [1, 2]]"),
        "share their base weights",
    ),
    Case(
        "LoRA-FA under DeepSpeed",
        launch("parallel.strategy=deepspeed-zero2", "peft.lora_fa=true"),
        "LoRA-FA's optimizer cannot pair each A with its B",
    ),
    Case(
        "trainable tokens under ZeRO-3 on CPU",
        launch("parallel.strategy=deepspeed-zero3", "peft.trainable_token_indices=[5]"),
        "PEFT gathers the partitioned embedding rows onto a CUDA device",
    ),
    Case(
        "aLoRA with packed rows",
        launch("peft.alora_invocation=go", "batch.padding_free=true", nproc=1),
        "aLoRA finds one invocation per row",
    ),
    Case("--nproc 0", launch(nproc=0), "at least 1 process"),
    # ------------------------------------------------------------------ the output directory
    Case(
        "output_dir below a file",
        train("output_dir={tmp}/blocker/run"),
        "which is a file, not a directory",
        file_in_the_way,
    ),
    Case(
        "output_dir inside the data directory",
        train("data.path={tmp}/data", "output_dir={tmp}/data/run"),
        "inside the data directory",
        data_dir_with_run_inside,
    ),
    Case(
        "output_dir holds the data",
        train("data.path={tmp}/data/train.jsonl", "output_dir={tmp}"),
        "--overwrite would move the data",
        data_dir_with_run_inside,
    ),
    Case(
        "output_dir is a file",
        train("output_dir={tmp}/blocker"),
        "exists and is not a directory",
        file_in_the_way,
    ),
    Case("finished run", train(), "already holds a finished run", finished_run),
    Case(
        "the user's own recipe.yaml in output_dir (train)",
        train(),
        "holds a recipe.yaml that tunefleet did not write (yours?)",
        lambda t: users_recipe_in_output_dir(t),
    ),
    Case(
        "the user's own recipe.yaml in output_dir (launch)",
        launch("parallel.strategy=ddp"),
        "holds a recipe.yaml that tunefleet did not write (yours?)",
        lambda t: users_recipe_in_output_dir(t),
    ),
    Case("foreign directory", train(), "holds files that are not a tunefleet run", foreign_dir),
    Case(
        "--resume of an incomplete checkpoint",
        train(extra=("--resume", "{tmp}/run/checkpoint-2")),
        "is not a complete tunefleet checkpoint",
        incomplete_checkpoint,
    ),
    Case(
        "--resume with --overwrite",
        train(extra=("--resume", "{tmp}/run/checkpoint-2", "--overwrite")),
        "cannot be combined with --overwrite",
        lambda t: checkpoint(t) and None,
    ),
    Case(
        "--no-resume with a checkpoint",
        train(extra=("--no-resume",)),
        "holds an unfinished run",
        lambda t: checkpoint(t) and None,
    ),
    Case(
        "data changed under a run",
        train("parallel.strategy=single", "batch.padding_free=false"),
        "the data changed since checkpoint-2",
        changed_data,
    ),
    Case(
        "eval split changed on resume",
        train("parallel.strategy=single", "batch.padding_free=false", "data.eval_ratio=0.1"),
        "data.eval_ratio: 0.0 -> 0.1",
        lambda t: checkpoint(t) and None,
    ),
    Case(
        "damaged checkpoint, --resume",
        train(
            "parallel.strategy=single",
            "batch.padding_free=false",
            extra=("--resume", "{tmp}/run/checkpoint-2"),
        ),
        "is damaged: adapter_model.safetensors",
        damaged_checkpoint,
    ),
    Case(
        "every checkpoint damaged",
        train("parallel.strategy=single", "batch.padding_free=false"),
        "every checkpoint is damaged",
        damaged_checkpoint,
    ),
    # ------------------------------------------------------------------ data
    Case("missing data file", train("data.path={tmp}/missing.jsonl"), "does not exist"),
    Case(
        "malformed JSONL",
        train("data.path={tmp}/bad.jsonl"),
        "bad.jsonl:2: malformed JSON line",
        lambda t: (t / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{oops}\n') and None,
    ),
    Case(
        "missing alpaca field",
        train("data.path={tmp}/d.jsonl"),
        "needs the field 'instruction'",
        lambda t: (t / "d.jsonl").write_text('{"question": "a", "answer": "b"}\n') and None,
    ),
    Case(
        "empty data file",
        train("data.path={tmp}/e.jsonl"),
        "holds no rows",
        lambda t: (t / "e.jsonl").write_text("\n") and None,
    ),
    Case(
        "no assistant turn",
        train("data.path={tmp}/c.jsonl", "data.format=messages"),
        "has no assistant turn",
        lambda t: (
            (t / "c.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
            and None
        ),
    ),
    Case(
        "too little data",
        train("data.limit=4"),
        "fewer than one global batch",
        keeps="run/.cache",  # the rows are counted once tokenised: the cache stays for the fixed rerun
    ),
    Case(
        "unsupported file type",
        train("data.path={tmp}/d.csv"),
        "unsupported file type",
        lambda t: (t / "d.csv").write_text("a,b\n") and None,
    ),
    # ------------------------------------------------------------------ data mixtures
    Case(
        "data.path and data.mixture",
        plan(mixture(f"{{path: {CHAT}, format: messages}}")),
        "data.path: is set ('data/alpaca_demo.jsonl') together with data.mixture",
    ),
    Case("empty mixture", plan("data.path=", "data.mixture=[]"), "data.mixture: is an empty list"),
    Case(
        "mixture weight 0",
        plan("data.path=", mixture(f"{{path: {DATA}}}", f"{{path: {CHAT}, weight: 0}}")),
        "data.mixture[1].weight: must be a number > 0, got 0.0",
    ),
    Case(
        "negative mixture weight",
        plan("data.path=", mixture(f"{{path: {DATA}, weight: -2}}")),
        "data.mixture[0].weight: must be a number > 0",
    ),
    Case(
        "mixture weight not a number",
        plan("data.path=", mixture(f"{{path: {DATA}, weight: lots}}")),
        "data.mixture[0].weight: expected float",
    ),
    Case(
        "mixture weight that gives a source no samples",
        plan("data.path=", mixture(f"{{path: {DATA}}}", f"{{path: {CHAT}, format: messages, weight: 1e-9}}")),
        "data.mixture[1].weight=1e-09 gives",
    ),
    Case(
        "mixture weights beyond a float",
        plan(
            "data.path=",
            mixture(f"{{path: {DATA}, weight: 1e308}}", f"{{path: {CHAT}, format: messages, weight: 1e308}}"),
        ),
        "data.mixture: the weights add up to inf",
    ),
    Case(
        "mixture limit 0",
        plan("data.path=", mixture(f"{{path: {DATA}, limit: 0}}")),
        "data.mixture[0].limit: must be > 0, got 0",
    ),
    Case(
        "mixture key typo",
        mixture_yaml(f"  mixture:\n    - path: {DATA}\n      wieght: 2\n"),
        "unknown recipe key 'data.mixture[0].wieght' — did you mean data.mixture[0].weight?",
    ),
    Case(
        "mixture source without a path",
        mixture_yaml("  mixture:\n    - weight: 2\n"),
        "missing required recipe key(s): data.mixture[0].path",
    ),
    Case(
        "mixture as a string",
        mixture_yaml(f"  mixture: {DATA}\n"),
        "data.mixture: expected list of mapping of path, format, weight, limit",
    ),
    Case(
        "data.limit with a mixture",
        plan(*MIXTURE, "data.limit=10"),
        "data.limit: is set together with data.mixture",
    ),
    Case(
        "output_dir holds a mixture source",
        train(
            "data.path=", mixture(f"{{path: {DATA}}}", "{path: {tmp}/data/train.jsonl}"), "output_dir={tmp}"
        ),
        "holds data.mixture[1].path=",
        data_dir_with_run_inside,
    ),
    Case(
        "mixture weights changed on resume",
        train(
            "parallel.strategy=single",
            "batch.padding_free=false",
            "data.path=",
            mixture(f"{{path: {DATA}, weight: 3}}", f"{{path: {CHAT}, format: messages}}"),
        ),
        "data.mixture: [{'path':",
        mixture_checkpoint,
    ),
    Case(
        "a mixture source changed under a run",
        train("parallel.strategy=single", "batch.padding_free=false", *MIXTURE),
        "the data changed since checkpoint-2 was written: data.mixture[0].path=",
        lambda t: checkpoint(t, sets=MIXTURE, data_fingerprint="0000000000000000") and None,
    ),
    # ------------------------------------------------------------------ tunefleet slurm
    Case("--nodes 0", lambda t: [*slurm()(t)[:2], "--nodes", "0", *slurm()(t)[4:]], "nodes: must be >= 1"),
    Case("--procs-per-node 0", slurm("--procs-per-node", "0"), "procs_per_node: must be >= 1"),
    Case("--time 0", lambda t: [a if a != "00:30:00" else "0" for a in slurm()(t)], "time: '0' is zero"),
    Case(
        "--time garbage",
        lambda t: [a if a != "00:30:00" else "soon" for a in slurm()(t)],
        "is not a SLURM time limit",
    ),
    Case(
        "--extra-sbatch=--output",
        slurm("--extra-sbatch=--output=x.log"),
        "the job log is <output_dir>/slurm-%j.out",
    ),
    Case("--extra-sbatch=--nodes", slurm("--extra-sbatch=--nodes=3"), "use tunefleet slurm's --nodes option"),
    Case("secret in --env", slurm("--env", "HF_TOKEN=hf_abc"), "is a secret"),
    Case(
        "secret in --env-setup",
        slurm("--env-setup", "export WANDB_API_KEY=abc123"),
        "looks like it writes a secret",
    ),
    Case("partition with a space", slurm("--partition", "a b"), "cannot be written on an #SBATCH line"),
    Case("--mem bogus", slurm("--mem", "lots"), "mem: 'lots' cannot be written"),
    Case("--job-name with a space", slurm("--job-name", "my job"), "job_name: 'my job' cannot be written"),
    Case("--out is a directory", slurm("--out", "{tmp}"), "which is a directory"),
    Case(
        "--out is someone's file",
        slurm("--out", "{tmp}/job.sh"),
        "was not written by tunefleet",
        existing_script,
    ),
    Case("--out is the recipe", lambda t: [*slurm("--out", str(DEMO))(t)], "is an input of this run"),
    Case("--env not NAME=VALUE", slurm("--env", "JUSTNAME"), "is not NAME=VALUE"),
    Case(
        "single on 2 nodes",
        slurm("--nodes", "2", sets=("parallel.strategy=single",)),
        "`single` runs one process",
    ),
    # ------------------------------------------------------------------ plan, status, merge, generate
    Case(
        "plan --model-config missing",
        lambda t: ["plan", str(DEMO), "--model-config", str(t / "nope.json")],
        "does not exist",
    ),
    Case(
        "plan --gpu-memory-gib -4",
        lambda t: ["plan", str(DEMO), "--gpu-memory-gib", "-4"],
        "--gpu-memory-gib must be > 0",
    ),
    Case("plan --nodes 0", lambda t: ["plan", str(DEMO), "--nodes", "0"], "--nodes must be >= 1"),
    Case(
        "status of a directory that is not a run",
        lambda t: ["status", str(t / "somedir")],
        "is not a tunefleet run",
        not_a_run,
    ),
    Case("status of a missing directory", lambda t: ["status", str(t / "nope")], "is not a directory"),
    Case(
        "merge into a non-empty directory",
        lambda t: ["merge", str(t), "--out", str(t / "merged")],
        "already exists and is not empty",
        nonempty_merge_out,
    ),
    Case(
        "merge --max-shard-size lots",
        lambda t: ["merge", str(t), "--out", str(t / "m"), "--max-shard-size", "lots"],
        "--max-shard-size 'lots' is not a size",
    ),
    Case(
        "output_dir a dangling symbolic link",
        train("output_dir={tmp}/gone"),
        "is a symbolic link to",
        lambda t: (t / "gone").symlink_to(t / "not-mounted" / "run"),
    ),
    Case(
        "a half-downloaded model",
        train("model.name_or_path={tmp}/model"),
        "model.safetensors holds ",
        lambda t: _half_downloaded_model(t / "model"),
    ),
    Case(
        "merge of a directory that is not a run",
        lambda t: ["merge", str(t / "somedir"), "--out", str(t / "m")],
        "is neither a run directory",
        not_a_run,
    ),
    Case("generate without prompts", lambda t: ["generate", str(t)], "no prompts given"),
    Case(
        "generate --batch-size 0",
        lambda t: ["generate", str(t), "--prompt", "hi", "--batch-size", "0"],
        "--batch-size and --max-new-tokens must be >= 1",
    ),
    Case(
        "generate on a non-run",
        lambda t: ["generate", str(t / "somedir"), "--prompt", "hi"],
        "is neither a run directory",
        not_a_run,
    ),
]


def _expand(argv: list[str], tmp: Path) -> list[str]:
    return [a.replace("{tmp}", str(tmp)) for a in argv]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else b""
        for p in sorted(root.rglob("*"))
        if "__pycache__" not in p.parts
    }


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_bad_input_gives_one_clear_error(
    case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if case.setup is not None:
        case.setup(tmp_path)
    argv = _expand(case.argv(tmp_path), tmp_path)
    before = _snapshot(tmp_path)
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}, expected 2 (a refusal); stderr:\n{err}"
    assert err.startswith("error: ") and case.expect in err, err
    assert "\n  fix: " in err, f"no fix named:\n{err}"
    assert "Traceback" not in err
    after = _snapshot(tmp_path)
    if case.keeps is not None:
        after = {
            k: v
            for k, v in after.items()
            if k not in ("run", case.keeps) and not k.startswith(f"{case.keeps}/")
        }
    assert after == before, "a refused command changed the files"


def test_the_catalogue_counts() -> None:
    """How many inputs the catalogue tries (reported in the issue's closing note)."""
    ids = [c.id for c in CATALOGUE]
    assert len(ids) == len(set(ids)) and len(ids) >= 90


def test_target_module_typo_is_refused_with_the_model_s_names(tiny_model_dir: Path) -> None:
    """`[q_projj, v_proj]` used to train only v_proj (PEFT ignores a name that matches nothing when
    another matches); every listed name must match, the model's linear names are listed."""
    from transformers import AutoModelForCausalLM

    from tunefleet.launch.core.errors import RecipeError
    from tunefleet.launch.core.recipe import PeftConfig
    from tunefleet.launch.params import check_module_names

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    check_module_names(
        model, PeftConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens"])
    )
    with pytest.raises(RecipeError, match="'q_projj' matches no module") as err:
        check_module_names(model, PeftConfig(target_modules=["q_projj", "v_proj"]))
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in str(err.value)
    with pytest.raises(RecipeError, match="peft.modules_to_save: 'embed_token' matches no module"):
        check_module_names(model, PeftConfig(modules_to_save=["embed_token"]))


def test_unwritable_output_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """output_dir on a read-only filesystem (root may write anywhere else): refused before anything
    starts, for a new run below it and for the directory itself."""
    readonly = tmp_path / "ro"
    readonly.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only filesystem here: {mounted.stderr.decode().strip()}")
    try:
        for out in (readonly, readonly / "run"):
            code = cli.main(["launch", str(DEMO), "--nproc", "1", "--dry-run", "--set", f"output_dir={out}"])
            err = capsys.readouterr().err
            assert code == 2 and "is not writable by this user" in err and "\n  fix: " in err, err
    finally:
        subprocess.run(["umount", str(readonly)], check=True)
