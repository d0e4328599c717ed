"""Fixtures and settings every test folder shares (folder conftests add only their own): offline Hugging Face
hubs, one torch thread per process (the box has 2 cores shared with other runs), and one small synthetic world
with a tiny model built for it, made once per session. Puts tests/ on the import path, so `testkit` (shared
helpers) imports from anywhere."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def small_paths(tmp_path_factory: pytest.TempPathFactory):
    """A small synthetic world (40 entities, seed 3) written once per session: data.world.WorldPaths."""
    from data.world import WorldConfig, write_world

    return write_world(WorldConfig(num_entities=40, seed=3), tmp_path_factory.mktemp("small-world"))


@pytest.fixture(scope="session")
def small_world(small_paths):
    from data.world import load_world

    return load_world(small_paths)


@pytest.fixture(scope="session")
def small_tiny(small_paths, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model folder for the small world: its tokenizer trained on the world's texts and oracle phrases."""
    from models.ensure import build_world_model
    from models.tiny import TinyModelConfig

    return build_world_model(TinyModelConfig(), small_paths, tmp_path_factory.mktemp("tiny"))
