"""Fixtures for tests/models: a small world and a tiny model built from it, once per session."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data.world import WorldConfig, WorldPaths, load_world, write_world

SMALL = WorldConfig(num_entities=40, seed=3)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    torch.set_num_threads(1)  # the box has 2 cores shared with other test runs


@pytest.fixture(scope="session")
def small_paths(tmp_path_factory) -> WorldPaths:
    return write_world(SMALL, tmp_path_factory.mktemp("small-world"))


@pytest.fixture(scope="session")
def small_world(small_paths):
    return load_world(small_paths)


@pytest.fixture(scope="session")
def tiny_dir(small_paths, tmp_path_factory) -> Path:
    from models.ensure import build_world_model
    from models.tiny import TinyModelConfig

    return build_world_model(TinyModelConfig(), small_paths, tmp_path_factory.mktemp("tiny"))
