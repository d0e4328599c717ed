"""Resolves the `model` config to a local HF folder: a given checkpoint path (validated), or the tiny model built
for the world and warm-started, each cached by hash under the cache root and written atomically.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import torch

from data.oracle import OracleConfig, oracle_texts
from data.world import WorldPaths, load_world, world_texts
from models.tiny import TinyModelConfig, build_tiny_model
from models.warmstart import WarmStartConfig, warm_start

log = logging.getLogger(__name__)

# Bump when the builder or warm start changes what they write for the same config.
BUILD_VERSION = 2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BUILD_INFO = "forage_build.json"


@dataclass(frozen=True)
class ModelConfig:
    """conf/model: which model the actors and learner load."""

    path: str | None = None  # a local HF checkpoint folder; None builds the tiny model for the world
    warm_start: bool = True  # tiny model only: fine-tune on oracle episodes before RL
    warm_start_steps: int = 550  # SFT steps in all (~90 s on one thread)
    warm_start_vision_steps: int = 200  # of which the first train on pixel questions only
    warm_start_batch_size: int = 8
    warm_start_lr: float = 2e-3
    pixel_search_fraction: float = 0.5  # oracle: search-free questions that still search first
    fresh_name_fraction: float = 0.5  # oracle: search episodes with names swapped for fresh ones
    seed: int = 0  # warm-start sampling and order (TinyModelConfig.seed seeds the initial weights)
    dtype: str = "float32"  # dtype of the saved weights: float32 | bfloat16 (vLLM on CPU takes both)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)

    @classmethod
    def from_dict(cls, values: Mapping) -> ModelConfig:
        """From a plain mapping (e.g. a resolved Hydra node); unknown keys raise ValueError."""
        values = dict(values)
        tiny = values.pop("tiny", None) or {}
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        unknown_tiny = set(tiny) - {f.name for f in dataclasses.fields(TinyModelConfig)}
        if unknown or unknown_tiny:
            raise ValueError(f"unknown model config keys: {sorted(unknown)} tiny: {sorted(unknown_tiny)}")
        return cls(**values, tiny=TinyModelConfig(**tiny))

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r}; known: {sorted(DTYPES)}")
        self.tiny.validate()
        self.warm_start_config().validate()

    def warm_start_config(self) -> WarmStartConfig:
        return WarmStartConfig(
            steps=self.warm_start_steps, vision_steps=self.warm_start_vision_steps,
            batch_size=self.warm_start_batch_size, lr=self.warm_start_lr,
            seed=self.seed, oracle=OracleConfig(pixel_search_fraction=self.pixel_search_fraction,
                                                fresh_name_fraction=self.fresh_name_fraction))


def _hash(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def check_model_path(path: str | os.PathLike) -> Path:
    """`path` as a Path if it is a local folder with a config.json; FileNotFoundError (saying why) otherwise."""
    p = Path(path).expanduser()
    if not p.exists():
        hint = " (forage never downloads: give a local folder, not a hub id)" if "/" in str(path) else ""
        raise FileNotFoundError(f"model.path {str(path)!r} does not exist{hint}")
    if not p.is_dir():
        raise FileNotFoundError(f"model.path {str(path)!r} is not a directory")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model.path {str(path)!r} has no config.json: not a Hugging Face model folder")
    return p


def _build_once(target: Path, build: Callable[[Path], dict]) -> Path:
    """Runs `build(tmp_dir)` unless `target` exists, then renames the temp dir to `target` (atomic)."""
    if (target / BUILD_INFO).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        start = time.monotonic()
        info = build(tmp)
        info["build_seconds"] = time.monotonic() - start
        (tmp / BUILD_INFO).write_text(json.dumps(info, sort_keys=True, indent=2) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / BUILD_INFO).exists():  # not a lost race with an identical build: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_model(model_cfg: ModelConfig, world_paths: WorldPaths, cache_root: Path | str) -> Path:
    """A local model folder for `model_cfg`: `path` validated as is, or the (warm-started) tiny model, cached."""
    if model_cfg.path:
        return check_model_path(model_cfg.path)
    model_cfg.validate()
    cache_root = Path(cache_root)
    world_hash = world_paths.config_hash()
    base_key = _hash({"version": BUILD_VERSION, "tiny": dataclasses.asdict(model_cfg.tiny), "world": world_hash,
                      "dtype": model_cfg.dtype})
    dtype = DTYPES[model_cfg.dtype]

    def build_base(out: Path) -> dict:
        world = load_world(world_paths)
        texts = chain(world_texts(world_paths), oracle_texts(world, seed=model_cfg.tiny.seed))
        build_tiny_model(model_cfg.tiny, texts, out, dtype=dtype)
        return {"kind": "tiny", "tiny": dataclasses.asdict(model_cfg.tiny), "world": world_hash}

    base = _build_once(cache_root / f"tiny-{base_key}", build_base)
    if not model_cfg.warm_start:
        return base
    ws_cfg = model_cfg.warm_start_config()
    warm_key = _hash({"version": BUILD_VERSION, "base": base_key, "warm_start": dataclasses.asdict(ws_cfg)})

    def build_warm(out: Path) -> dict:
        prev = torch.get_num_threads()
        torch.set_num_threads(1)  # the brief's budget is one thread; other processes share the cores
        try:
            report = warm_start(base, world_paths, out, ws_cfg, dtype=dtype)
        finally:
            torch.set_num_threads(prev)
        log.info("warm start done: %s", report)
        return {"kind": "tiny-warm", "base": base.name, "warm_start": dataclasses.asdict(ws_cfg), "report": report}

    return _build_once(cache_root / f"tiny-{base_key}-warm-{warm_key}", build_warm)
