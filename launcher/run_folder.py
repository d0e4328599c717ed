"""The run folder (`run.out_dir`) besides the metrics rows (launcher/metrics.py, sinks.py): created with the
resolved config.yaml, then model.json (the model the run used), roles.json (where every role runs), summary.json
(peak memory) and logs/ (launcher/logs.py); `training_summary` is the console's end of a training run. README
"What a run writes" lists everything.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

from omegaconf import DictConfig, OmegaConf

from launcher.logs import LOG_DIR, STAGES
from protocol.ledger import LEARNER_LEDGER, LEDGER_DIR

log = logging.getLogger(__name__)
stage = logging.getLogger(STAGES)

RUN_MODEL_FILE = "model.json"  # {"model_path": the model the run trained from (eval exports its checkpoints onto it)}


def prepare_run_dir(cfg: DictConfig) -> Path:
    """Resolve every path of `cfg` (Ray workers do not share our working directory), default the learner's
    checkpoint folder and group ledger into the run folder, create it and write config.yaml."""
    cfg.run.out_dir = str(Path(cfg.run.out_dir).resolve())
    cfg.run.cache_dir = str(Path(cfg.run.cache_dir).resolve())
    run_dir = Path(cfg.run.out_dir)
    if not cfg.learner.checkpoint_dir:  # the learner checkpoints at the end (and on Ctrl-C) into the run folder
        cfg.learner.checkpoint_dir = str(run_dir / "checkpoints")
    if not cfg.learner.get("ledger"):  # rank 0's group ledger beside the actors' (launcher/audit.py reads them)
        cfg.learner.ledger = str(run_dir / LEDGER_DIR / LEARNER_LEDGER)
    for key in ("path", "image_root"):
        if cfg.data.get(key):
            cfg.data[key] = str(Path(cfg.data[key]).resolve())
    if cfg.run.eval.checkpoint:
        cfg.run.eval.checkpoint = str(Path(cfg.run.eval.checkpoint).resolve())
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    stage.info("run folder: %s (mode %s)", run_dir, cfg.run.mode)
    return run_dir


def record_model(run_dir: Path, model_path: Path | str) -> None:
    """model.json: the model this run trains (or evaluates) from."""
    (run_dir / RUN_MODEL_FILE).write_text(json.dumps({"model_path": str(model_path)}) + "\n")


def base_model_of(checkpoint: Path, default: str | Path) -> str:
    """The model a checkpoint was trained from: the model.json its run wrote (in the checkpoint's grandparent, or
    its parent), else `default`. The tiny model's cache key changes with its build code, so the run's own record
    beats whatever model this launch built."""
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        record = folder / RUN_MODEL_FILE
        if record.is_file():
            recorded = Path(json.loads(record.read_text())["model_path"])
            if (recorded / "config.json").is_file():
                return str(recorded)
            log.warning("%s names %s, which is gone; exporting onto %s", record, recorded, default)
    return str(default)


def write_manifest(run_dir: Path, where: Mapping[str, Any]) -> None:
    """roles.json: every role's node, address and pid (what the operator and the tests check placement by)."""
    (run_dir / "roles.json").write_text(json.dumps(where, indent=2) + "\n")


def write_summary(run_dir: Path, peak_mem_gib: float) -> None:
    """summary.json: peak memory (PSS) of all the run's processes."""
    (run_dir / "summary.json").write_text(json.dumps({"peak_mem_gib": round(peak_mem_gib, 3)}, indent=2) + "\n")


def rl_rows(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The learner's RL step rows of a metrics.jsonl: the ones with `trajectories` (held-out eval rows carry only
    `step` and eval/ keys; the warm start's SFT rows have no trajectories)."""
    return [row for row in rows if "trajectories" in row]


def training_summary(run_dir: Path, shown: str | Path, seconds: float) -> str:
    """The console's end-of-run summary of a training run: steps, the last row's reward, accuracy and search ratio,
    and where the outputs are (`shown`: the run folder as the user named it)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    if not lines:
        return f"no learner step finished in {seconds:.0f}s -> {shown} (logs in {Path(shown) / LOG_DIR})"
    rows = [json.loads(line) for line in lines]
    training = rl_rows(rows)
    if not training:
        return f"no learner step finished in {seconds:.0f}s -> {shown} (logs in {Path(shown) / LOG_DIR})"
    last = training[-1]
    return (f"{int(last['step'])} step(s) in {seconds:.0f}s -> {shown}\n"
            f"last step: policy v{int(last.get('policy_version', 0))}, reward {last.get('reward_mean', 0.0):.3f}, "
            f"accuracy {last.get('accuracy', 0.0):.3f}, search ratio {last.get('search_ratio', 0.0):.3f}, "
            f"staleness {last.get('staleness_mean', 0.0):.2f}\n"
            f"metrics: {Path(shown) / 'metrics.jsonl'}  logs: {Path(shown) / LOG_DIR}/  "
            f"plots: python -m launcher.plots {shown}")
