"""The warm start as the launcher orchestrates it: the learner's SFT on top of the tiny base model, cached beside it
and reused; bad SFT settings fail before anything is built; conf/ defaults match the dataclasses."""
from __future__ import annotations

import dataclasses
import json

import pytest

from launcher.warm_start import ensure_model, sft_config, warm_start_cached
from models.ensure import BUILD_INFO, ModelConfig


def test_warm_started_model_is_cached_beside_its_base(tmp_path, small_paths):
    """The warm start is the learner's SFT (real FSDP2 rank, spawned); its result is cached and reused."""
    cfg = ModelConfig(sft={"steps": 2, "vision_steps": 1, "batch_size": 2})
    assert not warm_start_cached(cfg, small_paths, tmp_path)
    warm = ensure_model(cfg, small_paths, tmp_path)
    info = json.loads((warm / BUILD_INFO).read_text())
    assert info["kind"] == "tiny-warm" and info["report"]["steps"] == 2 and info["sft"]["steps"] == 2
    assert (tmp_path / info["base"] / "config.json").is_file()
    assert (warm / "model.safetensors").is_file() and (warm / "tokenizer.json").is_file()
    assert warm_start_cached(cfg, small_paths, tmp_path)
    rerun = lambda *a, **k: pytest.fail("warm start rerun")  # noqa: E731
    assert ensure_model(cfg, small_paths, tmp_path, runner=rerun) == warm
    # Other SFT settings are another cache entry, built by the runner given.
    calls = []

    def runner(base, world_root, out, cfg_, dtype):
        calls.append((base, cfg_["sft"]["steps"], dtype, cfg_["learner"]["world_size"]))
        (out / "config.json").write_text("{}")
        return {"steps": cfg_["sft"]["steps"]}

    learner = {"world_size": 2, "threads": 1}
    other = ensure_model(ModelConfig(sft={"steps": 3, "vision_steps": 1}), small_paths, tmp_path, learner, runner)
    assert other != warm and calls == [(tmp_path / info["base"], 3, "float32", 1)]  # warm_start_ranks: 1
    ensure_model(ModelConfig(sft={"steps": 4, "vision_steps": 1}, warm_start_ranks=None), small_paths, tmp_path,
                 learner, runner)
    assert calls[-1][3] == 2  # null: the learner's world size
    with pytest.raises(ValueError, match="warm_start_ranks"):
        ensure_model(ModelConfig(warm_start_ranks=0), small_paths, tmp_path)


def test_bad_sft_settings_are_rejected_before_anything_is_built(tmp_path, small_paths):
    with pytest.raises(ValueError, match="vision_steps"):
        ensure_model(ModelConfig(sft={"steps": 2, "vision_steps": 3}), small_paths, tmp_path)
    with pytest.raises(ValueError, match="stpes"):
        ensure_model(ModelConfig(sft={"stpes": 2}), small_paths, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_yaml_defaults_match_the_dataclasses():
    from pathlib import Path

    import yaml

    from data.world import WorldConfig

    root = Path(__file__).resolve().parents[2]
    model_yaml = yaml.safe_load((root / "conf/model/tiny.yaml").read_text())
    assert model_yaml.pop("defaults") == [{"/algo@sft": "sft"}, "_self_"]  # model.sft = conf/algo/sft.yaml
    from omegaconf import OmegaConf

    # the oracle's simulated tools follow conf/tool_servers (interpolated), here the local tools of the default run
    tools = yaml.safe_load((root / "conf/tool_servers/local.yaml").read_text())
    tree = OmegaConf.create({"tool_servers": tools, "sft": yaml.safe_load((root / "conf/algo/sft.yaml").read_text())})
    sft_yaml = OmegaConf.to_container(tree, resolve=True)["sft"]
    assert ModelConfig.from_dict(model_yaml) == ModelConfig()
    assert sft_config(ModelConfig.from_dict({**model_yaml, "sft": sft_yaml})) == sft_config(ModelConfig())
    data_yaml = yaml.safe_load((root / "conf/data/synthetic.yaml").read_text())
    world_keys = {f.name for f in dataclasses.fields(WorldConfig)}
    assert world_keys <= set(data_yaml)  # every world knob is in the conf file (others belong to launch.py)
    assert WorldConfig.from_dict({k: v for k, v in data_yaml.items() if k in world_keys}) == WorldConfig()
