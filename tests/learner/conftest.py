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
    from itertools import chain

    import torch

    from data.oracle import oracle_texts
    from data.world import WorldConfig, load_world, world_texts, write_world
    from models.tiny import TinyModelConfig, build_tiny_model

    torch.set_num_threads(1)
    paths = write_world(WorldConfig(num_entities=40, seed=3), tmp_path_factory.mktemp("sft-world"))
    world = load_world(paths)
    model = build_tiny_model(TinyModelConfig(), chain(world_texts(paths), oracle_texts(world, seed=0)),
                             tmp_path_factory.mktemp("sft-tiny"))
    return paths, world, model
