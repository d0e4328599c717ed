"""The warm start, orchestrated by the launcher: the learner's SFT (learner/sft.py, settings in model.sft =
conf/algo/sft.yaml) on top of the tiny base model (models/ensure.py), its result cached beside the base
(`ensure_model`); and `RaySftRunner`, which runs it on Ray: `learner.world_size` SftRank actors in one packed
placement group placed like the learner ranks, their rows streamed to a sink and the progress display; Ctrl-C
stops the ranks (nothing is saved). Used by launch.py for `algo=sft` and for the automatic warm start before RL.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Mapping, Optional

from data.world import WorldPaths
from launcher.logs import STAGES, logged_actor
from launcher.progress import ProgressDisplay
from launcher.run_folder import record_model
from launcher.sinks import JsonlSink, Sinks
from launcher.start import Roles
from learner.sft import SftConfig
from models.ensure import (
    BUILD_INFO, BUILD_VERSION, ModelConfig, base_key, build_once, cache_key, checkpoint_dtype, ensure_base_model,
)

log = logging.getLogger(__name__)
stage = logging.getLogger(STAGES)  # start-up stages: one console line each (launcher/logs.py)

# (base model folder, world root, out folder, {"learner": ..., "sft": ...}, dtype) -> report; learner.sft's
# run_sft_local (ranks spawned on this machine) by default, `RaySftRunner` in launch.py.
SftRunner = Callable[[Path, Path, Path, dict, str], dict]


def sft_config(model_cfg: ModelConfig) -> SftConfig:
    """model.sft as a validated SftConfig."""
    return SftConfig.from_dict(model_cfg.sft)


def ensure_model(model_cfg: ModelConfig, world_paths: WorldPaths, cache_root: Path | str,
                 learner: Optional[Mapping[str, Any]] = None, runner: Optional[SftRunner] = None) -> Path:
    """A local model folder for `model_cfg`: `path` validated as is, or the (warm-started) tiny model, cached.

    The warm start is the learner's SFT (`model.sft`) with the `learner` settings (backend, precision, budget) on
    `model.warm_start_ranks` ranks (None: `learner["world_size"]`), run by `runner` (default:
    learner.sft.run_sft_local, ranks spawned on this machine)."""
    if model_cfg.path or not model_cfg.warm_start:
        return ensure_base_model(model_cfg, world_paths, cache_root)
    model_cfg.validate()
    sft = dataclasses.asdict(sft_config(model_cfg))  # bad settings fail before anything is built
    base = ensure_base_model(model_cfg, world_paths, cache_root)
    learner_cfg = dict(learner or {})
    learner_cfg["world_size"] = model_cfg.warm_start_ranks or int(learner_cfg.get("world_size", 1))

    def build_warm(out: Path) -> dict:
        run = runner
        if run is None:
            from learner.sft import run_sft_local as run
        report = run(base, world_paths.root, out, {"learner": learner_cfg, "sft": sft}, model_cfg.dtype)
        log.info("warm start done: %s", {k: v for k, v in report.items() if k != "files"})
        return {"kind": "tiny-warm", "base": base.name, "sft": sft, "report": report}

    return build_once(_warm_folder(model_cfg, world_paths, cache_root), build_warm)


def warm_start_cached(model_cfg: ModelConfig, world_paths: WorldPaths, cache_root: Path | str) -> bool:
    """Whether `ensure_model` would return without training (a given path, no warm start, or a cached one)."""
    if model_cfg.path or not model_cfg.warm_start:
        return True
    return (_warm_folder(model_cfg, world_paths, cache_root) / BUILD_INFO).exists()


def _warm_folder(model_cfg: ModelConfig, world_paths: WorldPaths, cache_root: Path | str) -> Path:
    """`tiny-<base key>-warm-<warm key>`: the warm start's cache folder, beside its base."""
    base = base_key(model_cfg, world_paths)
    warm = cache_key({"version": BUILD_VERSION, "base": base, "sft": dataclasses.asdict(sft_config(model_cfg))})
    return Path(cache_root) / f"tiny-{base}-warm-{warm}"


def prepare_model(conf: Mapping[str, Any], roles: Roles, world: WorldPaths, run_dir: Path) -> Path:
    """The model RL starts from: model.path, or the tiny model warm-started by the learner's SFT (model.sft) on the
    learner's placement (first time only: cached under run.cache_dir; its rows go to <run>/warm_start.jsonl)."""
    model_cfg, cache = ModelConfig.from_dict(conf["model"]), conf["run"]["cache_dir"]
    if warm_start_cached(model_cfg, world, cache):
        return ensure_model(model_cfg, world, cache)
    stage.info("warm start of the tiny model: %d SFT steps on the learner ranks (first time only; cached after)",
             sft_config(model_cfg).steps)
    started = time.monotonic()
    sink = JsonlSink(run_dir / "warm_start.jsonl")
    try:
        path = ensure_model(model_cfg, world, cache, learner=conf["learner"],
                            runner=RaySftRunner(roles, sink, bool(conf["run"]["progress"])))
    finally:
        sink.close()
    stage.info("warm start done in %.1fs: %s", time.monotonic() - started, path)
    return path


def train_alone(conf: Mapping[str, Any], roles: Roles, world: WorldPaths, run_dir: Path) -> str:
    """algo=sft: the learner ranks fine-tune model.path (or the tiny model's base) on oracle episodes of the world;
    the result is <run>/model, a Hugging Face folder; metrics rows go to the run's sinks. Returns the console summary.
    """
    model_cfg = ModelConfig.from_dict(conf["model"])
    base = ensure_base_model(model_cfg, world, conf["run"]["cache_dir"])
    dtype = checkpoint_dtype(base) if model_cfg.path else model_cfg.dtype
    out = run_dir / "model"
    if out.exists():
        raise SystemExit(f"{out} already exists: give algo=sft a new run.out_dir")
    sinks = Sinks(run_dir, conf["run"], conf)
    started = time.monotonic()
    try:
        runner = RaySftRunner(roles, sinks, bool(conf["run"]["progress"]))
        build_once(out, lambda tmp: {"kind": "sft", "base": str(base), "sft": conf["algo"],
                                     "report": runner(base, world.root, tmp, {"learner": conf["learner"],
                                                                              "sft": conf["algo"]}, dtype)})
    finally:
        sinks.close()
    record_model(run_dir, base)  # what it trained from
    shown = Path(conf["run"]["out_dir"]) / "model"
    return (f"warm start of {conf['algo']['steps']} steps in {time.monotonic() - started:.0f}s -> {shown}\n"
            f"start RL from it: python launch.py model.path={shown}")


def sft_status(row: Mapping[str, Any]) -> str:
    """The one-line summary of a warm-start row."""
    phase = "pixels" if row.get("vision_phase") else "mixture"
    return (f"loss {row.get('loss', 0.0):.3f}  lr {row.get('lr', 0.0):.1e}  {phase}  "
            f"{row.get('tokens_per_s', 0.0):.0f} tok/s")


class RaySftRunner:
    """An SftRunner that places the ranks with Ray: call it as
    `runner(base_model, world_root, out_dir, {"learner": ..., "sft": ...}, dtype) -> report`."""

    def __init__(self, roles: Roles, sink: Any, progress: bool) -> None:
        self.roles, self.sink, self.progress = roles, sink, progress

    def __call__(self, base: Path, world_root: Path, out: Path, cfg: dict, dtype: str) -> dict:
        import ray

        from learner.sft import SftRank

        world_size = int(cfg["learner"].get("world_size", 1))
        steps = int(cfg["sft"].get("steps", 0))
        placement = self.roles.placement
        group, master, port = placement.rank_world("sft", world_size)
        ranks = [ray.remote(logged_actor(SftRank, f"warm_start{r}", self.roles.log_dir))
                 .options(max_concurrency=2, **placement.rank_options(group, r))
                 .remote(r, world_size, master, port, str(base), str(world_root), cfg) for r in range(world_size)]
        log.info("warm start: %d step(s) on %d rank(s) from %s", steps, world_size, base)
        display = ProgressDisplay(steps, enabled=self.progress, status=sft_status, label="warm start",
                                  log_every=50)
        refs = [rank.run.remote(str(out), dtype) for rank in ranks]
        try:
            while True:
                done, _ = ray.wait(refs, num_returns=len(refs), timeout=0.5)
                for row in ray.get(ranks[0].drain_metrics.remote()):
                    self.sink.write(row)
                    display.update(row)
                for ref in done:
                    ray.get(ref)  # a failed rank raises here, with its traceback
                if len(done) == len(refs):
                    break
            report = ray.get(refs[0])
        except KeyboardInterrupt:
            log.warning("interrupted: stopping the warm start (nothing is saved)")
            for rank in ranks:
                rank.stop.remote()
            ray.wait(refs, num_returns=len(refs), timeout=60)
            raise
        finally:
            display.close()
            for rank in ranks:
                try:
                    ray.kill(rank, no_restart=True)
                except Exception as exc:  # already gone: nothing of ours is left in it
                    log.warning("could not kill a warm-start rank: %s", exc)
            self.roles.placement.release(group)
        if not report.get("completed"):
            raise RuntimeError(f"warm start stopped after {report.get('steps')} of {steps} steps")
        return report
