"""ensure_base_model: a given path is validated, the tiny model is built once and reused (its warm start:
tests/launcher/test_launcher_warm_start.py)."""
from __future__ import annotations

import json

import pytest

from models import ensure as ensure_mod
from models.ensure import BUILD_INFO, ModelConfig, check_model_path, ensure_base_model
from models.tiny import TinyModelConfig


def test_a_local_checkpoint_path_is_returned_as_is(tmp_path, small_paths):
    (tmp_path / "config.json").write_text("{}")
    assert ensure_base_model(ModelConfig(path=str(tmp_path)), small_paths, tmp_path / "cache") == tmp_path
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
    cfg = ModelConfig()
    first = ensure_base_model(cfg, small_paths, tmp_path)
    assert (first / "config.json").is_file() and (first / BUILD_INFO).is_file()

    def must_not_build(*args, **kwargs):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(ensure_mod, "build_tiny_model", must_not_build)
    assert ensure_base_model(cfg, small_paths, tmp_path) == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    monkeypatch.undo()
    other = ensure_base_model(ModelConfig(tiny=TinyModelConfig(seed=1)), small_paths, tmp_path)
    assert other != first


def test_a_failed_build_leaves_nothing_behind(tmp_path, small_paths, monkeypatch):
    def broken(cfg, texts, out_dir, dtype=None):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("boom")

    monkeypatch.setattr(ensure_mod, "build_tiny_model", broken)
    with pytest.raises(RuntimeError, match="boom"):
        ensure_base_model(ModelConfig(), small_paths, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_from_dict_builds_nested_config_and_rejects_unknown_keys():
    cfg = ModelConfig.from_dict({"sft": {"steps": 5, "vision_steps": 2}, "tiny": {"hidden_size": 64, "num_heads": 2,
                                                                "num_kv_heads": 1}})
    assert cfg.sft == {"steps": 5, "vision_steps": 2} and cfg.tiny.hidden_size == 64
    with pytest.raises(ValueError, match="warm_stat"):
        ModelConfig.from_dict({"warm_stat": True})
    with pytest.raises(ValueError, match="hidden"):
        ModelConfig.from_dict({"tiny": {"hidden": 3}})


def test_bad_dtype_is_rejected(tmp_path, small_paths):
    with pytest.raises(ValueError, match="dtype"):
        ensure_base_model(ModelConfig(dtype="float8"), small_paths, tmp_path)
