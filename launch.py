"""forage's entry point: build the run from conf/, start or join Ray, place every role, stream metrics, stop cleanly.

    python launch.py run.max_steps=3 run.out_dir=runs/demo       # the embedded default (CPU, tiny model)
    python launch.py actors.num_actors=2 tool_servers.image.replicas=2 learner.world_size=2
    python launch.py run.mode=eval run.eval.checkpoint=runs/demo/checkpoints    # also: run.mode=sync | curate
    python launch.py algo=sft run.out_dir=runs/sft                # the warm start alone -> runs/sft/model
    python launch.py --cfg job                                    # print the resolved config

Reads like DESIGN.md's diagram: world + model (warm start on the learner ranks) -> tool servers -> learner ranks ->
rollout actors -> metrics loop. The pieces live in launcher/ (Ray placement, warm start, metrics sinks, progress,
eval/curate, plots).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from launcher.cluster import RayCluster, SocketAlias
from launcher.metrics import MemorySampler, stream_metrics
from launcher.offline import RUN_MODEL_FILE
from launcher.roles import Roles

log = logging.getLogger("forage.launch")
MODES = ("async", "sync", "eval", "curate")
DATASET_KEYS = ("path", "dataset", "image_root")  # keys of the data group that pick questions, not the world


def main(cfg: DictConfig) -> int:
    run_dir = prepare_run_dir(cfg)
    sockets = SocketAlias(run_dir)
    configure_process_env(cfg, sockets.path)
    conf: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)
    memory = MemorySampler(float(cfg.run.memory_sample_s))
    cluster: RayCluster | None = None
    roles: Roles | None = None
    try:
        world = build_world_and_base_model(cfg)
        cluster = RayCluster(conf["run"], run_dir, sockets.path)
        roles = Roles(conf)
        if cfg.algo.name == "sft":
            return run_sft(conf, roles, world, run_dir)
        model_path = prepare_model(conf, roles, world, run_dir)
        (run_dir / RUN_MODEL_FILE).write_text(json.dumps({"model_path": str(model_path)}) + "\n")
        questions = prepare_questions(conf["data"], world, run_dir)
        tools = roles.start_tool_servers(world)
        if cfg.run.mode in ("eval", "curate"):
            return run_offline(conf, roles, model_path, questions, tools, sockets.path)
        learner = roles.start_learner(model_path)
        roles.start_actors(model_path, questions, tools, learner, sockets.path)
        roles.write_manifest(run_dir)  # where every role runs, readable while the run goes (rewritten at the end)
        roles.start_training(int(cfg.run.max_steps))
        return stream_metrics(conf["run"], run_dir, roles, memory, conf)
    except KeyboardInterrupt:
        log.warning("interrupted: stopping every role (actors flush, learner checkpoints, tool servers drain)")
        return 130
    finally:
        ignore_signals_while_stopping()
        if roles is not None:
            roles.write_manifest(run_dir)
            roles.stop()
        if cluster is not None:
            cluster.shutdown()
        memory.stop()
        sockets.remove()
        log.info("peak memory of all forage processes: %.2f GiB (PSS)", memory.peak_gib)
        write_summary(run_dir, memory)


def run_offline(conf: dict, roles: Roles, model_path: Path, questions: Path, tools: dict[str, list[str]],
                run_dir: Path) -> int:
    """run.mode=eval: the policy (model or learner checkpoint) over the questions, a summary table;
    run.mode=curate: search-balance labels and a balanced subset of the questions."""
    from actors.eval import format_table
    from launcher.offline import curate_table, curate_task, eval_task

    run, mode = conf["run"], conf["run"]["mode"]
    settings = run[mode]
    actor_cfg = {"actors": {**conf["actors"], "sampling": {**conf["actors"]["sampling"],
                                                           "temperature": settings["temperature"]}},
                 "algo": conf["algo"]}
    out = run_dir / mode
    started = time.monotonic()
    if mode == "eval":
        summary = roles.run_offline("eval", eval_task, str(model_path), str(questions), str(out), tools, actor_cfg,
                                    checkpoint=settings["checkpoint"], split=settings["split"],
                                    limit=settings["limit"])
        table = format_table(summary["table"])
    else:
        curation = {k: settings[k] for k in ("k", "free_min_acc", "required_min_acc", "free_fraction", "seed")}
        summary = roles.run_offline("curate", curate_task, str(model_path), str(questions), str(out), tools,
                                    actor_cfg, curation, split=settings["split"], limit=settings["limit"])
        table = curate_table(summary)
    shown = Path(run["out_dir"]) / mode  # `out` goes through the socket-safe alias, removed at the end
    print(f"\n{mode} of {summary['questions']} question(s) in {time.monotonic() - started:.0f}s -> {shown}\n{table}")
    return 0


def ignore_signals_while_stopping() -> None:
    """A second Ctrl-C must not abandon the shutdown half-way and leave processes behind."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ---------------------------------------------------------------------------------------------- run folder, env

def prepare_run_dir(cfg: DictConfig) -> Path:
    # Absolute paths before anything resolves: Ray workers do not share our working directory.
    cfg.run.out_dir = str(Path(cfg.run.out_dir).resolve())
    cfg.run.cache_dir = str(Path(cfg.run.cache_dir).resolve())
    run_dir = Path(cfg.run.out_dir)
    if not cfg.learner.checkpoint_dir:  # the learner checkpoints at the end (and on Ctrl-C) into the run folder
        cfg.learner.checkpoint_dir = str(run_dir / "checkpoints")
    for key in ("path", "image_root"):
        if cfg.data.get(key):
            cfg.data[key] = str(Path(cfg.data[key]).resolve())
    if cfg.run.eval.checkpoint:
        cfg.run.eval.checkpoint = str(Path(cfg.run.eval.checkpoint).resolve())
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    log.info("run folder: %s (mode %s)", run_dir, cfg.run.mode)
    return run_dir


def configure_process_env(cfg: DictConfig, run_dir: Path) -> None:
    """Environment inherited by every process we start: offline hubs, caches and temp files inside our folders.
    `run_dir` is the socket-safe alias of the run folder: vLLM puts IPC sockets in $TMPDIR."""
    cache = Path(cfg.run.cache_dir).resolve()
    tmp = run_dir / "tmp"
    tmp.mkdir(exist_ok=True)
    os.environ.update({
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_HOST_IP": "127.0.0.1",
        "HF_HOME": str(cache / "hf"), "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton"),
        "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
        "FORAGE_LOG_LEVEL": str(cfg.run.log_level),
    })
    if str(cfg.run.bind_host) not in ("127.0.0.1", "localhost"):
        os.environ.pop("VLLM_HOST_IP")  # a multi-host run: each engine's node address, not loopback
    # Our packages must be importable in Ray workers and vLLM's worker processes wherever they start.
    root = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)


def build_world_and_base_model(cfg: DictConfig) -> Any:
    """The synthetic world (corpora + questions) and, for the tiny model, its base weights (before any warm start),
    both cached under run.cache_dir; a given model.path is checked."""
    from data import WorldConfig, ensure_world
    from models import ModelConfig, ensure_base_model

    cache = Path(cfg.run.cache_dir)
    world_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    for key in DATASET_KEYS:
        world_cfg.pop(key, None)
    world_cache = Path(world_cfg.pop("cache_root", None) or cache)
    started = time.monotonic()
    log.info("preparing the synthetic world (first time: about a minute; cached after)")
    world = ensure_world(WorldConfig(**world_cfg), world_cache)
    log.info("world ready in %.1fs: %s", time.monotonic() - started, world.root)
    started = time.monotonic()
    model_cfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    base = ensure_base_model(model_cfg, world, cache)
    log.info("base model ready in %.1fs: %s", time.monotonic() - started, base)
    return world


def prepare_model(conf: dict, roles: Roles, world: Any, run_dir: Path) -> Path:
    """The model RL starts from: model.path, or the tiny model warm-started by the learner's SFT (model.sft) on the
    learner's placement (first time only: cached under run.cache_dir; its rows go to <run>/warm_start.jsonl)."""
    from launcher.sinks import JsonlSink
    from launcher.warm_start import RaySftRunner, ensure_model, sft_config, warm_start_cached
    from models import ModelConfig

    model_cfg, cache = ModelConfig.from_dict(conf["model"]), conf["run"]["cache_dir"]
    if warm_start_cached(model_cfg, world, cache):
        return ensure_model(model_cfg, world, cache)
    log.info("warm start of the tiny model: %d SFT steps on the learner ranks (first time only; cached after)",
             sft_config(model_cfg).steps)
    started = time.monotonic()
    sink = JsonlSink(run_dir / "warm_start.jsonl")
    try:
        path = ensure_model(model_cfg, world, cache, learner=conf["learner"],
                            runner=RaySftRunner(roles, sink, bool(conf["run"]["progress"])))
    finally:
        sink.close()
    log.info("warm start done in %.1fs: %s", time.monotonic() - started, path)
    return path


def run_sft(conf: dict, roles: Roles, world: Any, run_dir: Path) -> int:
    """algo=sft: the learner ranks fine-tune model.path (or the tiny model's base) on oracle episodes of the world;
    the result is <run>/model, a Hugging Face folder; metrics rows go to the run's sinks."""
    from launcher.sinks import Sinks
    from launcher.warm_start import RaySftRunner
    from models import ModelConfig, ensure_base_model
    from models.ensure import build_once, checkpoint_dtype

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
    (run_dir / RUN_MODEL_FILE).write_text(json.dumps({"model_path": str(base)}) + "\n")  # what it trained from
    shown = Path(conf["run"]["out_dir"]) / "model"
    print(f"\nwarm start of {conf['algo']['steps']} steps in {time.monotonic() - started:.0f}s -> {shown}\n"
          f"start RL from it: python launch.py model.path={shown}")
    return 0


def prepare_questions(data: dict, world: Any, run_dir: Path) -> Path:
    """The questions parquet actors play: the world's, or `data.path` (FVQA/InfoSeek-style parquet or an image
    folder) converted and validated into <run>/data/questions.parquet."""
    if not data.get("path"):
        return Path(world.questions)
    from data.datasets import convert_dataset

    return convert_dataset(data["path"], run_dir / "data" / "questions.parquet", data.get("dataset") or "auto",
                           data.get("image_root"))


def write_summary(run_dir: Path, memory: MemorySampler) -> None:
    summary = {"peak_mem_gib": round(memory.peak_gib, 3)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def check_config(cfg: DictConfig) -> None:
    """Cross-group consistency that no single group's dataclass can see; run.mode=sync pins max_staleness to 0."""
    if cfg.run.mode not in MODES:
        raise SystemExit(f"run.mode={cfg.run.mode!r}; expected one of {list(MODES)}")
    if cfg.run.mode == "sync" and int(cfg.algo.max_staleness) != 0:
        log.info("run.mode=sync: algo.max_staleness %s -> 0 (actors wait for each new version)",
                 cfg.algo.max_staleness)
        cfg.algo.max_staleness = 0
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


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _hydra_entry(cfg: DictConfig) -> None:
    logging.getLogger().setLevel(str(cfg.run.log_level))
    check_config(cfg)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    code = main(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    _hydra_entry()
