"""Fixtures for the launcher's tests: a tiny random model folder built once per session (~5 s)."""
from __future__ import annotations

from pathlib import Path

import pytest

WORDS = ("red blue green circle square star lamp river city maker year name object image what which who made "
         "answer reason search text information the a of in by").split()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import random

    from models.tiny import TinyModelConfig, build_tiny_model

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)]
    return build_tiny_model(TinyModelConfig(vocab_size=400, tokenizer_min_frequency=2), corpus,
                            tmp_path_factory.mktemp("tiny") / "model")
