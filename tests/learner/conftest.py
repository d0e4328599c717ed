"""Fixtures of tests/learner: one tiny VLM folder per session, built from config (no downloads)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, int]]:
    """(model folder, special-token ids + vocab_size) of a tiny Qwen2.5-VL."""
    import torch

    from learner_worlds import build_tiny_vlm

    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("tiny_vlm")
    ids = build_tiny_vlm(path)
    return str(path), ids


@pytest.fixture(scope="session")
def sft_world(tmp_path_factory: pytest.TempPathFactory):
    """(world paths, world, tiny model folder) of a small synthetic world: what the warm start trains on."""
    import torch

    from data.world import WorldConfig, load_world, write_world
    from models.ensure import build_world_model
    from models.tiny import TinyModelConfig

    torch.set_num_threads(1)
    paths = write_world(WorldConfig(num_entities=40, seed=3), tmp_path_factory.mktemp("sft-world"))
    return paths, load_world(paths), build_world_model(TinyModelConfig(), paths, tmp_path_factory.mktemp("sft-tiny"))
