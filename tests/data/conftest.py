"""Fixtures for tests/data: a small world written once per session."""
from __future__ import annotations

import pytest

from data.world import WorldConfig, WorldPaths, load_world, write_world

SMALL = WorldConfig(num_entities=40, seed=3)


@pytest.fixture(scope="session")
def small_paths(tmp_path_factory) -> WorldPaths:
    return write_world(SMALL, tmp_path_factory.mktemp("small-world"))


@pytest.fixture(scope="session")
def small_world(small_paths):
    return load_world(small_paths)
