"""Start-up refusals that need no training: storage not shared by all ranks, int8 on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunefleet.launch.core import checkpoints as ckpt
from tunefleet.launch.core import recipe as R
from tunefleet.launch.core.errors import RecipeError, TunefleetError


def test_shared_storage_passes_when_every_probe_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    probe_dir = tmp_path / ".tunefleet-probe"
    probe_dir.mkdir()
    (probe_dir / "job7-1").write_text("1")  # rank 1's probe, written on the same shared directory
    ckpt.check_shared_storage(tmp_path, rank=0, world_size=2, barrier=lambda: None)
    assert not probe_dir.exists()  # rank 0 cleans up


def test_node_local_storage_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 on its own disk never sees rank 1's probe: a clear error, not split checkpoints."""
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(TunefleetError, match="not shared by all ranks: rank 0 sees 1 of 2"):
        ckpt.check_shared_storage(tmp_path, rank=0, world_size=2, barrier=lambda: None)


def test_int8_on_cpu_is_refused_before_loading() -> None:
    import torch

    from tunefleet.distributed import model as model_mod

    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without a GPU")
    recipe = R.from_dict(
        {"output_dir": "o", "model": {"name_or_path": "m", "quantization": "int8"}, "data": {"path": "d"}}
    )
    precision = model_mod.resolve_precision(recipe)
    with pytest.raises(RecipeError, match="int8.*no CPU kernels"):
        model_mod.quantization_config(recipe.model, precision)
