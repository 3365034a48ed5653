"""Checkpoints written by the real format code (`checkpoints.finalize`), without training: for the
tests of the format, of resume decisions and of the commands that pick a checkpoint."""

from __future__ import annotations

from pathlib import Path

from tunefleet.launch.core import checkpoints as ckpt

IDENTITY = ckpt.RunIdentity(
    recipe={"batch": {"global_batch_size": 8}},
    recipe_hash="test",
    world_size=1,
    strategy="single",
    batch_plan={"global_batch_size": 8},
    data_fingerprint=None,
)


def manifest(step: int, **changes: object) -> ckpt.Manifest:
    """A manifest as the trainer makes it (files and checksums: `finalize` adds them)."""
    import dataclasses

    made = ckpt.Manifest.for_step(IDENTITY, step=step, steps_per_epoch=5, tokens_seen=0, save_s=0.01)
    return dataclasses.replace(made, **changes)  # type: ignore[arg-type]


def write_checkpoint(run: Path, step: int, files: dict[str, bytes] | None = None, **changes: object) -> Path:
    """`run/checkpoint-<step>`, complete, holding `files` (an adapter and an optimizer by default)."""
    tmp = ckpt.tmp_dir_for(run, step)
    tmp.mkdir(parents=True)
    for rel, data in (
        files or {"adapter_model.safetensors": b"w" * 100, "sub/optimizer.pt": b"o" * 50}
    ).items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
    final = ckpt.dir_for(run, step)
    ckpt.finalize(tmp, final, manifest(step, **changes))
    return final
