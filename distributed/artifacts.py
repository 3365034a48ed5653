"""Find what a run left behind: its resolved recipe and the adapter to merge or generate with.

`find_adapter(path)` is the one place that knows the layout of a run directory, so `tunefleet
merge` and `tunefleet generate` accept the same things:

* a run directory (holds `recipe.yaml`): its `final/` adapter, else its newest usable checkpoint;
* a `final/` directory, or a `checkpoint-N/` directory: that adapter; the recipe is read from the
  run directory above it.

Which checkpoint is usable is the checkpoint format's one rule (`checkpoints.problem` and `scan`:
marker, manifest, sizes and checksums), the same that resume applies: a checkpoint resume would
refuse is refused here too, or passed over for an older one, saying so (`RunAdapter.note`). FSDP
checkpoints hold `torch.distributed.checkpoint` shards (`*.distcp`, for resuming) and, next to
them, the adapter gathered from the shards (`final_adapter.save_checkpoint_adapter`): that adapter
is the one used. A sharded checkpoint without it (written before tunefleet gathered one) is refused
with an explanation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunefleet.launch.core import checkpoints as ckpt
from tunefleet.launch.core.errors import TunefleetError
from tunefleet.launch.core.layout import FINAL_DIR, RESOLVED_RECIPE
from tunefleet.launch.core.recipe import Recipe

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True, kw_only=True)
class RunAdapter:
    """An adapter directory and the run it belongs to."""

    run_dir: Path
    """The run's output directory (holds recipe.yaml)."""
    adapter_dir: Path
    """Directory holding adapter_config.json and the adapter weights (and usually the tokenizer), or,
    for `kind` model, the whole model."""
    recipe: Recipe
    """The resolved recipe the run was trained with."""

    note: str | None = None
    """Newer checkpoints passed over because they cannot be used, and why (printed by the commands)."""
    kind: str = "adapter"
    """`adapter` (a PEFT adapter over the recipe's base model) or `model` (a whole model: the final/
    of a full or partial fine-tune, or a one-process checkpoint of one)."""

    @property
    def label(self) -> str:
        """`final` or `checkpoint-N`, for messages."""
        return self.adapter_dir.name


def has_adapter(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() and any((path / w).is_file() for w in ADAPTER_WEIGHTS)


MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def has_model(path: Path) -> bool:
    """A whole model `from_pretrained` loads: config.json and its safetensors (one file, or an index)."""
    return (path / "config.json").is_file() and any((path / w).is_file() for w in MODEL_WEIGHTS)


def _sharded_weights_error(path: Path) -> TunefleetError:
    return TunefleetError(
        f"{path} holds the sharded training state of a full or partial fine-tune (each rank's shard), "
        "not a model that loads on its own",
        "use the run's final/ once it has finished (the model is exported from the shards there), or a "
        "checkpoint of a one-process or ddp run",
    )


def _is_sharded(path: Path) -> bool:
    return path.is_dir() and next(path.rglob("*.distcp"), None) is not None


def _sharded_error(path: Path) -> TunefleetError:
    return TunefleetError(
        f"{path} is a sharded FSDP checkpoint (*.distcp) without the gathered adapter "
        "(adapter_model.safetensors; written by an older tunefleet)",
        "use the run's final/ adapter or a newer checkpoint, or convert this one to one file with "
        "torch.distributed.checkpoint.format_utils.dcp_to_torch_save and save it as a PEFT adapter",
    )


def _load_recipe(run_dir: Path) -> Recipe:
    from tunefleet.launch.core import recipe as recipe_mod

    return recipe_mod.load(run_dir / RESOLVED_RECIPE)


def _run_adapter(run_dir: Path) -> tuple[Path, str | None]:
    """A run directory's `final/` adapter (or model), else its newest usable checkpoint (and what was
    passed over)."""
    final = run_dir / FINAL_DIR
    if has_adapter(final) or has_model(final):
        return final, None
    scanned = ckpt.scan(run_dir).for_weights()  # a checkpoint whose optimizer state was removed serves
    if scanned.usable is None:
        if scanned.passed_over:
            raise TunefleetError(
                f"run {str(run_dir)!r} has no {FINAL_DIR}/ adapter, and no checkpoint can be used: {scanned.note()}",
                "restore the checkpoint's files from a backup, or train the run further",
            )
        raise TunefleetError(
            f"run {str(run_dir)!r} has no {FINAL_DIR}/ adapter and no complete checkpoint",
            "train it (or let it reach its first checkpoint) first",
        )
    if not has_adapter(scanned.usable) and not has_model(scanned.usable):
        if _trains_weights(run_dir):
            raise _sharded_weights_error(scanned.usable)
        if _is_sharded(scanned.usable):
            raise _sharded_error(scanned.usable)
        raise TunefleetError(
            f"{scanned.usable} holds no adapter ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS[0]})",
            f"use the run's {FINAL_DIR}/ once it has finished",
        )
    return scanned.usable, scanned.note()


def find_adapter(path: str | Path) -> RunAdapter:
    """Resolve a run directory, a `final/` directory or a checkpoint directory (see the module doc)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise TunefleetError(
            f"{str(path)!r} is not a directory",
            "pass a run's output_dir, its final/ directory or one of its checkpoint-N directories",
        )
    if (path / RESOLVED_RECIPE).is_file():  # a run directory
        adapter, note = _run_adapter(path)
        return RunAdapter(
            run_dir=path, adapter_dir=adapter, recipe=_load_recipe(path), note=note, kind=_kind(adapter)
        )
    if ckpt.is_checkpoint_name(path.name) or (path / ckpt.MANIFEST).is_file():
        why = ckpt.problem(path)
        if why is not None:
            raise TunefleetError(
                f"checkpoint {str(path)!r} cannot be used: {why} (resume would refuse it too)",
                "use an older checkpoint, or the run directory (its newest usable checkpoint)",
            )
    if not has_adapter(path) and not has_model(path):
        if (path.parent / RESOLVED_RECIPE).is_file() and _trains_weights(path.parent):
            raise _sharded_weights_error(path)
        if _is_sharded(path):
            raise _sharded_error(path)
        raise TunefleetError(
            f"{str(path)!r} is neither a run directory ({RESOLVED_RECIPE}) nor an adapter directory "
            f"({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS[0]})",
            "pass a run's output_dir, its final/ directory or one of its checkpoint-N directories",
        )
    run_dir = path.parent
    if not (run_dir / RESOLVED_RECIPE).is_file():
        raise TunefleetError(
            f"no {RESOLVED_RECIPE} next to {str(path)!r} (looked in {str(run_dir)!r})",
            "pass a final/ or checkpoint directory that is still inside its run directory",
        )
    return RunAdapter(run_dir=run_dir, adapter_dir=path, recipe=_load_recipe(run_dir), kind=_kind(path))


def _kind(path: Path) -> str:
    return "adapter" if has_adapter(path) else "model"


def _trains_weights(run_dir: Path) -> bool:
    from tunefleet.launch.core.recipe import WEIGHT_METHODS

    return _load_recipe(run_dir).peft.method in WEIGHT_METHODS
