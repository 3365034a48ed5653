"""Accelerate/DeepSpeed templates, the compatibility matrix and the launch command.

Golden files pin every template (tests/golden/launch); regenerate them with
`UPDATE_GOLDEN=1 pytest tests/test_templates.py` and review the diff. Each rendered file is
also fed to accelerate's own launcher code (config loader, argument validation, the env its
launchers build, the FSDP/DeepSpeed plugins) and to DeepSpeed's own config class. The slow
test launches real ranks on this CPU with the argv/env the command builder produces.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tunefleet.launch import compat
from tunefleet.launch.command import build_launch_command, format_command, run_command
from tunefleet.launch.core import recipe as recipe_mod
from tunefleet.launch.core.errors import RecipeError, TunefleetError
from tunefleet.launch.core.hardware import Hardware
from tunefleet.launch.core.recipe import Recipe
from tunefleet.launch.templates import (
    ACCELERATE_FILE,
    DEEPSPEED_FILE,
    activation_checkpointing,
    expected_distributed_type,
    render_accelerate_config,
    render_deepspeed_config,
    render_files,
)

GOLDEN = Path(__file__).parent / "golden" / "launch"
FIXTURES = Path(__file__).parent / "fixtures" / "model_configs"
UPDATE = bool(os.environ.get("UPDATE_GOLDEN"))


def make_recipe(**sections: dict[str, Any]) -> Recipe:
    raw: dict[str, Any] = {
        "output_dir": "runs/golden",
        "model": {"name_or_path": "Qwen/Qwen3-14B"},
        "data": {"path": "data/train.jsonl"},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return recipe_mod.from_dict(raw)


GPU1 = Hardware()
GPU4 = Hardware(num_processes=4)
CPU2 = Hardware(num_processes=2, use_cpu=True)
QLORA = {"quantization": "nf4"}
GC = {"gradient_checkpointing": True, "precision": "bf16"}

CASES: dict[str, tuple[Recipe, Hardware]] = {
    "single": (make_recipe(train={"precision": "bf16"}), Hardware()),
    "single-cpu": (make_recipe(), Hardware(use_cpu=True)),
    "ddp": (make_recipe(parallel={"strategy": "ddp"}, train=GC), GPU4),
    "ddp-cpu": (make_recipe(parallel={"strategy": "ddp"}), CPU2),
    "fsdp2": (make_recipe(parallel={"strategy": "fsdp"}, train=GC), GPU4),
    "fsdp1": (
        make_recipe(
            parallel={
                "strategy": "fsdp",
                "fsdp_version": 1,
                "state_dict": "full",
                "fsdp_wrap_classes": ["Qwen3DecoderLayer"],
            },
            train=GC,
        ),
        GPU4,
    ),
    "fsdp2-offload": (make_recipe(parallel={"strategy": "fsdp", "offload": "optimizer+params"}), GPU4),
    "fsdp-qlora": (
        make_recipe(model=QLORA, parallel={"strategy": "fsdp-qlora"}, train=GC),
        Hardware(num_processes=2),
    ),
    "fsdp-qlora-1gpu": (
        make_recipe(model=QLORA, parallel={"strategy": "fsdp-qlora", "offload": "optimizer+params"}),
        Hardware(),
    ),
    "zero2": (make_recipe(parallel={"strategy": "deepspeed-zero2"}, train=GC), GPU4),
    "zero2-cpu": (make_recipe(parallel={"strategy": "deepspeed-zero2"}), CPU2),
    "zero3": (make_recipe(parallel={"strategy": "deepspeed-zero3"}, train=GC), GPU4),
    "zero3-offload": (
        make_recipe(parallel={"strategy": "deepspeed-zero3", "offload": "optimizer+params"}),
        GPU4,
    ),
    "zero3-window": (
        make_recipe(
            parallel={
                "strategy": "deepspeed-zero3",
                "zero3_gathered_params": 1e8,
                "zero3_sub_group_size": 1e8,
            },
            train=GC,
        ),
        GPU4,
    ),
    "zero3-qlora-cpu": (make_recipe(model=QLORA, parallel={"strategy": "deepspeed-zero3"}), CPU2),
    # FSDP2 on CPU runs through distributed/cpu_fsdp.py (tests/test_launch.py trains with these)
    "fsdp2-cpu": (make_recipe(parallel={"strategy": "fsdp"}), CPU2),
    "fsdp-qlora-cpu": (make_recipe(model=QLORA, parallel={"strategy": "fsdp-qlora"}), CPU2),
    "zero3-2node": (
        make_recipe(parallel={"strategy": "deepspeed-zero3"}, train=GC),
        Hardware(
            num_processes=16,
            num_machines=2,
            machine_rank=1,
            main_process_ip="10.0.0.1",
            main_process_port=29400,
        ),
    ),
}


def resolved(name: str) -> tuple[Recipe, Hardware, list[str]]:
    recipe, hw = CASES[name]
    out, notes = compat.resolve_with_notes(recipe, hw)
    return out, hw, notes


def check_golden(filename: str, text: str) -> None:
    path = GOLDEN / filename
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"missing golden file {path}: run UPDATE_GOLDEN=1 pytest tests/test_templates.py"
    assert text == path.read_text(), (
        f"{path} differs: review the change, then regenerate with UPDATE_GOLDEN=1"
    )


def write_configs(name: str, directory: Path) -> dict[str, str]:
    recipe, hw, _ = resolved(name)
    paths = {}
    for filename, text in render_files(recipe, hw, str(directory)).items():
        (directory / filename).write_text(text)
        paths[filename] = str(directory / filename)
    return paths


# ----------------------------------------------------------------------------- golden files


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str) -> None:
    recipe, hw, notes = resolved(name)
    files = render_files(recipe, hw, "/run/configs")
    check_golden(f"{name}.accelerate.yaml", files[ACCELERATE_FILE])
    if DEEPSPEED_FILE in files:
        check_golden(f"{name}.deepspeed.json", files[DEEPSPEED_FILE])
    paths = {f: f"/run/configs/{f}" for f in files}
    argv, env = build_launch_command(
        "/run/recipe.yaml", paths, hw, ["train.max_steps=10"], recipe=recipe, python="python"
    )
    summary = "".join(f"# note: {n}\n" for n in notes) + format_command(argv, env) + "\n"
    check_golden(f"{name}.command.txt", summary)


def test_no_stray_golden_files() -> None:
    expected = {f"{n}.{suffix}" for n in CASES for suffix in ("accelerate.yaml", "command.txt")}
    expected |= {f"{n}.deepspeed.json" for n in CASES if render_deepspeed_config(*resolved(n)[:2])}
    found = {p.name for p in GOLDEN.iterdir()} if GOLDEN.exists() else set()
    assert found == expected, f"stray: {sorted(found - expected)}, missing: {sorted(expected - found)}"


def test_batch_keys_are_auto() -> None:
    for name in CASES:
        ds = render_deepspeed_config(*resolved(name)[:2])
        if ds is None:
            continue
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
            assert ds[key] == "auto", (name, key)
        acc = render_accelerate_config(*resolved(name)[:2])
        assert "mixed_precision" not in acc  # accelerate refuses it next to a DeepSpeed file


# ----------------------------------------------------------------------------- accelerate accepts


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _patch_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for key, value in env.items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)


@pytest.mark.parametrize("name", sorted(CASES))
def test_accelerate_accepts(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """accelerate's loader, its launch-argument validation, the env its launcher builds and the
    plugin that reads that env all accept the file, with the values we meant."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    recipe, hw, _ = resolved(name)
    paths = write_configs(name, tmp_path)
    config = load_config_from_file(paths[ACCELERATE_FILE])
    assert isinstance(config, ClusterConfig)
    assert config.num_processes == hw.num_processes and config.num_machines == hw.num_machines

    # Unknown keys inside fsdp_config / deepspeed_config are copied onto the launch arguments
    # without a check; make sure each one is a real launch argument.
    parser = launch_command_parser()
    known = {action.dest for action in parser._actions}
    for key in config.fsdp_config:
        assert key in known, f"{key} is not an accelerate launch argument"
    for key in config.deepspeed_config:
        assert key in known, f"{key} is not an accelerate launch argument"

    args = parser.parse_args(["--config_file", paths[ACCELERATE_FILE], "train.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    assert int(args.num_processes) == hw.num_processes
    kind = config.distributed_type.value
    if kind == "FSDP":
        assert args.use_fsdp and not args.multi_gpu
        launch_env = prepare_multi_gpu_env(args)
        _patch_env(monkeypatch, launch_env)
        par = recipe.parallel
        efficient = hw.num_processes > 1  # rank 0 reads the weights, the others get them by broadcast
        assert launch_env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == str(efficient).lower()
        if par.fsdp_version == 1 and not _has_cuda():
            # FSDP1's plugin looks a GPU up for sync_module_states (which RAM-efficient loading turns
            # on); without one it refuses, in words that change between accelerate releases. What
            # reaches it is checked above; the rest of the plugin is built without that lookup.
            # tunefleet's own refusal of FSDP1 on CPU: test_fsdp1_on_cpu_is_refused_before_training.
            assert launch_env["FSDP_SYNC_MODULE_STATES"] == "true"
            monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")
            monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
            efficient = False
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == par.fsdp_version
        assert plugin.state_dict_type.name == (
            "FULL_STATE_DICT" if par.state_dict == "full" else "SHARDED_STATE_DICT"
        )
        assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
        assert plugin.cpu_ram_efficient_loading == efficient
        assert plugin.activation_checkpointing == (activation_checkpointing(recipe).where == "fsdp")
        if par.fsdp_version == 1:
            assert plugin.use_orig_params is False
        offloaded = (
            type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy"
            if par.fsdp_version == 2
            else plugin.cpu_offload.offload_params
        )
        assert offloaded == (par.offload == "optimizer+params")
    elif kind == "DEEPSPEED":
        assert args.use_deepspeed and not args.multi_gpu
        # as accelerate's launch_command does before its DeepSpeed launcher
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
        _patch_env(monkeypatch, env)
        plugin = DeepSpeedPlugin()  # raises on accelerate-side DeepSpeed keys next to the JSON file
        assert plugin.zero_stage == (3 if recipe.parallel.strategy == "deepspeed-zero3" else 2)
        assert plugin.deepspeed_config["train_batch_size"] == "auto"
    elif kind == "MULTI_GPU":
        assert args.multi_gpu and recipe.parallel.strategy == "ddp"
        prepare_multi_gpu_env(args)
    else:
        assert kind == "NO" and recipe.parallel.strategy == "single"
        _, env = prepare_simple_launcher_cmd_env(args)
        assert env["ACCELERATE_USE_CPU"] == str(hw.use_cpu)


# ----------------------------------------------------------------------------- DeepSpeed accepts


@pytest.mark.parametrize("name", sorted(n for n in CASES if render_deepspeed_config(*resolved(n)[:2])))
def test_deepspeed_accepts(name: str, tmp_path: Path) -> None:
    """Fill the "auto" keys as the HF trainer does, then let DeepSpeed's own config class parse
    it (without a process group DeepSpeed takes world size 1)."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    recipe, hw, _ = resolved(name)
    ds = render_deepspeed_config(recipe, hw)
    assert ds is not None
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=3,
        max_grad_norm=recipe.train.max_grad_norm,
        use_cpu=True,
        bf16=recipe.train.precision == "bf16",
        report_to=[],
    )
    hf = HfTrainerDeepSpeedConfig(copy.deepcopy(ds))
    hf.trainer_config_process(args)

    class Model:  # what trainer_config_finalize reads of the model: its hidden size
        class config:
            hidden_size = 1024

    hf.trainer_config_finalize(args, Model(), num_training_steps=10)
    assert "auto" not in json.dumps(hf.config), "a key the HF trainer does not fill was left to auto"
    assert hf.config["zero_optimization"]["reduce_bucket_size"] == 1024 * 1024  # not DeepSpeed's 5e8
    config = DeepSpeedConfig(hf.config)
    assert config.world_size == 1 and config.train_batch_size == 2 * 3
    stage = 3 if recipe.parallel.strategy == "deepspeed-zero3" else 2
    assert config.zero_optimization_stage == stage
    assert config.bfloat16_config.enabled == (recipe.train.precision == "bf16")
    zero = config.zero_config
    assert (zero.offload_optimizer is not None) == (recipe.parallel.offload != "none")
    assert (zero.offload_param is not None) == (recipe.parallel.offload == "optimizer+params")
    if stage == 3:
        assert zero.gather_16bit_weights_on_model_save is False
        # on CPU every parameter is partitioned, so the tiny model's runs gather as a big one's do
        assert zero.param_persistence_threshold == (0 if hw.use_cpu else 10 * 1024)
        assert zero.prefetch_bucket_size == int(0.9 * 1024 * 1024)


# ----------------------------------------------------------------------------- compat matrix

GPT_OSS = json.loads((FIXTURES / "gpt-oss-20b" / "config.json").read_text())
QWEN3 = json.loads((FIXTURES / "qwen3-14b" / "config.json").read_text())

REJECTED: list[tuple[str, dict[str, Any], Hardware, dict | None, str]] = [
    ("single-many", dict(parallel={"strategy": "single"}), GPU4, None, "`single` runs one process"),
    ("fsdp1-on-cpu", dict(parallel={"strategy": "fsdp", "fsdp_version": 1}), CPU2, None, "FSDP1 needs GPUs"),
    (
        "fsdp-qlora1-on-cpu",
        dict(model=QLORA, parallel={"strategy": "fsdp-qlora", "fsdp_version": 1}),
        CPU2,
        None,
        "needs GPUs",
    ),
    (
        "gpt-oss-bnb-config",
        dict(model={"name_or_path": "/models/oss", "quantization": "nf4"}),
        GPU1,
        GPT_OSS,
        "ships MXFP4 weights",
    ),
    (
        "gpt-oss-bnb-name",
        dict(model={"name_or_path": "openai/gpt-oss-20b", "quantization": "int8"}),
        GPU1,
        None,
        "ships MXFP4 weights",
    ),
    (
        "gptq-bnb",
        dict(model={"name_or_path": "TheBloke/Llama-2-7B-GPTQ", "quantization": "nf4"}),
        GPU1,
        None,
        "already GPTQ-quantized",
    ),
    (
        "gptq-fsdp",
        dict(model={"name_or_path": "TheBloke/Llama-2-7B-GPTQ"}, parallel={"strategy": "fsdp"}),
        GPU4,
        None,
        "cannot shard a pre-quantized GPTQ model",
    ),
    (
        "awq-fsdp-config",
        dict(model={"name_or_path": "/models/x"}, parallel={"strategy": "fsdp"}),
        GPU4,
        {"quantization_config": {"quant_method": "awq"}},
        "pre-quantized AWQ",
    ),
    (
        "mxfp4-not-dequantized",
        dict(
            model={"name_or_path": "openai/gpt-oss-20b", "quantization": "mxfp4", "mxfp4_dequantize": False}
        ),
        GPU1,
        None,
        "dequantized",
    ),
    (
        "fsdp-with-4bit",
        dict(model=QLORA, parallel={"strategy": "fsdp"}),
        GPU4,
        None,
        "use parallel.strategy=fsdp-qlora",
    ),
    (
        "fsdp-qlora-unquantized",
        dict(parallel={"strategy": "fsdp-qlora"}),
        GPU4,
        None,
        "shards a bitsandbytes 4-bit",
    ),
    ("fsdp-int8", dict(model={"quantization": "int8"}, parallel={"strategy": "fsdp"}), GPU4, None, "int8"),
    (
        "fsdp-qlora-paged-8bit",
        dict(model=QLORA, parallel={"strategy": "fsdp-qlora"}, train={"optimizer": "paged_adamw_8bit"}),
        GPU4,
        None,
        "paged_adamw_8bit fails",
    ),
    (
        "qdora-zero3",
        dict(model=QLORA, peft={"method": "dora"}, parallel={"strategy": "deepspeed-zero3"}),
        GPU4,
        None,
        "ds_status",
    ),
    (
        "offload-sgd",
        dict(train={"optimizer": "sgd"}, parallel={"strategy": "deepspeed-zero2", "offload": "optimizer"}),
        GPU4,
        None,
        "DeepSpeed's CPU Adam",
    ),
    (
        "qlora-storage-mismatch",
        dict(
            model={"quantization": "nf4", "quant_storage_dtype": "uint8"},
            parallel={"strategy": "fsdp-qlora"},
            train={"precision": "bf16"},
        ),
        GPU4,
        None,
        "set automatically",
    ),
    (
        "qlora-dtype-mismatch",
        dict(
            model={"quantization": "nf4", "dtype": "float32"},
            parallel={"strategy": "fsdp-qlora"},
            train={"precision": "bf16"},
        ),
        GPU4,
        None,
        "model dtype equal to the mixed-precision dtype bfloat16",
    ),
]


@pytest.mark.parametrize("case", REJECTED, ids=[c[0] for c in REJECTED])
def test_compat_rejects(case: tuple) -> None:
    _, sections, hw, model_config, expected = case
    recipe = make_recipe(**sections)
    with pytest.raises(RecipeError) as info:
        compat.check_compat(recipe, hw, model_config)
    message = str(info.value)
    assert expected in message
    assert "\n  fix: " in message and info.value.fix  # one readable problem line and one fix line


ALLOWED: list[tuple[str, dict[str, Any], Hardware]] = [
    # FSDP2 on CPU through distributed/cpu_fsdp.py: trains sharded, losses equal one process (test_launch.py)
    ("fsdp2-on-cpu", dict(parallel={"strategy": "fsdp"}), CPU2),
    ("fsdp-qlora-on-cpu", dict(model=QLORA, parallel={"strategy": "fsdp-qlora"}), CPU2),
    # measured on this CPU: trains, shards the 4-bit weights, losses equal DDP
    ("qlora-zero3", dict(model=QLORA, parallel={"strategy": "deepspeed-zero3"}), CPU2),
    ("int8-zero3", dict(model={"quantization": "int8"}, parallel={"strategy": "deepspeed-zero3"}), CPU2),
    ("dora-zero3", dict(peft={"method": "dora"}, parallel={"strategy": "deepspeed-zero3"}), CPU2),
    (
        "qdora-zero2",
        dict(model=QLORA, peft={"method": "dora"}, parallel={"strategy": "deepspeed-zero2"}),
        CPU2,
    ),
    (
        "zero3-offload-cpu",
        dict(parallel={"strategy": "deepspeed-zero3", "offload": "optimizer+params"}),
        CPU2,
    ),
    (
        "qlora-zero3-uint8",
        dict(model={**QLORA, "quant_storage_dtype": "uint8"}, parallel={"strategy": "deepspeed-zero3"}),
        CPU2,
    ),
    # per the PEFT FSDP guide (GPU only, not runnable here)
    ("qdora-fsdp", dict(model=QLORA, peft={"method": "dora"}, parallel={"strategy": "fsdp-qlora"}), GPU4),
    (
        "gptq-ddp",
        dict(model={"name_or_path": "TheBloke/Llama-2-7B-GPTQ"}, parallel={"strategy": "ddp"}),
        GPU4,
    ),
    ("qwen3-config-nf4", dict(model={"name_or_path": "/models/qwen3", "quantization": "nf4"}), Hardware()),
    (
        "mxfp4-dequantized-fsdp",
        dict(
            model={"name_or_path": "openai/gpt-oss-20b", "quantization": "mxfp4"},
            parallel={"strategy": "fsdp"},
        ),
        GPU4,
    ),
]


@pytest.mark.parametrize("case", ALLOWED, ids=[c[0] for c in ALLOWED])
def test_compat_allows(case: tuple) -> None:
    _, sections, hw = case
    recipe = make_recipe(**sections)
    model_config = QWEN3 if recipe.model.name_or_path == "/models/qwen3" else None
    out = compat.resolve(recipe, hw, model_config)
    assert compat.resolve(out, hw, model_config) == out  # idempotent


def test_quant_storage_set_with_a_note() -> None:
    recipe = make_recipe(model=QLORA, parallel={"strategy": "fsdp-qlora"})  # precision auto, dtype auto
    out, notes = compat.resolve_with_notes(recipe, Hardware(num_processes=2))
    assert out.model.quant_storage_dtype == out.model.dtype == "bfloat16" and out.train.precision == "bf16"
    assert any("quant_storage_dtype=bfloat16" in n for n in notes)
    assert any("train.precision: auto -> bf16" in n for n in notes)
    assert recipe.model.quant_storage_dtype is None  # the input is not modified
    # on CPU auto means fp32, and ZeRO-3 follows the same rule
    cpu = make_recipe(model=QLORA, parallel={"strategy": "deepspeed-zero3"})
    out = compat.resolve(cpu, CPU2)
    assert (out.train.precision, out.model.dtype, out.model.quant_storage_dtype) == (
        "fp32",
        "float32",
        "float32",
    )
    # an explicit, matching value is kept without a note about it
    explicit = make_recipe(
        model={**QLORA, "quant_storage_dtype": "bfloat16", "dtype": "bfloat16"},
        parallel={"strategy": "fsdp-qlora"},
        train={"precision": "bf16"},
        batch={"padding_free": False},
    )
    assert compat.check_compat(explicit, GPU4) == []


def test_ddp_on_one_process_becomes_single() -> None:
    out, notes = compat.resolve_with_notes(make_recipe(parallel={"strategy": "ddp"}), Hardware())
    assert out.parallel.strategy == "single" and "runs as `single`" in notes[0]


def test_offload_notes_the_optimizer_swap() -> None:
    notes = compat.check_compat(
        make_recipe(parallel={"strategy": "deepspeed-zero3", "offload": "optimizer"}), GPU4
    )
    assert any("DeepSpeedCPUAdam" in n for n in notes)


@pytest.mark.parametrize(
    ("parallel", "expected"),
    [
        ({"strategy": "ddp", "fsdp_version": 1}, "only the fsdp strategies read it"),
        ({"strategy": "ddp", "fsdp_wrap_classes": ["LlamaDecoderLayer"]}, "only the fsdp strategies read it"),
        ({"strategy": "deepspeed-zero3", "state_dict": "full"}, "only the fsdp strategies read it"),
        ({"strategy": "fsdp", "fsdp_wrap_classes": []}, "is empty"),
        ({"strategy": "ddp", "offload": "optimizer"}, "needs a sharding strategy"),
        ({"strategy": "deepspeed-zero2", "offload": "optimizer+params"}, "cannot offload them"),
        ({"strategy": "fsdp", "offload": "optimizer"}, "cannot offload the optimizer alone"),
        ({"strategy": "fsdp", "fsdp_version": 3}, "is not one of 1, 2"),
        ({"strategy": "fsdp", "state_dict": "ful"}, "did you mean 'full'"),
    ],
)
def test_parallel_validation(parallel: dict[str, Any], expected: str) -> None:
    with pytest.raises(RecipeError, match=expected):
        make_recipe(parallel=parallel)


def test_model_quant_method() -> None:
    assert compat.model_quant_method(make_recipe(model={"name_or_path": "x/hawq-model"})) is None
    assert compat.model_quant_method(make_recipe(model={"name_or_path": "x/Qwen-7B-AWQ"})) == "awq"
    assert compat.model_quant_method(make_recipe(model={"name_or_path": "/m"}), GPT_OSS) == "mxfp4"
    # a config without quantization_config wins over a misleading name
    assert compat.model_quant_method(make_recipe(model={"name_or_path": "x/y-gptq"}), QWEN3) is None


def test_checkpointing_plan() -> None:
    assert activation_checkpointing(make_recipe()).where == "off"
    fsdp = activation_checkpointing(make_recipe(parallel={"strategy": "fsdp"}, train=GC))
    assert (fsdp.where, fsdp.use_reentrant) == ("fsdp", None)
    qlora = activation_checkpointing(make_recipe(model=QLORA, parallel={"strategy": "fsdp-qlora"}, train=GC))
    assert (qlora.where, qlora.use_reentrant) == ("trainer", True)
    ddp = activation_checkpointing(make_recipe(parallel={"strategy": "ddp"}, train=GC))
    assert (ddp.where, ddp.use_reentrant) == ("trainer", False)


# ----------------------------------------------------------------------------- the command


def test_command_shape() -> None:
    recipe, hw, _ = resolved("ddp-cpu")
    argv, env = build_launch_command(
        "r.yaml", {ACCELERATE_FILE: "/c/a.yaml"}, hw, ["peft.r=8", "a b=c"], recipe=recipe, python="py"
    )
    assert argv[:7] == [
        "py",
        "-m",
        "tunefleet.distributed.relay",
        "accelerate",
        "launch",
        "--config_file",
        "/c/a.yaml",
    ]
    assert argv[7:10] == ["--multi_gpu", "--num_processes", "2"]
    assert argv[10:] == [
        "-m",
        "tunefleet.distributed.sft",
        "--recipe",
        "r.yaml",
        "--set",
        "peft.r=8",
        "--set",
        "a b=c",
    ]
    assert env["ACCELERATE_USE_CPU"] == "true" and env["TUNEFLEET_DISTRIBUTED_TYPE"] == "MULTI_CPU"
    line = format_command(argv, env)
    import shlex

    assert shlex.split(line)[-len(argv) :] == argv
    # DeepSpeed on CPU: the DeepSpeed launcher starts the ranks; --multi_gpu would override it
    recipe, hw, _ = resolved("zero2-cpu")
    argv, env = build_launch_command("r.yaml", {ACCELERATE_FILE: "/c/a.yaml"}, hw, recipe=recipe)
    assert "--multi_gpu" not in argv and env["TUNEFLEET_DISTRIBUTED_TYPE"] == "DEEPSPEED"
    assert "ACCELERATE_USE_CPU" not in env  # it would make accelerate skip DeepSpeed (measured)
    recipe, hw, _ = resolved("fsdp2")
    _, env = build_launch_command("r.yaml", {ACCELERATE_FILE: "/c/a.yaml"}, hw, recipe=recipe)
    assert "ACCELERATE_USE_CPU" not in env and env["TUNEFLEET_DISTRIBUTED_TYPE"] == "FSDP"
    with pytest.raises(TunefleetError, match="accelerate.yaml"):
        build_launch_command("r.yaml", {}, hw, recipe=recipe)


def test_expected_distributed_type() -> None:
    assert expected_distributed_type(make_recipe(), Hardware()) == "NO"
    assert expected_distributed_type(make_recipe(parallel={"strategy": "ddp"}), GPU4) == "MULTI_GPU"
    assert (
        expected_distributed_type(make_recipe(parallel={"strategy": "deepspeed-zero3"}), CPU2) == "DEEPSPEED"
    )


def test_hardware_checks() -> None:
    with pytest.raises(TunefleetError, match="split evenly"):
        Hardware(num_processes=3, num_machines=2, main_process_ip="h")
    with pytest.raises(TunefleetError, match="main_process_ip"):
        Hardware(num_processes=2, num_machines=2)
    with pytest.raises(TunefleetError, match="machine_rank"):
        Hardware(num_processes=2, num_machines=2, machine_rank=2, main_process_ip="h")
    assert Hardware(num_processes=8, num_machines=2, main_process_ip="h").procs_per_machine == 4


def test_run_command_exit_codes() -> None:
    assert run_command([sys.executable, "-c", "import sys; sys.exit(7)"], {}) == 7
    assert run_command([sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"], {}) == 128 + 9
    assert (
        run_command([sys.executable, "-c", "import os, sys; sys.exit(os.environ['X'] != 'y')"], {"X": "y"})
        == 0
    )


RUNNER = """import json, sys
from tunefleet.launch.command import run_command
argv, env = json.load(open(sys.argv[1]))
sys.exit(run_command(argv, env))
"""

# A launcher stand-in: does not handle USR1 (its default action would kill it), starts a
# "rank" in a session of its own (as torchrun does) that handles USR1, and relays its code.
TREE = """import os, subprocess, sys
rank = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], start_new_session=True)
sys.exit(rank.wait())
"""
RANK = """import os, signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
(out / "ready").write_text(str(os.getpid()))
deadline = time.time() + 30
while not got and time.time() < deadline:
    time.sleep(0.02)
(out / "usr1").write_text(str(len(got)))
sys.exit(0 if got else 5)
"""


def _start_runner(tmp_path: Path, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps([argv, env]))
    return subprocess.Popen([sys.executable, "-c", RUNNER, str(spec)])


def _wait_for(paths: list[Path], runner: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while not all(p.exists() for p in paths):
        assert runner.poll() is None, f"the launch ended early with code {runner.returncode}"
        assert time.time() < deadline, f"timed out waiting for {[str(p) for p in paths if not p.exists()]}"
        time.sleep(0.1)


def test_run_command_forwards_signals(tmp_path: Path) -> None:
    runner = _start_runner(tmp_path, [sys.executable, "-c", TREE, RANK, str(tmp_path)], {})
    _wait_for([tmp_path / "ready"], runner, 20)
    runner.send_signal(signal.SIGUSR1)
    assert runner.wait(timeout=20) == 0  # the launcher stand-in survived, the rank handled it
    assert (tmp_path / "usr1").read_text() == "1"

    (tmp_path / "ready").unlink()
    sleeper = "import pathlib, sys, time; pathlib.Path(sys.argv[1]).write_text('x'); time.sleep(60)"
    runner = _start_runner(tmp_path, [sys.executable, "-c", sleeper, str(tmp_path / "ready")], {})
    _wait_for([tmp_path / "ready"], runner, 20)
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=20) == 128 + signal.SIGTERM


# ----------------------------------------------------------------------------- real CPU launch

PROBE = """import json, os, signal, sys, time
from pathlib import Path
import torch.distributed as dist
from accelerate import Accelerator, PartialState
# What the trainer does: TrainingArguments(use_cpu=True) builds PartialState(cpu=True), then
# Trainer builds Accelerator() with no cpu argument (AcceleratorState reads ACCELERATE_USE_CPU).
state = PartialState(cpu=os.environ["TUNEFLEET_USE_CPU"] == "1")
accelerator = Accelerator()
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
out = Path(os.environ["PROBE_OUT"])
info = {
    "rank": state.process_index, "world_size": state.num_processes,
    "dist_world_size": dist.get_world_size() if dist.is_initialized() else None,
    "backend": dist.get_backend() if dist.is_initialized() else None,
    "distributed_type": accelerator.state.distributed_type.value, "argv": sys.argv[1:],
    "use_deepspeed": os.environ.get("ACCELERATE_USE_DEEPSPEED"),
    "expected": os.environ.get("TUNEFLEET_DISTRIBUTED_TYPE"),
}
(out / f"rank{state.process_index}.json").write_text(json.dumps(info))
deadline = time.time() + 90
while not got and time.time() < deadline:
    time.sleep(0.05)
(out / f"usr1-{state.process_index}").write_text(str(len(got)))
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed-zero3"])
def test_cpu_launch_starts_n_ranks(strategy: str, tmp_path: Path) -> None:
    """The argv/env from build_launch_command, run by run_command, start N ranks on this CPU that
    form one world of size N; SIGUSR1 sent to the launcher reaches every rank."""
    n = 2
    hw = Hardware(num_processes=n, use_cpu=True, main_process_port=_free_port())
    recipe = compat.resolve(make_recipe(parallel={"strategy": strategy}), hw)
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    paths = {}
    for filename, text in render_files(recipe, hw, str(config_dir)).items():
        (config_dir / filename).write_text(text)
        paths[filename] = str(config_dir / filename)
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    out = tmp_path / "out"
    out.mkdir()
    argv, env = build_launch_command(
        "/run/recipe.yaml", paths, hw, ["train.max_steps=1"], recipe=recipe, script=str(probe)
    )
    runner = _start_runner(tmp_path, argv, {**env, "PROBE_OUT": str(out), "OMP_NUM_THREADS": "1"})
    try:
        _wait_for([out / f"rank{r}.json" for r in range(n)], runner, 150)
        runner.send_signal(signal.SIGUSR1)
        assert runner.wait(timeout=60) == 0
    finally:
        if runner.poll() is None:
            runner.kill()
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]
    assert sorted(r["rank"] for r in ranks) == list(range(n))
    for info in ranks:
        assert info["world_size"] == n and info["dist_world_size"] == n and info["backend"] == "gloo"
        # DEEPSPEED, not a silent MULTI_CPU: ACCELERATE_USE_CPU would make accelerate skip DeepSpeed
        assert info["distributed_type"] == info["expected"] == expected_distributed_type(recipe, hw)
        assert info["argv"] == ["--recipe", "/run/recipe.yaml", "--set", "train.max_steps=1"]
        assert info["use_deepspeed"] == ("true" if strategy.startswith("deepspeed") else None)
    assert [(out / f"usr1-{r}").read_text() for r in range(n)] == ["1"] * n
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"rank{r}.json" for r in range(n)] + [f"usr1-{r}" for r in range(n)]
    )


def test_fsdp1_on_cpu_is_refused_before_training(tmp_path: Path) -> None:
    """What tunefleet does with FSDP1 on CPU processes, in its own words: refused before anything
    is written or started (exit 2), with the reason and the fix; accelerate's wording is not read."""
    from importlib import resources

    out = tmp_path / "run"
    demo = Path(str(resources.files("tunefleet.recipes"))) / "demo.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "tunefleet.launch.cli", "launch", str(demo), "--nproc", "2",
         "--set", f"output_dir={out}", "--set", "parallel.strategy=fsdp", "--set", "parallel.fsdp_version=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "parallel.fsdp_version: fsdp with FSDP1 needs GPUs" in proc.stderr
    assert "fix: use parallel.fsdp_version=2 (runs on CPU), or run on GPUs" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_zero3_windows_reach_deepspeed_as_set_and_only_when_set() -> None:
    zero = render_deepspeed_config(*resolved("zero3-window")[:2])["zero_optimization"]  # type: ignore[index]
    assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == 100_000_000
    assert zero["sub_group_size"] == 100_000_000 and isinstance(zero["sub_group_size"], int)
    default = render_deepspeed_config(*resolved("zero3")[:2])["zero_optimization"]  # type: ignore[index]
    assert not {"stage3_max_live_parameters", "stage3_max_reuse_distance", "sub_group_size"} & set(default)
