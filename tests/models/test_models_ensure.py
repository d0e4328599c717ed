"""ensure_model: a given path is validated, the tiny model and its warm start are built once and reused."""
from __future__ import annotations

import dataclasses
import json

import pytest

from models import ensure as ensure_mod
from models.ensure import BUILD_INFO, ModelConfig, check_model_path, ensure_model, warm_start_cached
from models.tiny import TinyModelConfig


def test_a_local_checkpoint_path_is_returned_as_is(tmp_path, small_paths):
    (tmp_path / "config.json").write_text("{}")
    assert ensure_model(ModelConfig(path=str(tmp_path)), small_paths, tmp_path / "cache") == tmp_path
    assert not (tmp_path / "cache").exists()  # nothing built for a given checkpoint


def test_bad_model_paths_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*hub id"):
        check_model_path("Qwen/Qwen2.5-VL-7B-Instruct")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        check_model_path(tmp_path / "file")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        check_model_path(tmp_path)


def test_tiny_model_is_built_once_and_reused(tmp_path, small_paths, monkeypatch):
    cfg = ModelConfig(warm_start=False)
    first = ensure_model(cfg, small_paths, tmp_path)
    assert (first / "config.json").is_file() and (first / BUILD_INFO).is_file()

    def must_not_build(*args, **kwargs):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(ensure_mod, "build_tiny_model", must_not_build)
    assert ensure_model(cfg, small_paths, tmp_path) == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    monkeypatch.undo()
    other = ensure_model(ModelConfig(warm_start=False, tiny=TinyModelConfig(seed=1)), small_paths, tmp_path)
    assert other != first


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


def test_a_failed_build_leaves_nothing_behind(tmp_path, small_paths, monkeypatch):
    def broken(cfg, texts, out_dir, dtype=None):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("boom")

    monkeypatch.setattr(ensure_mod, "build_tiny_model", broken)
    with pytest.raises(RuntimeError, match="boom"):
        ensure_model(ModelConfig(warm_start=False), small_paths, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_from_dict_builds_nested_config_and_rejects_unknown_keys():
    cfg = ModelConfig.from_dict({"sft": {"steps": 5, "vision_steps": 2}, "tiny": {"hidden_size": 64, "num_heads": 2,
                                                                "num_kv_heads": 1}})
    assert cfg.sft_config().steps == 5 and cfg.tiny.hidden_size == 64
    with pytest.raises(ValueError, match="warm_stat"):
        ModelConfig.from_dict({"warm_stat": True})
    with pytest.raises(ValueError, match="hidden"):
        ModelConfig.from_dict({"tiny": {"hidden": 3}})


def test_bad_dtype_is_rejected(tmp_path, small_paths):
    with pytest.raises(ValueError, match="dtype"):
        ensure_model(ModelConfig(dtype="float8"), small_paths, tmp_path)


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
    sft_yaml = yaml.safe_load((root / "conf/algo/sft.yaml").read_text())
    assert ModelConfig.from_dict(model_yaml) == ModelConfig()
    assert ModelConfig.from_dict({**model_yaml, "sft": sft_yaml}).sft_config() == ModelConfig().sft_config()
    data_yaml = yaml.safe_load((root / "conf/data/synthetic.yaml").read_text())
    world_keys = {f.name for f in dataclasses.fields(WorldConfig)}
    assert world_keys <= set(data_yaml)  # every world knob is in the conf file (others belong to launch.py)
    assert WorldConfig.from_dict({k: v for k, v in data_yaml.items() if k in world_keys}) == WorldConfig()
