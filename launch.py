"""forage's entry point: build the run from conf/, start or join Ray, place every role, stream metrics, stop cleanly.

    python launch.py run.max_steps=3 run.out_dir=runs/demo       # the embedded default (CPU, tiny model)
    python launch.py actors.num_actors=2 tool_servers.image.replicas=2 learner.world_size=2
    python launch.py run.mode=eval run.eval.checkpoint=runs/demo/checkpoints    # also: run.mode=sync | curate
    python launch.py algo=sft run.out_dir=runs/sft                # the warm start alone -> runs/sft/model
    python launch.py --cfg job                                    # print the resolved config

`main` reads like docs/architecture.md's diagram: world + model (warm start on the learner ranks) -> tool servers ->
learner ranks -> rollout actors -> metrics loop. The pieces live in launcher/ (cluster and placement, starting and
supervising the roles, the warm start, run outputs, offline modes).
"""
from __future__ import annotations

import logging
import signal
import sys
import time
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from launcher.cluster import RayCluster, SocketAlias, configure_process_env
from launcher.heldout import report_text, start_tracker
from launcher.search_check import check_run_search_path
from launcher.logs import STAGES, quiet_console
from launcher.metrics import MemorySampler, stream_metrics
from launcher.prepare import build_world_and_base_model, check_config, prepare_questions
from launcher.run_folder import prepare_run_dir, record_model, training_summary, write_manifest, write_summary
from launcher.start import Roles
from launcher.supervise import Supervisor

log = logging.getLogger(STAGES)


def main(cfg: DictConfig) -> int:
    started = time.monotonic()
    run_dir = prepare_run_dir(cfg)
    sockets = SocketAlias(run_dir)
    configure_process_env(cfg.run, sockets.path)
    conf: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)
    memory = MemorySampler(float(cfg.run.memory_sample_s))
    cluster: RayCluster | None = None
    roles: Roles | None = None
    supervisor: Supervisor | None = None
    summary = ""  # the console's end of the run, printed last
    try:
        world = build_world_and_base_model(conf)
        cluster = RayCluster(conf["run"], run_dir, sockets.path)
        roles = Roles(conf)
        supervisor = Supervisor(roles)
        if cfg.algo.name == "sft":
            from launcher.warm_start import train_alone

            summary = train_alone(conf, roles, world, run_dir)
            return 0
        from launcher.warm_start import prepare_model

        model_path = prepare_model(conf, roles, world, run_dir)
        record_model(run_dir, model_path)
        questions = prepare_questions(conf["data"], world, run_dir)
        tools = roles.start_tool_servers(world)
        if cfg.run.mode in ("eval", "curate"):
            from launcher.offline import run_offline

            summary = run_offline(conf, roles, model_path, questions, tools, sockets.path)
            return 0
        check_run_search_path(conf, world, tools, run_dir)  # the oracle through the real tools: a sound path?
        learner = roles.start_learner(model_path)
        roles.start_actors(model_path, questions, tools, learner, sockets.path)
        write_manifest(run_dir, roles.where)  # where every role runs, readable during the run (rewritten at the end)
        tracker = start_tracker(conf, roles, run_dir)  # held-out passes at step 0: the policy and the baselines
        supervisor.start_training(int(cfg.run.max_steps))
        code = stream_metrics(conf["run"], run_dir, supervisor, memory, conf, tracker)
        summary = training_summary(run_dir, cfg.run.out_dir, time.monotonic() - started)
        if tracker is not None:
            summary += "\n" + report_text(tracker.report, cfg.run.out_dir)
        return code
    except KeyboardInterrupt:
        log.warning("interrupted: stopping every role (actors flush, learner checkpoints, tool servers drain)")
        return 130
    finally:
        ignore_signals_while_stopping()
        if roles is not None and supervisor is not None:
            write_manifest(run_dir, roles.where)
            supervisor.stop()
        if cluster is not None:
            cluster.shutdown()
        memory.stop()
        sockets.remove()
        log.info("peak memory of all forage processes: %.2f GiB (PSS)", memory.peak_gib)
        write_summary(run_dir, memory.peak_gib)
        if summary:
            print(f"\n{summary}")


def ignore_signals_while_stopping() -> None:
    """A second Ctrl-C must not abandon the shutdown half-way and leave processes behind."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _hydra_entry(cfg: DictConfig) -> None:
    logging.getLogger().setLevel(str(cfg.run.log_level))
    quiet_console(bool(cfg.run.verbose))
    check_config(cfg)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    code = main(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    _hydra_entry()
