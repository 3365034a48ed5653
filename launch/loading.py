"""How the base model is loaded for a strategy: who reads the weights, and where they land.

Pure decisions, shared by the training processes (`distributed/model.py: load_model`) and the
memory estimate at load (`memory.py`, shown by `tunefleet plan`), so both describe the same load.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

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
    quantizer loads and dequantizes it), nor FSDP1, nor an adapter built from the base weights
    (`adapter_reads_base_weights`)."""
    par = recipe.parallel
    return (
        par.strategy == "fsdp"
        and par.fsdp_version == 2
        and recipe.model.quantization == "none"
        and not adapter_reads_base_weights(recipe)
        and num_processes > 1
    )


BASE_WEIGHT_INITS = ("pissa", "olora", "loftq", "eva")
"""Adapter initialisations computed from the base weights (SVD, QR, quantization error) or from the
base model's activations (EVA)."""


def adapter_reads_base_weights(recipe: Recipe) -> bool:
    """Whether building the adapter reads the base weights on every rank, before FSDP exists: on a
    meta base they fail. Measured (2 processes, FSDP2, rank-0 loading): PiSSA "Attempted to call
    `variable.set_data(tensor)`, but `variable` and `tensor` have incompatible tensor type"
    (lora/layer.py pissa_init); `trainable_token_indices` "Cannot copy out of meta tensor" when FSDP2
    wraps the model (PEFT keeps the trained rows' original values in a buffer accelerate's broadcast
    does not fill); EVA runs the base model over the first batches (`distributed/eva.py`)."""
    return recipe.peft.init in BASE_WEIGHT_INITS or recipe.peft.trainable_token_indices is not None


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


def weights_problem(model_dir: str | os.PathLike) -> str | None:
    """Why the safetensors weights of a local model directory cannot all be read (None: they can),
    from their headers alone: a shard its index names that is missing, a file shorter than its header
    says (a download cut short), a header that is not one. Nothing is loaded."""
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            return f"{index.name} cannot be read"
    else:
        names = sorted(p.name for p in root.glob("*.safetensors"))
    for name in names:
        path = root / name
        if not path.is_file():
            return f"{name} is missing (named in {index.name})"
        size = path.stat().st_size
        try:
            with path.open("rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > size:
                    raise ValueError
                header = json.loads(f.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (OSError, ValueError, struct.error, KeyError, TypeError):
            return f"{name} ({size:,} bytes) has no readable safetensors header"
        if size < 8 + length + end:
            return f"{name} holds {size:,} of its {8 + length + end:,} bytes"
    return None
