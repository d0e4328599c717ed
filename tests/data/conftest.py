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


@pytest.fixture(scope="session")
def small_tiny(small_paths, tmp_path_factory):
    """A tiny model folder whose tokenizer was trained on the small world (for the oracle trajectories)."""
    import torch

    from models.ensure import build_world_model
    from models.tiny import TinyModelConfig

    torch.set_num_threads(1)
    return build_world_model(TinyModelConfig(), small_paths, tmp_path_factory.mktemp("tiny"))
