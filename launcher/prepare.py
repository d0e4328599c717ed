"""What a run needs before any role starts: the checked config, the synthetic world and the base model (both
cached under run.cache_dir), and the questions the actors play (the world's, or a converted dataset).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from actors.eval import EVAL_MODES
from data import WorldConfig, WorldPaths, ensure_world
from data.datasets import convert_dataset
from launcher.heldout import ReportConfig
from launcher.logs import STAGES
from models import ModelConfig, ensure_base_model
from protocol.sockets import is_loopback_endpoint

log = logging.getLogger(STAGES)
MODES = ("async", "sync", "eval", "curate")
DATASET_KEYS = ("path", "dataset", "image_root")  # keys of the data group that pick questions, not the world


def check_config(cfg: DictConfig) -> None:
    """Cross-group consistency that no single group's dataclass can see; run.mode=sync pins max_staleness to 0."""
    if cfg.run.mode not in MODES:
        raise SystemExit(f"run.mode={cfg.run.mode!r}; expected one of {list(MODES)}")
    if cfg.run.mode == "sync" and int(cfg.algo.max_staleness) != 0:
        log.info("run.mode=sync: algo.max_staleness %s -> 0 (actors wait for each new version)",
                 cfg.algo.max_staleness)
        cfg.algo.max_staleness = 0
    check_tokens(cfg)
    if cfg.algo.name == "sft":
        if cfg.run.mode != "async":
            raise SystemExit(f"algo=sft trains the warm start alone; run.mode={cfg.run.mode} does not apply (drop it)")
        return
    if cfg.run.mode in ("async", "sync") and float(cfg.actors.sampling.temperature) != float(cfg.algo.temperature):
        raise SystemExit(
            f"actors.sampling.temperature={cfg.actors.sampling.temperature} but algo.temperature="
            f"{cfg.algo.temperature}: the learner must score with the temperature the actors sample at; set both")
    if cfg.run.mode == "eval" and cfg.run.eval.checkpoint and not Path(cfg.run.eval.checkpoint).exists():
        raise SystemExit(f"run.eval.checkpoint={cfg.run.eval.checkpoint} does not exist")
    if cfg.data.get("path") and not Path(cfg.data.path).exists():
        raise SystemExit(f"data.path={cfg.data.path} does not exist")
    if cfg.run.mode == "eval" and cfg.run.eval.get("mode", "policy") not in EVAL_MODES:
        raise SystemExit(f"run.eval.mode={cfg.run.eval.mode!r}; expected one of {list(EVAL_MODES)}")
    try:
        ReportConfig.from_dict(OmegaConf.to_container(cfg.run.report, resolve=True))
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def check_tokens(cfg: DictConfig) -> None:
    """Before anything starts: every listener bound beyond loopback has a token variable named, and every variable
    named holds a token. Tool servers run in every mode but algo=sft; the learner's endpoints in async and sync."""
    from launcher.start import learner_token, tool_token

    if cfg.algo.name == "sft":
        return
    listeners = [("run.bind_host", cfg.run.bind_host, "tool_servers.token_env", cfg.tool_servers.get("token_env"))]
    if cfg.run.mode in ("async", "sync"):
        listeners.append(("learner.bind_host", cfg.learner.bind_host, "learner.token_env", cfg.learner.get("token_env")))
    for host_knob, host, token_knob, variable in listeners:
        if not variable and not is_loopback_endpoint(f"tcp://{host}:0"):
            raise SystemExit(f"{host_knob}={host} listens beyond loopback, which needs a shared token: set {token_knob} "
                             f"to the name of an environment variable holding it")
    tool_token(cfg.tool_servers)
    if cfg.run.mode in ("async", "sync"):
        learner_token(cfg.learner)


def build_world_and_base_model(conf: Mapping[str, Any]) -> WorldPaths:
    """The synthetic world (corpora + questions) and, for the tiny model, its base weights (before any warm start),
    both cached under run.cache_dir; a given model.path is checked."""
    cache = Path(conf["run"]["cache_dir"])
    world_cfg = dict(conf["data"])
    for key in DATASET_KEYS:
        world_cfg.pop(key, None)
    world_cache = Path(world_cfg.pop("cache_root", None) or cache)
    started = time.monotonic()
    log.info("preparing the synthetic world (first time: about a minute; cached after)")
    world = ensure_world(WorldConfig(**world_cfg), world_cache)
    log.info("world ready in %.1fs: %s", time.monotonic() - started, world.root)
    started = time.monotonic()
    model_cfg = ModelConfig.from_dict(conf["model"])
    base = ensure_base_model(model_cfg, world, cache)
    log.info("base model ready in %.1fs: %s", time.monotonic() - started, base)
    return world


def prepare_questions(data: Mapping[str, Any], world: WorldPaths, run_dir: Path) -> Path:
    """The questions parquet actors play: the world's, or `data.path` (FVQA/InfoSeek-style parquet or an image
    folder) converted and validated into <run>/data/questions.parquet."""
    if not data.get("path"):
        return Path(world.questions)
    return convert_dataset(data["path"], run_dir / "data" / "questions.parquet", data.get("dataset") or "auto",
                           data.get("image_root"))
