"""One rank of the plain-FSDP1 checks in tests/test_fsdp1.py (run by torchrun, 2 gloo processes).

accelerate runs FSDP1 only on GPUs, so this wraps the tiny demo model with PyTorch's FSDP1
directly, the way accelerate and the Trainer do for a PEFT model (`use_orig_params=False`,
FULL_SHARD, PEFT's `fsdp_auto_wrap_policy`: decoder layers plus one unit per trainable leaf). No
full state dict is gathered (plain FSDP1 segfaulted doing that on CPU here). Rank 0 writes what it
saw as JSON to argv[1].

- `lora`: a LoRA model, two training steps, then `guard.sharding_in_effect` / `check_sharding`;
  the same model with one LoRA module left out of FSDP (`ignored_modules`) must be refused.
- `qlora`: the 4-bit (nf4, bf16 storage) model prepared by PEFT's `prepare_model_for_kbit_training`
  (FSDP1 must refuse to flatten its layers), then as tunefleet prepares sharded QLoRA (it flattens
  and trains; afterwards bitsandbytes has re-registered its 4-bit weights outside the flat
  parameters).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy


def recipe(*overrides: str) -> Any:
    from importlib import resources

    from tunefleet.launch import compat
    from tunefleet.launch.core import recipe as R
    from tunefleet.launch.core.hardware import Hardware

    demo = Path(str(resources.files("tunefleet.recipes"))) / "demo.yaml"
    raw = R.load(demo, ["output_dir=/tmp/unused", "peft.dropout=0.0", "model.dtype=auto", *overrides])
    return compat.resolve(raw, Hardware(num_processes=2, use_cpu=True))


def build(r: Any, *, kbit: bool) -> Any:
    """The demo model as tunefleet loads it, with its adapter (fp32, as `adapter_dtype` decides)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from tunefleet.distributed import model as model_mod
    from tunefleet.launch.params import lora_config_kwargs

    precision = model_mod.resolve_precision(r)
    base = model_mod.load_model(model_mod.resolve_model_path(r.model), r, precision)
    torch.manual_seed(0)
    if kbit:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        peft_model = get_peft_model(base, LoraConfig(**lora_config_kwargs(r.peft)))
    else:
        peft_model = model_mod.apply_peft(base, r)
    model_mod.match_adapter_dtype(peft_model, r)
    return peft_model


def wrap(model: Any, **kwargs: Any) -> Any:
    from peft.utils.other import fsdp_auto_wrap_policy

    return FullyShardedDataParallel(
        model,
        auto_wrap_policy=fsdp_auto_wrap_policy(model),
        use_orig_params=False,
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        device_id=torch.device("cpu"),
        **kwargs,
    )


def train(wrapped: Any, steps: int) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def refused(fn: Any) -> str | None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the message is the result
        return f"{type(exc).__name__}: {exc}"
    return None


def check_lora() -> dict[str, Any]:
    from tunefleet.distributed import guard

    r = recipe()
    wrapped = wrap(build(r, kbit=False))
    losses = train(wrapped, 2)
    sharding = guard.sharding_in_effect(wrapped, wrapped)
    guard.check_sharding("fsdp", sharding, dist.get_world_size())

    partial = build(r, kbit=False)
    left_out = partial.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"]
    wrapped_partial = wrap(partial, ignored_modules=[left_out])
    partial_sharding = guard.sharding_in_effect(wrapped_partial, wrapped_partial)
    error = refused(lambda: guard.check_sharding("fsdp", partial_sharding, dist.get_world_size()))
    return {"losses": losses, "sharding": sharding, "partial": partial_sharding, "partial_error": error}


def check_qlora() -> dict[str, Any]:
    r = recipe("parallel.strategy=fsdp-qlora", "model.quantization=nf4", "train.precision=bf16")
    kbit_error = refused(lambda: wrap(build(r, kbit=True)))
    wrapped = wrap(build(r, kbit=False))
    before = sum(1 for _ in wrapped.parameters())
    losses = train(wrapped, 1)
    after = [type(p).__name__ for p in wrapped.parameters()]
    return {
        "kbit_error": kbit_error,
        "losses": losses,
        "params_before": before,
        "params_after": len(after),
        "params4bit_after": after.count("Params4bit"),
    }


def main() -> None:
    dist.init_process_group("gloo")
    result = {"lora": check_lora(), "qlora": check_qlora(), "world_size": dist.get_world_size()}
    if dist.get_rank() == 0:
        Path(sys.argv[1]).write_text(json.dumps(result, indent=1), encoding="utf-8")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
