"""Shared fixtures: one local Ray instance for the whole test session."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "token")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture()
def tmp_runs(tmp_path):
    """An output folder and a partition cache folder private to one test."""
    return tmp_path
