"""The final adapter of a run, written as a normal PEFT adapter whatever the strategy.

Under FSDP and ZeRO-3 each rank holds a shard of every parameter, so the adapter must be gathered
first, by every rank together. Only the trainable parameters are gathered (the frozen base never
leaves its shards): FSDP2 through `torch.distributed.checkpoint.state_dict.get_model_state_dict`
(full, CPU-offloaded to rank 0, frozen parameters ignored), ZeRO-3 through the engine's own
consolidation with `exclude_frozen_parameters=True` (what the HF Trainer uses for PEFT). Rank 0
then writes `adapter_model.safetensors`, `adapter_config.json` and the tokenizer atomically
(`model.save_adapter`). FSDP checkpoints written with `parallel.state_dict: sharded` stay
sharded; this is the only full adapter of such a run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunefleet.distributed.model import save_adapter


def gather_trainable_state_dict(trainer: Any) -> dict[str, Any] | None:
    """Collective (every rank calls it). The full trainable state dict on rank 0 (None elsewhere),
    or None everywhere when the parameters are not sharded (the model is read as it is)."""
    if getattr(trainer, "is_fsdp_enabled", False):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        state = get_model_state_dict(trainer.model, options=options)
        return state if trainer.args.process_index == 0 else None
    engine = trainer.model_wrapped
    if getattr(trainer, "is_deepspeed_enabled", False) and engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
    return None


def save_final_adapter(trainer: Any, tokenizer: Any, out_dir: Path) -> None:
    """Collective: gather the adapter (when sharded), then rank 0 writes `out_dir`."""
    state = gather_trainable_state_dict(trainer)
    if trainer.args.process_index == 0:
        save_adapter(trainer.accelerator.unwrap_model(trainer.model), tokenizer, out_dir, state_dict=state)
    trainer.accelerator.wait_for_everyone()


def save_checkpoint_adapter(trainer: Any, ckpt_dir: Path) -> None:
    """Collective: the gathered adapter (trainable weights only) and the tokenizer, written by rank 0
    into a checkpoint's temporary directory next to FSDP's `*.distcp` shards, so `tunefleet merge` and
    `tunefleet generate` can use the checkpoint (`artifacts.find_adapter`). Resuming still reads the
    shards (optimizer state included); this copy is for the tools."""
    state = gather_trainable_state_dict(trainer)
    if trainer.args.process_index == 0:
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(ckpt_dir, state_dict=state)
        if getattr(trainer, "processing_class", None) is not None:
            trainer.processing_class.save_pretrained(ckpt_dir)
