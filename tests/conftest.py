"""Shared test setup: offline Hugging Face stack, the GPU marker, the demo model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing in the test suite may touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

REPO = Path(__file__).resolve().parent.parent

pytest_plugins = ["tests.conftest_slurm"]  # the real SLURM cluster fixture (tests/slurm_cluster.py)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (NCCL / CUDA kernels); none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The built-in demo model (built once, cached under $TUNEFLEET_CACHE or ~/.cache/tunefleet)."""
    from tunefleet.distributed.demo_model import ensure_tiny_llama

    return ensure_tiny_llama()


@pytest.fixture(scope="session")
def launched(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    """Training runs launched once per session and shared by the tests that assert on them
    (tests/launched.py). `tiny_model_dir`: the demo model is built once here, not raced for."""
    from tests.launched import Launched

    return Launched(tmp_path_factory.mktemp("launched"))
