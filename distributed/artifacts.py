"""Find what a run left behind: its resolved recipe and the adapter to merge or generate with.

`find_adapter(path)` is the one place that knows the layout of a run directory, so `tunefleet
merge` and `tunefleet generate` accept the same things:

* a run directory (holds `recipe.yaml`): its `final/` adapter, else its newest complete checkpoint;
* a `final/` directory, or a `checkpoint-N/` directory: that adapter; the recipe is read from the
  run directory above it.

A checkpoint counts when it holds the adapter weights and, when it has a manifest (tunefleet's
atomic checkpoints, `distributed/checkpoint.py`), when that checkpoint is complete. FSDP
checkpoints hold `torch.distributed.checkpoint` shards (`*.distcp`, for resuming) and, next to them,
the adapter gathered from the shards (`final_adapter.save_checkpoint_adapter`): that adapter is the
one used. A sharded checkpoint without it (written before tunefleet gathered one) is refused with
an explanation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tunefleet.launch.core import checkpoints as ckpt
from tunefleet.launch.core.errors import TunefleetError
from tunefleet.launch.core.layout import FINAL_DIR, RESOLVED_RECIPE
from tunefleet.launch.core.recipe import Recipe

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")


@dataclass(frozen=True, kw_only=True)
class RunAdapter:
    """An adapter directory and the run it belongs to."""

    run_dir: Path
    """The run's output directory (holds recipe.yaml)."""
    adapter_dir: Path
    """Directory holding adapter_config.json and the adapter weights (and usually the tokenizer)."""
    recipe: Recipe
    """The resolved recipe the run was trained with."""

    @property
    def label(self) -> str:
        """`final` or `checkpoint-N`, for messages."""
        return self.adapter_dir.name


def has_adapter(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() and any((path / w).is_file() for w in ADAPTER_WEIGHTS)


def _is_sharded(path: Path) -> bool:
    return path.is_dir() and next(path.rglob("*.distcp"), None) is not None


def usable_checkpoint(path: Path) -> bool:
    """Holds the adapter weights and, if it is an atomic tunefleet checkpoint, is complete."""
    if not has_adapter(path):
        return False
    return ckpt.is_complete(path) if (path / ckpt.MANIFEST).exists() else True


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint directories (complete or not), newest first."""
    found = [p for p in run_dir.iterdir() if p.is_dir() and _CHECKPOINT_RE.fullmatch(p.name)]
    return sorted(found, key=ckpt.step_of, reverse=True)


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


def find_adapter(path: str | Path) -> RunAdapter:
    """Resolve a run directory, a `final/` directory or a checkpoint directory (see the module doc)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise TunefleetError(
            f"{str(path)!r} is not a directory",
            "pass a run's output_dir, its final/ directory or one of its checkpoint-N directories",
        )
    if (path / RESOLVED_RECIPE).is_file():  # a run directory
        run_dir = path
        final = path / FINAL_DIR
        if has_adapter(final):
            adapter = final
        else:
            candidates = checkpoints(path)
            usable = [c for c in candidates if usable_checkpoint(c)]
            if usable:
                adapter = usable[0]
            elif any(_is_sharded(c) for c in candidates):
                raise _sharded_error(next(c for c in candidates if _is_sharded(c)))
            else:
                raise TunefleetError(
                    f"run {str(path)!r} has no {FINAL_DIR}/ adapter and no complete checkpoint",
                    "train it (or let it reach its first checkpoint) first",
                )
    else:
        if not has_adapter(path):
            if _is_sharded(path):
                raise _sharded_error(path)
            raise TunefleetError(
                f"{str(path)!r} is neither a run directory ({RESOLVED_RECIPE}) nor an adapter directory "
                f"({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS[0]})",
                "pass a run's output_dir, its final/ directory or one of its checkpoint-N directories",
            )
        if _CHECKPOINT_RE.fullmatch(path.name) and not usable_checkpoint(path):
            raise TunefleetError(
                f"checkpoint {str(path)!r} is incomplete (its manifest does not match its files)",
                "use an older checkpoint or the run directory (newest complete one)",
            )
        run_dir = path.parent
        adapter = path
        if not (run_dir / RESOLVED_RECIPE).is_file():
            raise TunefleetError(
                f"no {RESOLVED_RECIPE} next to {str(path)!r} (looked in {str(run_dir)!r})",
                "pass a final/ or checkpoint directory that is still inside its run directory",
            )
    return RunAdapter(run_dir=run_dir, adapter_dir=adapter, recipe=_load_recipe(run_dir))
