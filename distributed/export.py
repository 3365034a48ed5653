"""The final model of a full or partial fine-tune (`peft.method` full / freeze): a Hugging Face model
directory in `final/`, written from the shards one tensor at a time.

Every rank walks the model's tensors in the same order (parameters, then persistent buffers); for
each, the whole tensor is assembled where the strategy keeps it in pieces (FSDP2: the DTensor's
shards, gathered; ZeRO-3: the partitions, gathered; ZeRO-1/2 and ZeRO-3: the fp32 master copy from
the optimizer's partitions for a trained parameter), rank 0 casts it to the export dtype and
appends its bytes to the safetensors file it belongs to. The files are laid out before the walk,
from the tensors' whole shapes (a partitioned parameter knows its own) and the export dtype: each
file's header is written first, then its tensors stream in. No rank ever holds the whole model, and
none holds more than the tensor being gathered (rank 0: and its cast copy), so exporting adds about
one tensor to what training used.

The directory is what `save_pretrained` writes and `AutoModelForCausalLM.from_pretrained` loads:
`model-0000i-of-0000n.safetensors` with `model.safetensors.index.json` (always, even for one file),
`config.json` naming the model's own class in `architectures` (FSDP2 renames it `FSDP<Class>`) and
the export dtype, `generation_config.json`, the tokenizer. Written into a temporary directory and
renamed into place (`atomic_dir`): `final/` is whole or absent.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
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


def _tensors(
    trainer: Any, params: list[tuple[str, Any]], buffers: list[tuple[str, Any]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Collective: every tensor whole, in the walk's order (`_parameters`)."""
    for name, param in params:
        yield name, _whole(param, trainer)
    for name, buffer in buffers:
        yield name, buffer


_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class _Entry:
    """One tensor of the exported model as it will be written: whole shape and export dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _layout(
    params: list[tuple[str, Any]], buffers: list[tuple[str, Any]], dtype: torch.dtype, max_shard_bytes: int
) -> list[list[_Entry]]:
    """The tensors of each file, in walk order, a new file whenever the next tensor would take the
    current one past `max_shard_bytes` (as save_pretrained shards)."""
    files: list[list[_Entry]] = [[]]
    size = 0
    for name, tensor in [*params, *buffers]:
        shape = getattr(tensor, "ds_shape", None)  # ZeRO-3: a partitioned parameter's whole shape
        entry = _Entry(
            name,
            tuple(shape if shape is not None else tensor.shape),  # FSDP2: a DTensor's shape is the whole one
            dtype if tensor.is_floating_point() else tensor.dtype,
        )
        if files[-1] and size + entry.nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(entry)
        size += entry.nbytes
    return files


def _header(entries: list[_Entry]) -> bytes:
    """A safetensors header (length, then JSON padded to 8 bytes) for `entries` stored in order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {
            "dtype": _SAFETENSORS_DTYPES[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


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
    main = trainer.args.process_index == 0
    model, params, buffers = _parameters(trainer)
    layout = _layout(params, buffers, dtype, max_shard_bytes)
    names = [f"model-{i:05d}-of-{len(layout):05d}.safetensors" for i in range(1, len(layout) + 1)]
    planned = iter([(i, entry) for i, entries in enumerate(layout) for entry in entries])
    with atomic_dir(out_dir) if main else _nowhere() as tmp:
        handle: Any = None
        current = -1
        try:
            for name, tensor in _tensors(trainer, params, buffers):
                i, entry = next(planned)
                if not main:
                    continue
                value = tensor.detach().to("cpu", entry.dtype).contiguous()
                if name != entry.name or tuple(value.shape) != entry.shape:  # the layout is the walk's: a bug
                    raise RuntimeError(
                        f"export: {name} {tuple(value.shape)} where {entry.name} {entry.shape} was laid out"
                    )
                if i != current:  # the next file: its header first
                    if handle is not None:
                        handle.close()
                    handle, current = (tmp / names[i]).open("wb"), i
                    handle.write(_header(layout[i]))
                handle.write(value.reshape(-1).view(torch.uint8).numpy().data)
                del value
        finally:
            if handle is not None:
                handle.close()
        if not main:
            trainer.accelerator.wait_for_everyone()
            return {}
        total = sum(e.nbytes for f in layout for e in f)
        _write_index(tmp, layout, names, total)
        _write_config(model, tmp, dtype)
        tokenizer.save_pretrained(tmp)
    trainer.accelerator.wait_for_everyone()
    return {"files": names, "total_bytes": total, "dtype": str(dtype).removeprefix("torch.")}


class _nowhere:
    """The other ranks' stand-in for `atomic_dir`: they write nothing."""

    def __enter__(self) -> Path:
        return Path("/nonexistent")

    def __exit__(self, *exc: Any) -> None:
        return None


def _write_index(tmp: Path, layout: list[list[_Entry]], names: list[str], total: int) -> None:
    """model.safetensors.index.json: which file holds each weight, and the total size."""
    weight_map = {e.name: name for name, entries in zip(names, layout, strict=True) for e in entries}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


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
