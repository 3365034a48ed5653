"""The start-up checks: one function that `tunefleet train` (every rank), `tunefleet launch` and
`tunefleet slurm` run before anything is written or loaded.

`preflight(recipe, hw, options)` resolves the recipe for the hardware (the compatibility
matrix: forbidden combinations stop here, silently required settings are filled in and noted),
derives the batch plan for the world size (accumulation; numbers that do not divide are refused),
decides what happens to the output directory (fresh, overwrite, resume from which checkpoint;
a finished or foreign run is refused), checks that the checkpoint can be continued by this recipe
on this world size, and that the trackers it reports to are installed. Nothing is written.
No torch.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from tunefleet.launch import compat
from tunefleet.launch.core import rundir
from tunefleet.launch.core.args import StartOptions
from tunefleet.launch.core.batch import BatchPlan, plan_batch
from tunefleet.launch.core.data_identity import data_fingerprint
from tunefleet.launch.core.errors import TunefleetError
from tunefleet.launch.core.hardware import Hardware
from tunefleet.launch.core.recipe import WEIGHT_METHODS, Recipe

TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install wandb"),
    "mlflow": ("mlflow", "pip install mlflow"),
}
"""`train.report_to` name -> (the package it needs, how to install it)."""

KERNEL_PACKAGES = {
    "flash_attention_2": ("flash_attn", "pip install flash-attn --no-build-isolation"),
    "flash_attention_3": ("flash_attn_interface", "build flash-attention 3 from its repository (hopper/)"),
    "liger_kernel": ("liger_kernel", "pip install liger-kernel"),
}
"""GPU kernels a recipe can ask for -> (the module that provides it, how to install it)."""


@dataclass(frozen=True, kw_only=True)
class Preflight:
    """What the checks decided: the run as it will be carried out."""

    recipe: Recipe
    """The recipe resolved for the hardware (compat adjustments applied)."""

    hw: Hardware
    batch: BatchPlan
    """Micro batch x accumulation x world size = global batch, on this hardware."""

    notes: list[str]
    """One line per setting the compatibility matrix filled in or changed."""

    start: rundir.Start
    """fresh / overwrite / resume, and the checkpoint a resume continues from."""

    resume_notes: list[str]
    """Harmless changes since that checkpoint (world size, micro batch, logging, ...)."""

    data_fingerprint: str
    """The data's bytes, recorded in every checkpoint (`core/data_identity.py`)."""

    warnings: list[str]
    """Settings that run, but probably not as meant (`recipe_warnings`)."""


MAX_PLAUSIBLE_LR = 0.1
"""Above this a LoRA fine-tune diverges: the seeds use 1e-4 to 3e-4, the demo 3e-3."""

MAX_PLAUSIBLE_FULL_LR = 1e-3
"""Above this full (or partial) fine-tuning almost surely diverges: its usual range is 1e-5 to 5e-5."""


def recipe_warnings(recipe: Recipe) -> list[str]:
    """Values that are valid but almost certainly not meant. (What needs the model's config, like a
    data.max_length beyond its context, is checked where the config is read: `plan.build_plan`.)"""
    warnings = []
    if recipe.train.lr > MAX_PLAUSIBLE_LR:
        warnings.append(
            f"train.lr={recipe.train.lr:g} is far above the learning rates LoRA fine-tuning uses (1e-5 to 1e-2; "
            "the seeds use 1e-4 to 3e-4): expect the loss to diverge"
        )
    p, m = recipe.peft, recipe.model
    if p.method in WEIGHT_METHODS and m.dtype in ("bfloat16", "float16"):
        warnings.append(
            f"model.dtype={m.dtype} with peft.method={p.method}: the trained weights and AdamW's state are kept "
            f"in {m.dtype} (pure 16-bit training), where updates smaller than the weight's last bit are lost and "
            "the loss stalls; leave model.dtype auto for fp32 master weights with 16-bit compute"
        )
    if p.method in WEIGHT_METHODS and recipe.train.lr > MAX_PLAUSIBLE_FULL_LR:
        warnings.append(
            f"train.lr={recipe.train.lr:g} with peft.method={p.method}: full and partial fine-tuning use ~1e-5 to "
            "5e-5 (torchtune, axolotl); an adapter's learning rate moves every weight far: expect divergence"
        )
    return warnings


def check_trackers(report_to: list[str]) -> None:
    """Fail before any model is loaded when a listed tracker's package is missing."""
    for name in report_to:
        module, install = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise TunefleetError(
                f"train.report_to lists {name}, but the {module} package is not installed",
                f"{install}, or remove {name} from train.report_to",
            )


def check_kernels(recipe: Recipe) -> None:
    """Fail before any model is loaded when an asked-for GPU kernel's package is missing."""
    asked = [recipe.model.attn_implementation] + (["liger_kernel"] if recipe.train.liger_kernel else [])
    for name in asked:
        if name not in KERNEL_PACKAGES:
            continue
        module, install = KERNEL_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            key = "train.liger_kernel" if name == "liger_kernel" else "model.attn_implementation"
            raise TunefleetError(
                f"{key} asks for {name}, but the {module} package is not installed",
                f"{install}, or drop {key}",
            )


def batch_plan(recipe: Recipe, *, world_size: int, procs_per_node: int | None = None) -> BatchPlan:
    """The one batch plan of a recipe on `world_size` processes: every run computes it once, here
    (in its start-up check), and hands it on (plan.json, the checkpoint manifests, the sampler, the
    resume check); `tunefleet plan` and `tunefleet slurm` compute it with this function too. The
    recipe's global batch is in samples once loaded; `target` keeps which one the user set."""
    b = recipe.batch
    return plan_batch(
        micro_batch_size=b.micro_batch_size,
        global_batch_size=b.global_batch_size,
        max_length=recipe.data.max_length,
        world_size=world_size,
        procs_per_node=procs_per_node,
        target="tokens" if b.global_batch_tokens is not None else "samples",
    )


def preflight(
    recipe: Recipe, hw: Hardware, options: StartOptions, *, decided: rundir.Start | None = None
) -> Preflight:
    """Run every start-up check (see the module doc); raise TunefleetError on the first failure.
    `decided`: how the run starts, as the launcher decided it (the ranks do not scan again)."""
    resolved, notes = compat.resolve_with_notes(recipe, hw)
    batch = batch_plan(
        resolved,
        world_size=hw.num_processes,
        procs_per_node=hw.procs_per_machine if hw.num_machines > 1 else None,
    )
    rundir.check_output_location(resolved)
    start = decided or rundir.decide_start(Path(resolved.output_dir), options)
    data = data_fingerprint(resolved.data)
    resume_notes = rundir.check_resume(start.checkpoint, resolved, batch, data) if start.checkpoint else []
    check_trackers(list(resolved.train.report_to))
    check_kernels(resolved)
    return Preflight(
        recipe=resolved,
        hw=hw,
        batch=batch,
        notes=notes,
        start=start,
        resume_notes=resume_notes,
        data_fingerprint=data,
        warnings=recipe_warnings(resolved),
    )
