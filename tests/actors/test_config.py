"""ActorConfig from plain dicts: conf/actors/vllm_cpu.yaml, the launch.py shape, and bad keys/values."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from actors.config import ActorConfig

CONF = Path(__file__).resolve().parents[2] / "conf" / "actors" / "vllm_cpu.yaml"


def test_yaml_builds_and_algo_supplies_group_size():
    raw = OmegaConf.load(CONF)
    raw.cache_dir = "/tmp/cache"  # stands in for ${run.cache_dir}
    actors = OmegaConf.to_container(raw, resolve=True)
    cfg = ActorConfig.from_dict({"actors": actors, "algo": {"group_size": 6}})
    assert cfg.group_size == 6 and cfg.episode.max_turns == 4 and cfg.engine.kv_cache_gib == 1.0
    assert cfg.episode.max_images == 1 + cfg.episode.max_image_searches * cfg.episode.max_results
    assert ActorConfig.from_dict(actors).group_size == 4  # flat form: the default


def test_unknown_and_invalid_values_fail_loudly():
    with pytest.raises(ValueError, match="max_turn"):
        ActorConfig.from_dict({"episode": {"max_turn": 3}})
    with pytest.raises(ValueError, match="unknown actors config keys"):
        ActorConfig.from_dict({"temperature": 1.0})
    with pytest.raises(ValueError, match="positive"):
        ActorConfig.from_dict({"episode": {"max_turns": 0}})
    with pytest.raises(ValueError, match="sampling"):
        ActorConfig.from_dict({"sampling": {"top_p": 0.0}})
    with pytest.raises(ValueError, match="logprobs_mode"):
        ActorConfig.from_dict({"engine": {"logprobs_mode": "raw_logits"}})
    with pytest.raises(ValueError, match="mapping"):
        ActorConfig.from_dict({"engine": 3})
