"""Start-up checks: the run really is what the recipe and the launcher asked for.

accelerate falls back without a word (FSDP on CPU becomes DDP, `ACCELERATE_USE_CPU` turns
DeepSpeed off, a rank started without the distributed variables trains alone), so every rank
checks, once the Trainer exists, that the distributed type and world size in effect are the
expected ones, and, once the model is wrapped (`ShardingCheck`, at the start of training), that
the sharding is real: for FSDP every trainable parameter a DTensor (FSDP2) or inside a flat
parameter (FSDP1) on a mesh of the world size, and for FSDP-QLoRA the 4-bit base too; a ZeRO
engine of the asked stage (every parameter partitioned for ZeRO-3); a DDP wrapper for `ddp`. A
mismatch stops every rank with a TunefleetError. What is in effect is recorded in plan.json.

The expectation comes from `tunefleet launch` (TUNEFLEET_* variables, `command.launch_env`);
without them (torchrun or `accelerate launch` by hand) it is derived from the recipe and
WORLD_SIZE with the same function the launcher uses (`templates.expected_distributed_type`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from tunefleet.distributed import cpu_fsdp
from tunefleet.launch.compat import padding_free_problem
from tunefleet.launch.core.errors import TunefleetError
from tunefleet.launch.core.hardware import Hardware
from tunefleet.launch.core.layout import ENV_DISTRIBUTED_TYPE, ENV_NUM_MACHINES, ENV_WORLD_SIZE, write_json
from tunefleet.launch.core.recipe import Recipe
from tunefleet.launch.templates import FSDP_STRATEGIES, ZERO_STAGE, expected_distributed_type

QUANTIZED_LINEAR = ("Linear4bit", "Linear8bitLt")
"""bitsandbytes' layer classes: how many of them the trained model holds shows the base really is quantized."""

FIX = "launch with `tunefleet launch RECIPE --nproc N` (CPU) or `--gpus N`, which renders the matching accelerate config"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Expectation:
    distributed_type: str
    """accelerate's DistributedType value every rank must see (NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED)."""
    world_size: int
    """Processes in the run."""
    source: str
    """`tunefleet launch` or `the recipe` (launched by hand)."""


def runtime_hardware(world_size: int, *, use_cpu: bool) -> Hardware:
    """The hardware this rank runs on, from the launcher's variables or torchrun's."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size) or world_size)
    machines = int(os.environ.get(ENV_NUM_MACHINES, max(1, world_size // max(local, 1))))
    return Hardware(
        num_processes=world_size,
        num_machines=machines,
        main_process_ip=os.environ.get("MASTER_ADDR", "localhost") if machines > 1 else None,
        use_cpu=use_cpu,
    )


def expectation(recipe: Recipe, hw: Hardware) -> Expectation:
    if ENV_DISTRIBUTED_TYPE in os.environ:
        return Expectation(
            distributed_type=os.environ[ENV_DISTRIBUTED_TYPE],
            world_size=int(os.environ.get(ENV_WORLD_SIZE, hw.num_processes)),
            source="tunefleet launch",
        )
    return Expectation(
        distributed_type=expected_distributed_type(recipe, hw),
        world_size=hw.num_processes,
        source="the recipe",
    )


def check_distributed(state: Any, expected: Expectation, strategy: str) -> None:
    """Stop when accelerate's state is not what was asked for (right after the Trainer is built)."""
    got_type, got_world = state.distributed_type.value, state.num_processes
    if got_type == expected.distributed_type and got_world == expected.world_size:
        return
    if (
        expected.distributed_type == "NO"
        and got_type in ("MULTI_CPU", "MULTI_GPU")
        and got_world == 1 == expected.world_size
    ):
        return  # torchrun starts even a lone process in a process group (a 1-node, 1-process SLURM job)
    why, fix = "", FIX
    if expected.distributed_type == "FSDP" and got_type in ("MULTI_CPU", "MULTI_GPU"):
        why = " (FSDP silently became DDP: nothing would be sharded)"
        if got_type == "MULTI_CPU" and expected.source == "tunefleet launch":
            fix = (
                "FSDP on CPU runs through tunefleet's layer (distributed/cpu_fsdp.py), which is off "
                f"({cpu_fsdp.ENV_SWITCH}=0) or no longer takes effect: unset {cpu_fsdp.ENV_SWITCH}, or use "
                "parallel.strategy=ddp or deepspeed-zero3"
            )
    elif expected.distributed_type == "DEEPSPEED" and got_type != "DEEPSPEED":
        why = " (DeepSpeed was not turned on: ACCELERATE_USE_CPU or a launch without its config turns it off)"
    elif got_world != expected.world_size:
        why = " (the processes did not join one world)"
    raise TunefleetError(
        f"parallel.strategy={strategy}: {expected.source} asked for distributed type {expected.distributed_type} "
        f"with {expected.world_size} process(es), but accelerate runs {got_type} with {got_world}{why}",
        fix,
    )


def in_effect(trainer: Any, precision: Any) -> dict[str, Any]:
    """What the run really uses (not what was asked for): recorded in plan.json."""
    import torch

    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    quantized: dict[str, int] = {}
    for module in trainer.model.modules():
        name = type(module).__name__
        if name in QUANTIZED_LINEAR and type(module).__module__.startswith("bitsandbytes"):
            quantized[name] = quantized.get(name, 0) + 1
    return {
        "quantized_modules": quantized,
        "world_size": trainer.args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1],
        "backend": torch.distributed.get_backend() if dist else None,
        "device": str(trainer.args.device),
        "mixed_precision": precision.mode,
        "model_dtype": str(precision.dtype).replace("torch.", ""),
        "trainable_dtypes": sorted(
            {str(p.dtype).replace("torch.", "") for p in trainer.model.parameters() if p.requires_grad}
        ),
    }


def check_padding_free(model: Any, recipe: Recipe) -> None:
    """Packed samples stay apart only for verified model types and attention implementations, and
    only without a KV cache (with one, transformers builds no block mask: samples would see each other)."""
    if recipe.batch.padding_free is not True:
        return
    config = model.config
    problem = padding_free_problem(config.model_type, getattr(config, "_attn_implementation", None))
    if problem is None and getattr(config, "use_cache", False):
        problem = "the model's KV cache is on, and with it the attention would not keep packed samples apart"
    if problem:
        raise TunefleetError(
            f"batch.padding_free: {problem}", "set batch.padding_free=false (micro batches grouped by length)"
        )


def ranks_that_read_weights(model: Any) -> list[int]:
    """Collective (every rank calls it, before training): the ranks whose base weights were read
    from the checkpoint; the others started on the meta device (`loading.rank0_loads_weights`) and
    receive rank 0's weights when the model is sharded."""
    import torch.distributed as dist

    read = not any(p.is_meta for p in model.parameters())
    if not (dist.is_available() and dist.is_initialized()):
        return [0] if read else []
    flags: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(flags, read)
    return [rank for rank, flag in enumerate(flags) if flag]


# ----------------------------------------------------------------------------- sharding


def sharding_in_effect(model: Any, wrapped: Any) -> dict[str, Any]:
    """How the prepared model is really spread over the ranks (for plan.json and the check)."""
    import torch
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    if type(wrapped).__name__ == "DeepSpeedEngine":
        stage = int(wrapped.zero_optimization_stage())
        return {
            "kind": f"deepspeed-zero{stage}",
            "zero_stage": stage,
            "params": len(params),
            "partitioned_params": sum(hasattr(p, "ds_id") for p in params),
            "offload_optimizer": bool(wrapped.zero_cpu_offload()),
        }
    dtensors = [p for p in params if isinstance(p, DTensor)]
    if dtensors:
        mesh = dtensors[0].device_mesh
        return {
            "kind": "fsdp2",
            "params": len(params),
            "sharded_params": len(dtensors),
            "dtensor_params": len(dtensors),
            "trainable_sharded_params": sum(isinstance(p, DTensor) for p in trainable),
            "trainable_dtensor_params": sum(isinstance(p, DTensor) for p in trainable),
            "trainable_params": len(trainable),
            "mesh_size": mesh.size(),
            "mesh_device": mesh.device_type,
            "placements": sorted({str(pl) for p in dtensors for pl in p.placements}),
        }
    fsdp1 = _fsdp1_sharding(wrapped)
    if fsdp1 is not None:
        return fsdp1
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        return {"kind": "ddp", "params": len(params)}
    return {"kind": "none", "params": len(params), "wrapper": type(wrapped).__name__}


def _fsdp1_sharding(wrapped: Any) -> dict[str, Any] | None:
    """FSDP1 (`FullyShardedDataParallel` modules): the original parameters live in flat parameters,
    one per wrapped unit, each sharded over the unit's process group; None when there is no FSDP1.

    Counted in original parameters, read from each flat parameter's metadata (`_num_params`), so the
    numbers compare with FSDP2's; parameters left outside every flat parameter are replicated."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp._flat_param import FlatParameter

    units = [m for m in wrapped.modules() if isinstance(m, FullyShardedDataParallel)]
    if not units:
        return None
    flat = [p for p in wrapped.parameters() if isinstance(p, FlatParameter)]
    loose = [
        p
        for p in wrapped.parameters()
        if not isinstance(p, FlatParameter) and not getattr(p, "_fsdp_flattened", False)
    ]
    flattened = sum(p._num_params for p in flat)
    trainable_flattened = sum(p._num_params for p in flat if p.requires_grad)
    return {
        "kind": "fsdp1",
        "params": flattened + len(loose),
        "sharded_params": flattened,
        "trainable_sharded_params": trainable_flattened,
        "trainable_params": trainable_flattened + sum(p.requires_grad for p in loose),
        "flat_params": len(flat),
        "units": len(units),
        "mesh_size": units[0].world_size,
        "sharding_strategy": units[0].sharding_strategy.name,
    }


def check_sharding(strategy: str, sharding: dict[str, Any], world_size: int) -> None:
    kind = sharding["kind"]
    problem = None
    if strategy in FSDP_STRATEGIES:
        problem = _fsdp_problem(strategy, sharding, world_size)
    elif strategy in ZERO_STAGE:
        stage = ZERO_STAGE[strategy]
        if kind != f"deepspeed-zero{stage}":
            problem = f"the model runs as {kind}, not ZeRO stage {stage}"
        elif stage == 3 and sharding["partitioned_params"] != sharding["params"]:
            problem = f"only {sharding['partitioned_params']} of {sharding['params']} parameters are ZeRO-3 partitioned"
    elif strategy == "ddp" and world_size > 1 and kind != "ddp":
        problem = f"the model is not wrapped in DistributedDataParallel ({kind})"
    if problem:
        raise TunefleetError(f"parallel.strategy={strategy}: {problem}", FIX)


def _fsdp_problem(strategy: str, sharding: dict[str, Any], world_size: int) -> str | None:
    """FSDP1 or FSDP2: every trainable parameter sharded on a mesh of the world size; for
    fsdp-qlora the frozen 4-bit base too (sharding it is the point of the strategy)."""
    kind = sharding["kind"]
    if kind not in ("fsdp1", "fsdp2"):
        return f"the model is wrapped as {kind}, with no DTensor or flat (FSDP1) parameter"
    if (
        sharding["trainable_sharded_params"] != sharding["trainable_params"]
        or sharding["mesh_size"] != world_size
    ):
        return (
            f"{sharding['trainable_sharded_params']} of {sharding['trainable_params']} trainable parameters "
            f"are sharded ({kind}), on a mesh of {sharding['mesh_size']} (world size {world_size})"
        )
    if strategy == "fsdp-qlora" and sharding["sharded_params"] != sharding["params"]:
        return (
            f"only {sharding['sharded_params']} of {sharding['params']} parameters are sharded ({kind}): "
            "the rest of the 4-bit base is replicated on every rank"
        )
    return None


class ShardingCheck(TrainerCallback):
    """At the start of training (the model is wrapped by then): check the sharding, record it in plan.json."""

    def __init__(self, trainer: Any, strategy: str, world_size: int, plan_path: Path | None) -> None:
        self.trainer, self.strategy, self.world_size, self.plan_path = (
            trainer,
            strategy,
            world_size,
            plan_path,
        )

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        t = self.trainer
        sharding = sharding_in_effect(t.model, t.model_wrapped)
        check_sharding(self.strategy, sharding, self.world_size)
        if self.plan_path is not None and self.plan_path.exists():
            plan = json.loads(self.plan_path.read_text(encoding="utf-8"))
            plan.setdefault("in_effect", {})["sharding"] = sharding
            write_json(self.plan_path, plan)
