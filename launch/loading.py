"""How the base model is loaded for a strategy: who reads the weights, and where they land.

Pure decisions, shared by the training processes (`distributed/model.py: load_model`) and the
memory estimate at load (`memory.py`, shown by `tunefleet plan`), so both describe the same load.
"""

from __future__ import annotations

from tunefleet.launch.core.recipe import Recipe

SHARDED_FROM_CPU = ("fsdp", "fsdp-qlora", "deepspeed-zero3")
"""Strategies that take the model from the CPU and place only their shards on the GPU (FSDP's
`fully_shard`; ZeRO-3's zero.Init, which transformers refuses to combine with a device_map)."""


def rank0_loads_weights(recipe: Recipe, num_processes: int) -> bool:
    """Whether only global rank 0 reads the base weights, the other ranks building the model on
    the meta device.

    FSDP2 with several processes and an unquantized base: accelerate's RAM-efficient loading
    (`fsdp2_prepare_model`, on whenever several processes run: `templates._fsdp_config`) moves every
    rank's model to the meta device, shards it and broadcasts rank 0's weights tensor by tensor, so
    what the other ranks loaded is never read; and transformers 5 reads the whole checkpoint on every
    rank even with it on (measured on CPU). Not for a 4-bit base (accelerate skips RAM-efficient
    loading when 4-bit parameters exist: every rank loads its own), nor MXFP4 (transformers'
    quantizer loads and dequantizes it), nor FSDP1."""
    par = recipe.parallel
    return (
        par.strategy == "fsdp"
        and par.fsdp_version == 2
        and recipe.model.quantization == "none"
        and num_processes > 1
    )


def placed_on_gpu_at_load(recipe: Recipe, *, use_cpu: bool) -> bool:
    """Whether tunefleet asks transformers to load the weights onto the rank's GPU (a device_map).

    MXFP4 (gpt-oss): transformers' Mxfp4 quantizer sets no device, so the dequantization to bf16
    would run on the CPU and every rank would hold the whole dequantized model in host RAM (~42 GB
    for gpt-oss-20b); on a GPU it is loaded onto the rank's device unless the strategy shards from
    the CPU. bitsandbytes needs no help (its quantizer picks the current CUDA device, which
    accelerate set to the rank's); unquantized models are moved whole by the trainer, or sharded."""
    return (
        not use_cpu
        and recipe.model.quantization == "mxfp4"
        and recipe.parallel.strategy not in SHARDED_FROM_CPU
    )
