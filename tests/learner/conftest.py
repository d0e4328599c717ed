"""Fixtures of tests/learner: one tiny VLM folder per session, built from config (no downloads)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, int]]:
    """(model folder, special-token ids + vocab_size) of a tiny Qwen2.5-VL."""
    from learner_worlds import build_tiny_vlm

    path = tmp_path_factory.mktemp("tiny_vlm")
    ids = build_tiny_vlm(path)
    return str(path), ids


@pytest.fixture(scope="session")
def sft_world(small_paths, small_world, small_tiny):
    """(world paths, world, tiny model folder) of the small synthetic world: what the warm start trains on."""
    return small_paths, small_world, small_tiny
