"""Resolves the `model` config to a local HF folder before any training: a given checkpoint path (validated), or the
tiny model built for the world (its base weights, before the warm start), cached by hash under the cache root and
written atomically. The warm start on top of it is the learner's SFT, orchestrated by the launcher
(launcher/warm_start.py), which caches its result beside the base with `build_once` and `cache_key`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from data.names import name_texts
from data.oracle import oracle_texts
from data.world import WorldPaths, load_world, world_texts
from models.tiny import TinyModelConfig, build_tiny_model
from protocol.files import build_dir_once

log = logging.getLogger(__name__)

# Bump when the builder or warm start changes what they write for the same config.
BUILD_VERSION = 4
TOKENIZER_NAME_LINES = 3000  # lines of 10 random names in the tokenizer's training text
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BUILD_INFO = "forage_build.json"


@dataclass(frozen=True)
class ModelConfig:
    """conf/model: which model the actors and learner load."""

    path: str | None = None  # a local HF checkpoint folder; None builds the tiny model for the world
    warm_start: bool = True  # tiny model only: the learner's SFT on oracle episodes (model.sft) before RL
    warm_start_ranks: Optional[int] = 1  # learner ranks of that warm start; None = learner.world_size
    dtype: str = "float32"  # dtype of the saved weights: float32 | bfloat16 (vLLM on CPU takes both)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    sft: dict = field(default_factory=dict)  # the warm start's SftConfig fields (conf/algo/sft.yaml); {} = defaults

    @classmethod
    def from_dict(cls, values: Mapping) -> ModelConfig:
        """From a plain mapping (e.g. a resolved Hydra node); unknown keys raise ValueError."""
        values = dict(values)
        tiny = values.pop("tiny", None) or {}
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        unknown_tiny = set(tiny) - {f.name for f in dataclasses.fields(TinyModelConfig)}
        if unknown or unknown_tiny:
            raise ValueError(f"unknown model config keys: {sorted(unknown)} tiny: {sorted(unknown_tiny)}")
        values["sft"] = dict(values.get("sft") or {})
        return cls(**values, tiny=TinyModelConfig(**tiny))

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r}; known: {sorted(DTYPES)}")
        if self.warm_start_ranks is not None and self.warm_start_ranks < 1:
            raise ValueError(f"model.warm_start_ranks={self.warm_start_ranks}; need >= 1 or null")
        self.tiny.validate()


def cache_key(payload: dict) -> str:
    """The short hash that names a cache folder built from `payload`."""
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


def build_world_model(tiny: TinyModelConfig, world_paths: WorldPaths, out_dir: Path | str,
                      dtype: torch.dtype = torch.float32) -> Path:
    """The tiny model for a world: its tokenizer trained on the world's texts, the oracle's phrases and lines of
    random names (so each name syllable becomes a token: a name copies as 2-3 tokens); uncached, `ensure_model`
    caches it."""
    names = name_texts(np.random.default_rng([tiny.seed, 43]), TOKENIZER_NAME_LINES)
    texts = chain(world_texts(world_paths), oracle_texts(load_world(world_paths), seed=tiny.seed), names)
    return build_tiny_model(tiny, texts, out_dir, dtype=dtype)


def checkpoint_dtype(path: Path | str) -> str:
    """The weight dtype a model folder's config.json declares (`dtype`, or the older `torch_dtype`); float32 if none."""
    config = json.loads((Path(path) / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype") or config.get("text_config", {}).get("dtype")
    return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


def build_once(target: Path, build: Callable[[Path], dict]) -> Path:
    """Runs `build(tmp_dir)` unless `target` exists, then renames the temp dir to `target` (atomic)."""
    def build_with_info(tmp: Path) -> None:
        start = time.monotonic()
        info = build(tmp)
        info["build_seconds"] = time.monotonic() - start
        (tmp / BUILD_INFO).write_text(json.dumps(info, sort_keys=True, indent=2) + "\n")

    build_dir_once(target, build_with_info, BUILD_INFO)
    return target


def ensure_base_model(model_cfg: ModelConfig, world_paths: WorldPaths, cache_root: Path | str) -> Path:
    """A local model folder for `model_cfg` before any warm start: `path` validated as is, or the tiny model built
    for the world, cached under `cache_root/tiny-<base_key>`."""
    if model_cfg.path:
        return check_model_path(model_cfg.path)
    model_cfg.validate()
    world_hash = world_paths.config_hash()
    dtype = DTYPES[model_cfg.dtype]

    def build_base(out: Path) -> dict:
        build_world_model(model_cfg.tiny, world_paths, out, dtype=dtype)
        return {"kind": "tiny", "tiny": dataclasses.asdict(model_cfg.tiny), "world": world_hash}

    return build_once(Path(cache_root) / f"tiny-{base_key(model_cfg, world_paths)}", build_base)


def base_key(model_cfg: ModelConfig, world_paths: WorldPaths) -> str:
    """The key of the tiny base model's cache folder `tiny-<key>`."""
    return cache_key({"version": BUILD_VERSION, "tiny": dataclasses.asdict(model_cfg.tiny),
                      "world": world_paths.config_hash(), "dtype": model_cfg.dtype})
