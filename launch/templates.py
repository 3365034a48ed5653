"""Accelerate and DeepSpeed config files for a recipe on given hardware.

Pure and torch-free: `render_accelerate_config(recipe, hw)` and `render_deepspeed_config(recipe,
hw)` return plain dicts, `render_files` the file texts; nothing is written here. Pass the
recipe through `compat.resolve` first (the launcher does), so forbidden combinations never
reach a template.

One source for each number: batch sizes, gradient clipping and bf16/fp16 are left to the
training arguments built from the recipe (DeepSpeed keys are `"auto"`, and the accelerate file
carries no `mixed_precision`: accelerate refuses it next to a DeepSpeed file, and elsewhere the
trainer's bf16/fp16 flags override it). Every key a launcher default would otherwise fill
(accelerate defaults to FSDP1, use_orig_params and RAM-efficient loading) is written out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from tunefleet.launch.core.hardware import Hardware, strategy_for
from tunefleet.launch.core.recipe import Recipe

FSDP_STRATEGIES = ("fsdp", "fsdp-qlora")
ZERO_STAGE = {"deepspeed-zero2": 2, "deepspeed-zero3": 3}
ACCELERATE_FILE = "accelerate.yaml"
DEEPSPEED_FILE = "deepspeed.json"


@dataclass(frozen=True, kw_only=True)
class Checkpointing:
    """Where activation checkpointing (`train.gradient_checkpointing`) is implemented."""

    where: Literal["off", "trainer", "fsdp"]
    """`trainer`: the trainer's activation_checkpointing (HF gradient checkpointing);
    `fsdp`: accelerate wraps each FSDP unit (the trainer's switch must then stay off: it would
    add a redundant all-gather in backward)."""

    use_reentrant: bool | None
    """For `trainer`: the torch.utils.checkpoint mode. Reentrant for FSDP-QLoRA, as the PEFT /
    Answer.AI reference recipe runs it; non-reentrant (PyTorch's recommendation) elsewhere."""


def activation_checkpointing(recipe: Recipe) -> Checkpointing:
    """The one place that decides how `train.gradient_checkpointing` is carried out."""
    if not recipe.train.gradient_checkpointing:
        return Checkpointing(where="off", use_reentrant=None)
    strategy = recipe.parallel.strategy
    if strategy == "fsdp":
        return Checkpointing(where="fsdp", use_reentrant=None)
    return Checkpointing(where="trainer", use_reentrant=strategy == "fsdp-qlora")


def expected_distributed_type(recipe: Recipe, hw: Hardware) -> str:
    """The `accelerate.DistributedType` name every process must see once the trainer is built.

    The entrypoint compares it with `trainer.accelerator.state.distributed_type` (and
    `state.num_processes` with WORLD_SIZE): accelerate falls back without a word (FSDP on CPU
    becomes DDP; without cpu=True on CPU each rank trains alone, world size 1)."""
    strategy = strategy_for(recipe.parallel.strategy, hw.num_processes)
    if strategy == "single":
        return "NO"
    if strategy == "ddp":
        return "MULTI_CPU" if hw.use_cpu else "MULTI_GPU"
    if strategy in FSDP_STRATEGIES:
        return "FSDP"
    return "DEEPSPEED"


def _fsdp_config(recipe: Recipe, hw: Hardware) -> dict[str, Any]:
    par = recipe.parallel
    v1 = par.fsdp_version == 1
    # RAM-efficient loading: rank 0's weights are broadcast into the shards (only rank 0 reads
    # them: loading.rank0_loads_weights); accelerate's launcher refuses it without
    # sync_module_states. It does nothing for a 4-bit base (accelerate skips it with Params4bit).
    ram_efficient = hw.num_processes > 1
    cfg: dict[str, Any] = {
        "fsdp_version": par.fsdp_version,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    }
    if par.fsdp_wrap_classes:
        cfg["fsdp_transformer_layer_cls_to_wrap"] = ",".join(par.fsdp_wrap_classes)
    cfg["fsdp_reshard_after_forward"] = "FULL_SHARD" if v1 else True
    cfg["fsdp_state_dict_type"] = "FULL_STATE_DICT" if par.state_dict == "full" else "SHARDED_STATE_DICT"
    cfg["fsdp_offload_params"] = par.offload == "optimizer+params"
    cfg["fsdp_cpu_ram_efficient_loading"] = ram_efficient
    cfg["fsdp_sync_module_states"] = ram_efficient
    cfg["fsdp_activation_checkpointing"] = activation_checkpointing(recipe).where == "fsdp"
    if v1:
        cfg["fsdp_backward_prefetch"] = "BACKWARD_PRE"
        cfg["fsdp_forward_prefetch"] = False
        # False: LoRA's frozen base and trainable adapters then sit in separate flat
        # parameters (the trainer applies PEFT's fsdp_auto_wrap_policy for FSDP1), which is
        # what saves memory; the PEFT FSDP guide requires it.
        cfg["fsdp_use_orig_params"] = False
    return cfg


def render_accelerate_config(
    recipe: Recipe,
    hw: Hardware,
    *,
    deepspeed_config_file: str = DEEPSPEED_FILE,
) -> dict[str, Any]:
    """The accelerate config (`accelerate launch --config_file`) as a dict.

    `deepspeed_config_file`: where the DeepSpeed JSON will be (the launcher passes its absolute
    path; accelerate reads it relative to the working directory)."""
    strategy = strategy_for(recipe.parallel.strategy, hw.num_processes)
    dist = {"single": "NO", "ddp": "MULTI_GPU"}.get(strategy)  # MULTI_GPU also on CPU: see command.py
    if dist is None:
        dist = "FSDP" if strategy in FSDP_STRATEGIES else "DEEPSPEED"
    cfg: dict[str, Any] = {"compute_environment": "LOCAL_MACHINE", "distributed_type": dist}
    if dist == "FSDP":
        cfg["fsdp_config"] = _fsdp_config(recipe, hw)
    if dist == "DEEPSPEED":
        ds: dict[str, Any] = {"deepspeed_config_file": deepspeed_config_file}
        if strategy == "deepspeed-zero3":
            ds["zero3_init_flag"] = True  # build big models already partitioned (not for quantized ones)
        if hw.num_machines > 1:
            ds["deepspeed_multinode_launcher"] = "standard"  # torchrun on each node, no pdsh/ssh
        cfg["deepspeed_config"] = ds
    cfg.update(
        num_machines=hw.num_machines,
        num_processes=hw.num_processes,
        machine_rank=hw.machine_rank,
        main_process_port=hw.main_process_port,
    )
    if hw.num_machines > 1:
        cfg.update(main_process_ip=hw.main_process_ip, rdzv_backend="static", same_network=True)
    cfg["use_cpu"] = hw.use_cpu
    cfg["debug"] = False
    return cfg


def render_deepspeed_config(recipe: Recipe, hw: Hardware) -> dict[str, Any] | None:
    """The DeepSpeed JSON as a dict, or None for strategies without DeepSpeed.

    Batch keys, gradient clipping and bf16/fp16 are "auto": the HF trainer fills them from its
    arguments (micro batch, accumulation, world size, max_grad_norm, precision)."""
    stage = ZERO_STAGE.get(recipe.parallel.strategy)
    if stage is None:
        return None
    par = recipe.parallel
    # "auto": the HF trainer sizes the gradient buckets from the model (hidden_size^2 elements).
    # DeepSpeed's own default, 5e8 elements, reserves ~1 GB per GPU (2 with ZeRO-3's overlapped
    # communication) whatever the model, even for a LoRA adapter of a few MB.
    zero: dict[str, Any] = {"stage": stage, "reduce_bucket_size": "auto"}
    if par.offload in ("optimizer", "optimizer+params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if par.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        # The trainer gathers a PEFT adapter alone at every save whatever this says (measured:
        # a normal adapter_model.safetensors with it false); true would gather the whole 16-bit
        # model on rank 0 wherever accelerate's get_state_dict is used.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        zero["stage3_prefetch_bucket_size"] = "auto"  # 0.9 x hidden_size^2
        # A parameter smaller than this stays whole on every rank (the HF trainer's auto: 10 x
        # hidden_size). On the tiny CPU model that would be every LoRA matrix and most layers, so a
        # CPU run (the tests, the demo) would never gather what a real model's run gathers: on CPU
        # every parameter is partitioned.
        zero["stage3_param_persistence_threshold"] = 0 if hw.use_cpu else "auto"
        if par.zero3_gathered_params is not None:  # else DeepSpeed's 1e9 (launch/memory.py counts it)
            zero["stage3_max_live_parameters"] = int(par.zero3_gathered_params)
            zero["stage3_max_reuse_distance"] = int(par.zero3_gathered_params)
        if par.zero3_sub_group_size is not None:
            zero["sub_group_size"] = int(par.zero3_sub_group_size)

    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,  # the trainer logs; DeepSpeed's own step lines are noise
        "wall_clock_breakdown": False,
    }


def _header(recipe: Recipe, hw: Hardware, what: str) -> str:
    where = "CPU" if hw.use_cpu else "GPU"
    return (
        f"# {what} rendered by tunefleet (launch/templates.py): parallel.strategy={recipe.parallel.strategy}, "
        f"{hw.num_processes} {where} process(es) on {hw.num_machines} machine(s).\n"
        "# Written again at every launch: change the recipe, not this file. Batch sizes and\n"
        "# bf16/fp16 come from the training arguments (one source: the recipe).\n"
    )


def accelerate_yaml_text(recipe: Recipe, hw: Hardware, *, deepspeed_config_file: str = DEEPSPEED_FILE) -> str:
    """The accelerate config file's text (YAML, with a header comment)."""
    cfg = render_accelerate_config(recipe, hw, deepspeed_config_file=deepspeed_config_file)
    return _header(recipe, hw, "accelerate config") + yaml.safe_dump(
        cfg, sort_keys=False, default_flow_style=False
    )


def deepspeed_json_text(recipe: Recipe, hw: Hardware) -> str | None:
    """The DeepSpeed config file's text (JSON cannot hold comments), or None."""
    cfg = render_deepspeed_config(recipe, hw)
    return None if cfg is None else json.dumps(cfg, indent=2) + "\n"


def render_files(recipe: Recipe, hw: Hardware, config_dir: str) -> dict[str, str]:
    """File name -> text for everything `accelerate launch` reads, to be written in
    `config_dir` (the accelerate file points at the DeepSpeed file there)."""
    ds_text = deepspeed_json_text(recipe, hw)
    ds_path = f"{config_dir.rstrip('/')}/{DEEPSPEED_FILE}"
    files = {ACCELERATE_FILE: accelerate_yaml_text(recipe, hw, deepspeed_config_file=ds_path)}
    if ds_text is not None:
        files[DEEPSPEED_FILE] = ds_text
    return files
