"""ActorConfig from plain dicts: conf/actors/vllm_cpu.yaml, the launch.py shape, and bad keys/values."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from actors.config import ActorConfig

CONF = Path(__file__).resolve().parents[2] / "conf" / "actors" / "vllm_cpu.yaml"


def test_yaml_builds_and_algo_supplies_group_size():
    # the interpolations (${run.cache_dir}, ${algo.temperature}) resolve against the composed config
    root = OmegaConf.create({"actors": OmegaConf.load(CONF), "run": {"cache_dir": "/tmp/cache", "seed": 0},
                             "algo": {"temperature": 0.7, "group_size": 6}})
    actors = OmegaConf.to_container(root, resolve=True)["actors"]
    cfg = ActorConfig.from_dict({"actors": actors, "algo": {"group_size": 6}})
    assert cfg.group_size == 6 and cfg.episode.max_turns == 4 and cfg.engine.kv_cache_gib == 1.0
    assert cfg.episode.max_images == 1 + cfg.episode.max_image_searches * cfg.episode.max_results
    assert cfg.reward.valid_patterns == ("answer", "image,answer", "text,answer", "image,text,answer")
    assert cfg.reward.penalty_mode == "any" and cfg.spool_max_groups >= cfg.max_groups_in_flight
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
    with pytest.raises(ValueError, match="penalty_mode"):
        ActorConfig.from_dict({"reward": {"penalty_mode": "cubic"}})
    with pytest.raises(ValueError, match="spool_max_groups"):
        ActorConfig.from_dict({"spool_max_groups": 1, "max_groups_in_flight": 2})
    with pytest.raises(ValueError, match="on_search_over_limit"):
        ActorConfig.from_dict({"episode": {"on_search_over_limit": "ignore"}})
    with pytest.raises(ValueError, match="long_query"):
        ActorConfig.from_dict({"episode": {"long_query": "drop"}})
