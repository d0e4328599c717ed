"""The learner's conf/ files parse into the typed configs, and bad values fail with the offending value."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from learner.config import AlgoConfig, LearnerConfig

CONF = Path(__file__).resolve().parents[2] / "conf"


def test_conf_files_build_the_typed_configs_with_every_field_set() -> None:
    from learner.cli import load_group

    learner_yaml = load_group(CONF / "learner" / "fsdp_cpu.yaml")  # seed: ${run.seed}
    algo_yaml = yaml.safe_load((CONF / "algo" / "grpo.yaml").read_text())
    learner, algo = LearnerConfig.from_dict(learner_yaml), AlgoConfig.from_dict(algo_yaml)
    assert set(learner_yaml) == set(LearnerConfig.__dataclass_fields__)
    assert set(algo_yaml) == set(AlgoConfig.__dataclass_fields__)
    assert learner.adam_betas == (0.9, 0.999) and algo.dual_clip is None and algo.needs_proximal
    assert not algo.needs_reference and algo.stale_policy == "drop_counted" and learner.weight_transport == "zmq"
    assert not learner.packing and learner.checkpoint_dir is None and learner.resume_from is None


@pytest.mark.parametrize("values, match", [
    ({"backend": "mpi"}, "backend"), ({"precision": "fp8"}, "precision"), ({"lr": 0}, "lr>0"),
    ({"micro_batch_tokens": 0}, "micro_batch_tokens"), ({"publish_dtype": "int8"}, "publish_dtype"),
    ({"wrld_size": 2}, "unknown LearnerConfig keys"), ({"lr_schedule": "step"}, "lr_schedule"),
    ({"min_lr_ratio": 1.5}, "min_lr_ratio"), ({"weight_transport": "rdma"}, "weight_transport"),
    ({"weight_transport": "fs"}, "weight_dir"), ({"checkpoint_every": 5}, "checkpoint_dir"),
    ({"resume_from": "latest"}, "checkpoint_dir"), ({"checkpoint_keep": 0}, "checkpoint_keep"),
    ({"nccl_engine_ranks": 0}, "nccl_engine_ranks"),
])
def test_bad_learner_values_raise(values: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LearnerConfig.from_dict(values)


@pytest.mark.parametrize("values, match", [
    ({"agg": "sum"}, "agg"), ({"clip_low": 1.0}, "clip_low"), ({"mis_low": 2.0, "mis_high": 1.0}, "mis_low"),
    ({"is_cap": 0.0}, "is_cap"), ({"groups_per_step": 0}, "groups_per_step"),
    ({"kl_kind": "k4"}, "kl_kind"), ({"kl_coef": -0.1}, "kl_coef"), ({"stale_policy": "ignore"}, "stale_policy"),
])
def test_bad_algo_values_raise(values: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AlgoConfig.from_dict(values)
