"""Merge a run's LoRA/DoRA adapter into its base model and save one standard transformers model.

The base is loaded unquantized on the CPU: for QLoRA runs (bitsandbytes nf4/fp4/int8) the
adapter is merged into the original full-precision weights at the recipe's dtype, not into the
4-bit copy it was trained against (the merged model differs from "4-bit base + adapter" by that
quantization error); MXFP4 bases are dequantized. The result (safetensors, sharded above
`max_shard_size`, + tokenizer + `tunefleet_merge.json`) is written to a temporary directory and
renamed into place, and its logits are checked against base+adapter on a probe prompt.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunefleet.launch.core.errors import TunefleetError
from tunefleet.launch.core.layout import atomic_dir
from tunefleet.launch.core.lock import holding
from tunefleet.launch.core.recipe import PRECISION_DTYPE, WEIGHT_METHODS, Recipe
from tunefleet.launch.params import describe_variants

MERGE_INFO = "tunefleet_merge.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"


@dataclass(frozen=True, kw_only=True)
class MergeResult:
    out_dir: Path
    adapter_dir: Path
    dtype: str
    notes: list[str]
    """What the user should know (QLoRA dequantized base, ...)."""
    max_logit_diff: float | None
    """Largest |logit difference| between the merged model and base+adapter on a probe prompt."""


def check_mergeable(recipe: Recipe, run_dir: Path | None = None) -> None:
    """Refuse runs without an adapter to merge, and adapters whose effect no merged weight can reproduce."""
    if recipe.peft.method in WEIGHT_METHODS:
        final = (run_dir or Path(recipe.output_dir)) / "final"
        raise TunefleetError(
            f"this run fine-tuned the model's own weights (peft.method={recipe.peft.method}): there is no adapter, "
            "so there is nothing to merge",
            f"its final/ is already a whole model: load it with AutoModelForCausalLM.from_pretrained({str(final)!r})",
        )
    if recipe.peft.alora_invocation is not None:
        raise TunefleetError(
            "this run trained an Activated LoRA adapter (peft.alora_invocation): it acts only from its "
            "invocation tokens on, which no merged weight can do (PEFT: 'aLoRA does not support merging')",
            "use it as an adapter: `tunefleet generate` loads the base with it, and serving engines "
            "that support aLoRA reuse the base model's KV cache before the invocation",
        )


def unshare_replicated_layers(model: Any) -> int:
    """Give every decoder layer that shares base weights with an earlier one its own copy.

    PEFT's layer replication stacks copies of layers that share their frozen weights; merging each
    copy's adapter into the one shared tensor adds every copy's update to all of them (measured on
    the demo: merged logits off by 2.7), and saving refuses the shared tensors. Returns how many
    layers were copied."""
    import copy

    import torch

    decoder = model.get_base_model().model
    seen: set[int] = set()
    copied = 0
    layers = []
    for layer in decoder.layers:
        ptrs = {p.data_ptr() for p in layer.parameters()}
        if ptrs & seen:
            layer = copy.deepcopy(layer)
            copied += 1
        seen |= {p.data_ptr() for p in layer.parameters()}
        layers.append(layer)
    decoder.layers = torch.nn.ModuleList(layers)
    return copied


def merge_dtype(recipe: Recipe, override: str | None = None) -> str:
    """`override`, else `model.dtype`, else the dtype `train.precision` implies, else the checkpoint's."""
    if override and override != "auto":
        return override
    if recipe.model.dtype != "auto":
        return recipe.model.dtype
    return PRECISION_DTYPE.get(recipe.train.precision, "auto")


def _load_base(recipe: Recipe, dtype: str, notes: list[str]) -> Any:
    import torch

    from tunefleet.distributed import model as model_mod

    m = recipe.model
    kwargs: dict[str, Any] = {
        "dtype": dtype if dtype == "auto" else getattr(torch, dtype),
        "revision": m.revision,
        "trust_remote_code": m.trust_remote_code,
    }
    if m.quantization == "mxfp4":
        from transformers.utils.quantization_config import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
        notes.append(f"MXFP4 base: dequantized to {dtype} before merging")
    elif m.quantization != "none":
        notes.append(
            f"QLoRA run ({m.quantization}): the adapter is merged into the unquantized base weights at {dtype} "
            f"(training saw a {m.quantization}-quantized copy of them; the merged model differs from the "
            "quantized base + adapter by that quantization error)"
        )
    path = model_mod.resolve_model_path(m)
    base = model_mod.from_pretrained(path, **kwargs)
    if getattr(base, "hf_quantizer", None) is not None and m.quantization != "mxfp4":
        base = base.dequantize()  # a checkpoint stored pre-quantized: merge into its dequantized weights
        notes.append(f"the base checkpoint is stored quantized: dequantized to {dtype} before merging")
    return base


def _probe_ids(recipe: Recipe, tokenizer: Any) -> Any:
    import torch

    from tunefleet.distributed.generate import render_prompt

    prompt = render_prompt(
        "Name three colours and explain why the sky is blue.", data=recipe.data, tokenizer=tokenizer
    )
    return torch.tensor([prompt.ids])


def merge(
    path: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
    check: bool = True,
) -> MergeResult:
    """Merge the adapter found at `path` (see `artifacts.find_adapter`) into its base; save to `out`."""
    import torch
    from peft import PeftModel

    from tunefleet.distributed import model as model_mod
    from tunefleet.distributed.artifacts import find_adapter
    from tunefleet.distributed.generate import load_tokenizer

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TunefleetError(
            f"--out {str(out)!r} already exists and is not empty",
            "choose a new directory (nothing is overwritten)",
        )
    adapter = find_adapter(path)
    recipe = adapter.recipe
    check_mergeable(recipe, adapter.run_dir)
    model_mod.check_loadable_here(recipe)
    notes: list[str] = [adapter.note] if adapter.note else []
    resolved_dtype = merge_dtype(recipe, dtype)
    tokenizer = load_tokenizer(adapter)
    base = _load_base(recipe, resolved_dtype, notes)
    model = PeftModel.from_pretrained(base, str(adapter.adapter_dir))
    model.eval()
    if recipe.peft.layer_replication:
        copied = unshare_replicated_layers(model)
        notes.append(
            f"layer replication: {copied} decoder layer(s) given their own copy of the shared base weights, "
            f"so each copy's adapter merges into its own; the merged model has {model.config.num_hidden_layers} layers"
        )
    probe = _probe_ids(recipe, tokenizer) if check else None
    with torch.no_grad():
        expected = model(input_ids=probe).logits.float() if probe is not None else None
        merged = model.merge_and_unload()
        got = merged(input_ids=probe).logits.float() if probe is not None else None
    diff = float((expected - got).abs().max()) if expected is not None and got is not None else None
    if diff is not None and not math.isfinite(diff):
        raise TunefleetError(
            f"the merge check's logits are not finite (max |logit difference| = {diff}): the adapter at "
            f"{adapter.adapter_dir} holds NaN or infinite weights (a run that diverged); nothing was written",
            "merge an earlier checkpoint of the run, or retrain it with a lower train.lr",
        )
    merged.config.use_cache = True

    if out.exists():
        out.rmdir()  # empty (checked above)
    inside = adapter.run_dir.resolve() in out.absolute().parents  # writing into a run: one writer at a time
    with (
        holding(adapter.run_dir, "tunefleet merge") if inside else contextlib.nullcontext(),
        atomic_dir(out) as tmp,
    ):
        _save_merged(merged, tokenizer, tmp, adapter, recipe, notes, diff, max_shard_size)
    return MergeResult(
        out_dir=out,
        adapter_dir=adapter.adapter_dir,
        dtype=_dtype_name(merged),
        notes=notes,
        max_logit_diff=diff,
    )


def _dtype_name(model: Any) -> str:
    return str(model.dtype).removeprefix("torch.")


def _save_merged(
    merged: Any,
    tokenizer: Any,
    tmp: Path,
    adapter: Any,
    recipe: Recipe,
    notes: list[str],
    diff: float | None,
    max_shard_size: str,
) -> None:
    merged.save_pretrained(tmp, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(tmp)
    info = {
        "adapter": str(adapter.adapter_dir.resolve()),
        "run_dir": str(adapter.run_dir.resolve()),
        "base_model": recipe.model.name_or_path,
        "revision": recipe.model.revision,
        "peft_method": recipe.peft.method + ("+rslora" if recipe.peft.use_rslora else ""),
        "peft_variants": describe_variants(recipe.peft),
        "training_quantization": recipe.model.quantization,
        "dtype": _dtype_name(merged),
        "max_logit_diff": diff,
        "notes": notes,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (tmp / MERGE_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
