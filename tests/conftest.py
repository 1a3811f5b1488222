"""Shared test set-up: hypothesis profiles, and the GPU marker's skip."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# CI: the same number of examples, derandomized so that a red run is reproducible.
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") == "true" else "default")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` skip, with the reason, where no CUDA device answers."""
    from gpunet.backend import probe_cuda

    found = probe_cuda()
    if found.available:
        return
    skip = pytest.mark.skip(reason=f"no CUDA device: {found.reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
