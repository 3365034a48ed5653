"""FSDP2 on CPU (gloo) through accelerate and the HF Trainer: a small, isolated compatibility layer.

Why it exists. accelerate 1.15 turns FSDP on only for GPU-like devices: `AcceleratorState.__init__`
(accelerate/state.py) switches `distributed_type` to FSDP inside a branch that lists MULTI_GPU,
MULTI_NPU, MULTI_XPU, ... but not MULTI_CPU. On a CPU machine, a process launched by
`accelerate launch` with an FSDP config (ACCELERATE_USE_FSDP=true, an FSDP plugin built from the
FSDP_* variables) therefore stays MULTI_CPU: the Trainer wraps the model in DDP and nothing is
sharded, without a warning. PyTorch itself shards on CPU: `fully_shard` over gloo trains and
saves/loads a sharded distributed checkpoint (measured here, torch 2.13).

What it changes, and nothing else. `enable()` wraps `AcceleratorState.__init__` (the patch is
`launch/hf_compat.py:enable_fsdp2_on_cpu`, with the other hooks into libraries). After the
original ran, when the state is MULTI_CPU and an FSDP plugin with `fsdp_version == 2` was passed,
it does what the original does for a GPU: `distributed_type = FSDP`, the plugin stored on the
state, the mixed precision set on the plugin, PartialState's `distributed_type` updated. From
there on everything is accelerate's and torch's own code, unchanged: `fsdp2_prepare_model`
(`fully_shard` on each decoder layer, the embeddings, the tail and the root; RAM-efficient
loading by broadcast from rank 0), the Trainer's FSDP paths, `torch.distributed.checkpoint`
shards in checkpoints. The entrypoint then checks that the parameters really are DTensors.

When. The entrypoint calls `enable()` only when CUDA is absent and the recipe's strategy is
`fsdp` or `fsdp-qlora`; `TUNEFLEET_CPU_FSDP=0` leaves it off (the tests use that to show that
the silent fallback still exists upstream). FSDP1 is never enabled: its `sync_module_states`
looks up a GPU ("There are currently no available devices found") and plain FSDP1 segfaulted
while gathering a full state dict on CPU here; `compat.resolve` refuses FSDP1 on CPU.

Remove it when `tests/test_launch.py::test_fsdp_without_layer_falls_back` fails with "upstream
now supports FSDP on CPU": accelerate then shards on CPU by itself.
"""

from __future__ import annotations

import os

from tunefleet.launch import hf_compat

ENV_SWITCH = "TUNEFLEET_CPU_FSDP"
"""`0` keeps the layer off even where it would apply (tests, or to see upstream's behaviour)."""


def wanted(strategy: str, *, cuda_available: bool) -> bool:
    """Whether the entrypoint turns the layer on for this run."""
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return False
    return strategy in ("fsdp", "fsdp-qlora") and not cuda_available


def is_enabled() -> bool:
    return hf_compat.fsdp2_on_cpu_enabled()


def enable() -> None:
    """Let accelerate select FSDP2 on a CPU (gloo) world. Idempotent; call before the Trainer exists.
    The patch itself is `hf_compat.enable_fsdp2_on_cpu` (every hook into a library lives there)."""
    hf_compat.enable_fsdp2_on_cpu()
