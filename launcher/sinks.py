"""Where a run's metrics rows go: metrics.jsonl (always; the contract), TensorBoard event files (when installed and
on), Weights & Biases (only when installed and configured). One row per learner step; every sink sees the same row.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Protocol

log = logging.getLogger(__name__)


class MetricsSink(Protocol):
    def write(self, row: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per line, keys sorted, flushed per row (a crash loses at most the row being written)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "a", buffering=1, encoding="utf-8")

    def write(self, row: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(row, sort_keys=True) + "\n")

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    """Scalars under `<run>/tensorboard/`, grouped by prefix (rollout/, learner/, actor/, tool/, system/) so that
    TensorBoard's sidebar stays readable; x = learner step."""

    GROUPS = (("actor_", "actor"), ("tool_", "tool"), ("rollout_", "rollout"), ("staleness", "staleness"),
              ("peak_mem", "system"), ("wall_time", "system"))
    ROLLOUT = frozenset({"reward_mean", "accuracy", "search_ratio", "image_searches", "text_searches", "tool_errors",
                         "groups", "trajectories", "tokens_generated", "multi_version_trajectories",
                         "zero_std_groups"})

    def __init__(self, directory: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.directory = directory
        self._writer = SummaryWriter(log_dir=str(directory), flush_secs=10)

    @classmethod
    def tag(cls, key: str) -> str:
        if key.startswith("eval/"):  # held-out passes: eval/<mode>/<metric> (launcher/heldout.py)
            return key
        if key in cls.ROLLOUT or key.startswith(("search_ratio_", "accuracy_")):
            return f"rollout/{key}"
        for prefix, group in cls.GROUPS:
            if key.startswith(prefix):
                return f"{group}/{key}"
        return f"learner/{key}"

    def write(self, row: Mapping[str, Any]) -> None:
        step = int(row.get("step", 0))
        for key, value in row.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self._writer.add_scalar(self.tag(key), float(value), step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """Weights & Biases, offline-safe: created only when `wandb` imports and a project is configured."""

    def __init__(self, run: Any) -> None:
        self._run = run

    @classmethod
    def maybe(cls, settings: Mapping[str, Any], run_dir: Path, config: Mapping[str, Any]) -> "WandbSink | None":
        project = settings.get("project") or os.environ.get("WANDB_PROJECT")
        if not project:
            return None
        try:
            import wandb
        except ImportError:
            log.warning("run.wandb.project=%r but wandb is not installed; metrics go to jsonl/TensorBoard only",
                        project)
            return None
        run = wandb.init(project=project, entity=settings.get("entity"), name=settings.get("name") or run_dir.name,
                         mode=settings.get("mode") or None, dir=str(run_dir), config=dict(config))
        log.info("W&B run: %s", getattr(run, "url", None) or project)
        return cls(run)

    def write(self, row: Mapping[str, Any]) -> None:
        self._run.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=int(row.get("step", 0)))

    def close(self) -> None:
        self._run.finish()


class Sinks:
    """Fan-out to every configured sink; a failing optional sink is logged and dropped, never fatal."""

    def __init__(self, run_dir: Path, settings: Mapping[str, Any], config: Mapping[str, Any]) -> None:
        self.jsonl = JsonlSink(run_dir / "metrics.jsonl")
        self._optional: list[MetricsSink] = []
        if settings.get("tensorboard"):
            try:
                self._optional.append(TensorBoardSink(run_dir / "tensorboard"))
            except ImportError as exc:
                log.warning("run.tensorboard=true but TensorBoard is not importable (%s); skipping it", exc)
        wandb_sink = WandbSink.maybe(settings.get("wandb") or {}, run_dir, config)
        if wandb_sink is not None:
            self._optional.append(wandb_sink)

    @property
    def names(self) -> list[str]:
        return ["jsonl"] + [type(s).__name__ for s in self._optional]

    def write(self, row: Mapping[str, Any]) -> None:
        self.jsonl.write(row)
        for sink in list(self._optional):
            try:
                sink.write(row)
            except Exception as exc:
                log.error("metrics sink %s failed (%r); dropping it for the rest of the run", type(sink).__name__, exc)
                self._optional.remove(sink)

    def close(self) -> None:
        for sink in [self.jsonl, *self._optional]:
            try:
                sink.close()
            except Exception as exc:
                log.warning("closing metrics sink %s: %r", type(sink).__name__, exc)
