"""Fixtures for the actors' tests: tiny models built once per session in pytest's temp folder."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random-init tiny Qwen2.5-VL (~5 s to build)."""
    from actors_helpers import build_model

    return build_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def taught_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny Qwen2.5-VL after ~15 s of SFT on scripted image -> text -> answer episodes (emits the tags)."""
    from actors_helpers import build_model, teach_episode_format

    model_dir = build_model(tmp_path_factory.mktemp("taught") / "model", prompt="mmsearch_r1")
    teach_episode_format(model_dir, steps=300)
    return model_dir


@pytest.fixture(scope="session")
def episode_tokenizer(tiny_model_dir: Path):
    from episode.tokenizer import EpisodeTokenizer

    return EpisodeTokenizer.from_pretrained(tiny_model_dir)
