"""pytest plugin: the session-scoped `slurm_cluster` fixture (a real 4-node SLURM cluster).

Register it from tests/conftest.py with `pytest_plugins = ["tests.conftest_slurm"]`. Where the
cluster cannot run (not root, no apt) the tests that use it are skipped with the reason, except
under CI=true, where they fail instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.slurm_cluster import SlurmCluster, SlurmUnavailable
from tests.slurm_cluster import slurm_cluster as start_slurm_cluster


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slurm: runs jobs on a real SLURM cluster started on this machine")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """munged + slurmctld + slurmd n1..n4 (2 CPUs each), stopped by PID after the session."""
    cluster = start_slurm_cluster(nodes=4)
    try:
        running = cluster.__enter__()
    except SlurmUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the SLURM test cluster cannot start: {exc}")
        pytest.skip(f"no SLURM test cluster: {exc}")
    try:
        yield running
    finally:
        cluster.__exit__(None, None, None)
