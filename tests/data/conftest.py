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
def small_tiny(small_paths, small_world, tmp_path_factory):
    """A tiny model folder whose tokenizer was trained on the small world (for the oracle trajectories)."""
    from itertools import chain

    import torch

    from data.oracle import oracle_texts
    from data.world import world_texts
    from models.tiny import TinyModelConfig, build_tiny_model

    torch.set_num_threads(1)
    texts = chain(world_texts(small_paths), oracle_texts(small_world, seed=0))
    return build_tiny_model(TinyModelConfig(), texts, tmp_path_factory.mktemp("tiny"))
