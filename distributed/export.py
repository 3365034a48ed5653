"""The final model of a full or partial fine-tune (`peft.method` full / freeze): a Hugging Face model
directory in `final/`, written from the shards one tensor at a time.

Every rank walks the model's tensors in the same order (parameters, then persistent buffers); for
each, the whole tensor is assembled where the strategy keeps it in pieces (FSDP2: the DTensor's
shards, gathered; ZeRO-3: the partitions, gathered; ZeRO-1/2 and ZeRO-3: the fp32 master copy from
the optimizer's partitions for a trained parameter), rank 0 casts it to the export dtype and adds it
to the safetensors file being filled, and writes that file out once it reaches `max_shard_bytes`.
No rank ever holds the whole model: rank 0 holds one file's worth of tensors plus the tensor being
gathered (and every rank that tensor), so host memory while exporting stays at about one shard file
above what training used.

The directory is what `save_pretrained` writes and `AutoModelForCausalLM.from_pretrained` loads:
`model-0000i-of-0000n.safetensors` with `model.safetensors.index.json` (always, even for one file),
`config.json` naming the model's own class in `architectures` (FSDP2 renames it `FSDP<Class>`) and
the export dtype, `generation_config.json`, the tokenizer. Written into a temporary directory and
renamed into place (`atomic_dir`): `final/` is whole or absent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tunefleet.launch.core.layout import atomic_dir

DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3
"""5GB, as `save_pretrained` and `tunefleet merge` shard by default."""

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4}
_UNITS.update({"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4})


def parse_size(text: str) -> int | None:
    """`5GB`, `500MB`, `2GiB` -> bytes; None when it is not a size."""
    match = _SIZE.match(str(text))
    if not match:
        return None
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def own_class(model: Any) -> type:
    """The model's own class: FSDP2 swaps in a subclass named `FSDP<Class>`."""
    for cls in type(model).__mro__:
        if not cls.__name__.startswith("FSDP"):
            return cls
    return type(model)


def _parameters(trainer: Any) -> tuple[Any, list[tuple[str, Any]], list[tuple[str, Any]]]:
    """The unwrapped model, its parameters (tied ones once, under their first name) and its
    persistent buffers, in the order every rank walks them."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    params = list(model.named_parameters())
    param_names = {name for name, _ in params}
    persistent = set(model.state_dict().keys())
    buffers = [(n, b) for n, b in model.named_buffers() if n in persistent and n not in param_names]
    return model, params, buffers


def _whole(param: Any, trainer: Any) -> torch.Tensor:
    """Collective: the whole tensor of one parameter (every rank calls it, in the same order)."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):  # FSDP2: gather the shards
        return param.full_tensor()
    if getattr(trainer, "is_deepspeed_enabled", False):
        from deepspeed.utils import safe_get_full_fp32_param

        if param.requires_grad:  # the fp32 master copy, from the optimizer's partitions
            master = safe_get_full_fp32_param(param)
            if master is not None:
                return master
        if hasattr(param, "ds_id"):  # ZeRO-3, a frozen parameter: gather its partitions
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                return param.data.detach().clone()
    return param.data


def _tensors(trainer: Any) -> Iterator[tuple[str, torch.Tensor]]:
    model, params, buffers = _parameters(trainer)
    for name, param in params:
        yield name, _whole(param, trainer)
    for name, buffer in buffers:
        yield name, buffer


def export_model(
    trainer: Any,
    tokenizer: Any,
    out_dir: Path,
    *,
    dtype: torch.dtype,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> dict[str, Any]:
    """Collective: write the trained model into `out_dir` (rank 0 writes; see the module doc).
    Returns what rank 0 wrote (files, total bytes, dtype); {} on the other ranks."""
    from safetensors.torch import save_file

    main = trainer.args.process_index == 0
    model = trainer.accelerator.unwrap_model(trainer.model)
    with atomic_dir(out_dir) if main else _nowhere() as tmp:
        shards: list[dict[str, str]] = []  # weight name -> temporary file name, per file
        pending: dict[str, torch.Tensor] = {}
        pending_bytes = total = 0

        def flush() -> None:
            nonlocal pending, pending_bytes
            if not pending:
                return
            name = f"part-{len(shards):05d}.safetensors"
            save_file(pending, str(tmp / name), metadata={"format": "pt"})
            shards.append(dict.fromkeys(pending, name))
            pending, pending_bytes = {}, 0

        for name, tensor in _tensors(trainer):
            if not main:
                continue
            value = (
                tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype).contiguous()
            )
            size = value.numel() * value.element_size()
            if pending and pending_bytes + size > max_shard_bytes:
                flush()
            pending[name] = value
            pending_bytes += size
            total += size
        if not main:
            trainer.accelerator.wait_for_everyone()
            return {}
        flush()
        files = _name_shards(tmp, shards, total)
        _write_config(model, tmp, dtype)
        tokenizer.save_pretrained(tmp)
    trainer.accelerator.wait_for_everyone()
    return {"files": files, "total_bytes": total, "dtype": str(dtype).removeprefix("torch.")}


class _nowhere:
    """The other ranks' stand-in for `atomic_dir`: they write nothing."""

    def __enter__(self) -> Path:
        return Path("/nonexistent")

    def __exit__(self, *exc: Any) -> None:
        return None


def _name_shards(tmp: Path, shards: list[dict[str, str]], total: int) -> list[str]:
    """Rename the files `model-0000i-of-0000n.safetensors` and write the index."""
    n = len(shards)
    weight_map: dict[str, str] = {}
    files = []
    for i, mapping in enumerate(shards, start=1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        (tmp / next(iter(mapping.values()))).rename(tmp / final)
        weight_map.update(dict.fromkeys(mapping, final))
        files.append(final)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return files


def _write_config(model: Any, tmp: Path, dtype: torch.dtype) -> None:
    """config.json with the model's own class and the export dtype; the generation config."""
    import copy

    config = copy.deepcopy(model.config)
    config.architectures = [own_class(model).__name__]
    config.dtype = dtype
    config.use_cache = True  # training turned the KV cache off; generation wants it back
    config.save_pretrained(tmp)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(tmp)
