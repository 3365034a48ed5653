"""EVA initialisation (`peft.init: eva`): the adapter's A matrices from the data, the same on every rank.

EVA (Explained Variance Adaptation, PEFT's `initialize_lora_eva_weights`) runs the base model over
the first micro batches of the run, takes the SVD of each adapted layer's input activations, sets
A to the top right-singular vectors and moves rank to the layers whose inputs need it (up to
`peft.eva_rho` x r). The shapes of the adapter come out of that computation, so every rank must
get the same result, or DDP/FSDP/DeepSpeed would wrap different models:

* every rank computes EVA over the same batches (epoch 0's global batches in the sampler's order,
  cut into micro batches as one process would: the same whatever the world size), with PEFT's
  gathering of activations across ranks switched off;
* rank 0's result is then broadcast and loaded by every rank (the same bits even where a GPU's
  kernels are not deterministic), and a digest of each rank's adapter is compared (`agree`).

Resuming never recomputes it: the adapter takes the ranks its checkpoint was saved with
(`adapter_config.json`), and the trainer then loads the checkpoint's weights into it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from tunefleet.distributed.data import IGNORE_INDEX
from tunefleet.launch.core.batch import BatchPlan
from tunefleet.launch.core.errors import TunefleetError
from tunefleet.launch.core.recipe import PeftConfig
from tunefleet.launch.params import EVA_DEFAULT_RHO

MAX_MICRO_BATCHES = 256
"""EVA cycles over its batches until every layer's components have converged (it stops there):
it gets the first micro batches of the run, at most this many, so the start-up stays bounded."""


def first_micro_batches(
    num_rows: int, *, batch: BatchPlan, steps_per_epoch: int, seed: int
) -> list[list[int]]:
    """Epoch 0's rows in the sampler's order, in micro batches of `batch.micro_batch_size`."""
    from tunefleet.distributed.sampler import global_batches

    micro = batch.micro_batch_size
    batches = global_batches(
        num_rows,
        global_batch_size=batch.global_batch_size,
        steps_per_epoch=steps_per_epoch,
        seed=seed,
        epoch=0,
    )
    return [rows[i : i + micro] for rows in batches for i in range(0, len(rows), micro)]


def components_needed(peft: PeftConfig) -> int:
    """The most components EVA computes for a layer: its rank x rho (PEFT's `max_components`)."""
    ranks = [peft.r, *(peft.rank_pattern or {}).values()]
    return round(max(ranks) * (peft.eva_rho if peft.eva_rho is not None else EVA_DEFAULT_RHO))


def eva_batches(dataset: Any, micro_batches: list[list[int]], needed_tokens: int) -> list[list[int]]:
    """The micro batches with at least `needed_tokens` trained tokens (EVA's SVD reads the tokens
    whose label is not -100 and skips a batch with fewer rows than components), at most
    MAX_MICRO_BATCHES. Were none left, PEFT would skip every batch and cycle forever."""
    kept = []
    for rows in micro_batches:
        tokens = sum(
            sum(1 for label in labels if label != IGNORE_INDEX) for labels in dataset[rows]["labels"]
        )
        if tokens >= needed_tokens:
            kept.append(rows)
            if len(kept) == MAX_MICRO_BATCHES:
                break
    return kept


def eva_state_dict(peft_model: Any, dataset: Any, micro_batches: list[list[int]], pad_token_id: int) -> dict:
    """PEFT's EVA computation over `micro_batches` of `dataset` on this rank alone."""
    from peft.tuners.lora.eva import get_eva_state_dict
    from torch.utils.data import DataLoader

    from tunefleet.launch import hf_compat

    loader = DataLoader(
        dataset,
        batch_sampler=micro_batches,
        collate_fn=hf_compat.language_modeling_collator(pad_token_id, padding_free=False),
    )
    return get_eva_state_dict(peft_model, loader, gather_distributed_inputs=False, show_progress_bar=False)


def plan_batches(
    peft: PeftConfig, dataset: Any, *, batch: BatchPlan, steps_per_epoch: int, seed: int
) -> list[list[int]]:
    """The micro batches EVA will read; refused before any model loads when none will do."""
    needed = components_needed(peft)
    micro_batches = eva_batches(
        dataset,
        first_micro_batches(len(dataset), batch=batch, steps_per_epoch=steps_per_epoch, seed=seed),
        needed,
    )
    if not micro_batches:
        raise TunefleetError(
            f"peft.init=eva: EVA's SVD needs micro batches of at least {needed} trained tokens (the largest "
            "rank x peft.eva_rho), and no micro batch of the first epoch has that many",
            "raise batch.micro_batch_size, or lower peft.r / peft.eva_rho, or choose another peft.init",
        )
    return micro_batches


def initialize(peft_model: Any, dataset: Any, micro_batches: list[list[int]], *, pad_token_id: int) -> dict:
    """Compute EVA, keep rank 0's result on every rank, load it. Collective under a process group.

    Returns what plan.json records: the ranks EVA gave each adapted layer and every rank's digest."""
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    device = _device(peft_model)
    state = {
        name: u.cpu() for name, u in eva_state_dict(peft_model, dataset, micro_batches, pad_token_id).items()
    }
    state = _from_rank0(state)
    initialize_lora_eva_weights(peft_model, eva_state_dict={k: v.to(device) for k, v in state.items()})
    return {
        "micro_batches": len(micro_batches),
        "ranks": {name.removeprefix("base_model.model."): int(u.shape[0]) for name, u in state.items()},
        "digest_per_rank": agree(peft_model),
    }


def _device(model: Any) -> torch.device:
    return next(p.device for p in model.parameters() if p.device.type != "meta")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _from_rank0(state: dict) -> dict:
    if not _distributed():
        return state
    box = [state]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def adapter_digest(model: Any) -> str:
    """A hash of the trainable parameters' names, shapes and bytes."""
    h = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.requires_grad:
            h.update(f"{name}:{tuple(param.shape)}".encode())
            h.update(param.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def agree(model: Any) -> list[str]:
    """Every rank's adapter digest (collective); raises when the ranks hold different adapters."""
    digest = adapter_digest(model)
    if not _distributed():
        return [digest]
    digests: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(digests, digest)
    if len(set(digests)) > 1:
        raise TunefleetError(
            f"the ranks hold different adapters after the EVA initialisation (digests {digests})",
            "report this: every rank loads rank 0's EVA result, so they must agree",
        )
    return digests


def saved_config(checkpoint: str | Path) -> Any:
    """The LoraConfig a checkpoint of an EVA run was saved with (ranks as EVA set them), to build the
    same shapes on resume; the weights come from the checkpoint."""
    from peft import LoraConfig

    path = Path(checkpoint)
    if not (path / "adapter_config.json").is_file():
        raise TunefleetError(
            f"{path.name} has no adapter_config.json, which resuming an EVA run needs (the ranks EVA chose)",
            "resume from a checkpoint written by tunefleet, or start a new run (--overwrite)",
        )
    config = LoraConfig.from_pretrained(str(path))
    config.inference_mode = (
        False  # `init_lora_weights: eva` stays: B zero, A as built (replaced by the checkpoint's)
    )
    return config
