"""Run the learner alone on one machine: `python -m learner --model PATH [--steps N] [--metrics out.jsonl]`, or the
warm start alone: `python -m learner --sft --model PATH --world WORLD_DIR --out DIR [--steps N]`.
(The code lives here rather than in __main__.py because spawned ranks must import `_rank` by module name.)

Spawns `learner.world_size` LearnerRank processes (gloo on 127.0.0.1), prints rank 0's endpoints as one JSON line
for actors to connect to, trains until N steps are done or Ctrl-C, and appends each step's metrics row to --metrics.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import queue as queue_module
from pathlib import Path
from typing import Any

import yaml

from protocol.sockets import free_port

CONF = Path(__file__).resolve().parent.parent / "conf"


def _rank(rank: int, world_size: int, port: int, model: str, cfg: dict[str, Any], steps: int, out, stop) -> None:
    import threading

    import torch

    from learner.role import LearnerRank

    torch.set_num_threads(cfg["learner"].get("threads", 1))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s")
    learner = LearnerRank(rank, world_size, "127.0.0.1", port, model, cfg)
    learner.publish_initial()
    if rank == 0:
        out.put(("endpoints", learner.endpoints()))

        def forward_metrics() -> None:  # the role's second caller, as a Ray wrapper would be
            while not stop.wait(0.5):
                for row in learner.drain_metrics():
                    out.put(("metrics", row))
            learner.stop()

        threading.Thread(target=forward_metrics, daemon=True).start()
    learner.run(steps)
    if rank == 0:
        for row in learner.drain_metrics():
            out.put(("metrics", row))
        out.put(("done", None))
    learner.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local HF model folder (e.g. the tiny model from models/)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimiser steps before exiting (default: 10; --sft: conf/algo/sft.yaml's)")
    parser.add_argument("--learner-conf", default=str(CONF / "learner" / "fsdp_cpu.yaml"))
    parser.add_argument("--algo-conf", default=str(CONF / "algo" / "grpo.yaml"))
    parser.add_argument("--metrics", default="", help="append per-step metrics rows (JSON lines) to this file")
    parser.add_argument("--sft", action="store_true", help="the warm start (conf/algo/sft.yaml) instead of RL")
    parser.add_argument("--sft-conf", default=str(CONF / "algo" / "sft.yaml"))
    parser.add_argument("--tools-conf", default=str(CONF / "tool_servers" / "local.yaml"),
                        help="--sft: the tool servers whose results the oracle simulates")
    parser.add_argument("--world", default="", help="--sft: a synthetic world folder (questions.parquet, corpora)")
    parser.add_argument("--out", default="", help="--sft: where the fine-tuned model folder is written")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.sft:
        run_sft(args)
        return
    cfg = {"learner": load_group(Path(args.learner_conf)),
           "algo": yaml.safe_load(Path(args.algo_conf).read_text())}
    world_size = int(cfg["learner"].get("world_size", 2))
    port = free_port()  # for the rendezvous
    ctx = mp.get_context("spawn")
    out, stop = ctx.Queue(), ctx.Event()
    ranks = [ctx.Process(target=_rank, args=(r, world_size, port, args.model, cfg, args.steps or 10, out, stop))
             for r in range(world_size)]
    for process in ranks:
        process.start()
    try:
        while any(p.is_alive() for p in ranks):
            try:
                kind, value = out.get(timeout=1.0)
            except queue_module.Empty:
                continue
            if kind == "endpoints":
                print(json.dumps(value), flush=True)
            elif kind == "metrics" and args.metrics:
                with open(args.metrics, "a") as f:
                    f.write(json.dumps(value) + "\n")
            elif kind == "done":
                break
    except KeyboardInterrupt:
        logging.info("stopping the learner")
    finally:
        stop.set()
        for process in ranks:
            process.join(60)
    failed = [p.exitcode for p in ranks if p.exitcode]
    if failed:
        raise SystemExit(f"learner ranks exited with {failed}")


def load_group(path: Path) -> dict:
    """A conf group file on its own: its ${run.*} interpolations (run.seed) resolve against conf/run/local.yaml."""
    from omegaconf import OmegaConf

    run = yaml.safe_load((CONF / "run" / "local.yaml").read_text())
    run.pop("out_dir", None)  # ${now:...} needs Hydra's resolver; nothing here reads it
    tree = OmegaConf.create({"run": run, "group": yaml.safe_load(Path(path).read_text())})
    return OmegaConf.to_container(tree, resolve=True)["group"]


def load_sft_conf(sft_conf: Path, tools_conf: Path) -> dict:
    """An algo=sft file with its interpolations resolved: the oracle's simulated tools follow `tools_conf` (a
    conf/tool_servers file), as they follow the run's tool servers under launch.py."""
    from omegaconf import OmegaConf

    tree = OmegaConf.create({"tool_servers": yaml.safe_load(tools_conf.read_text()),
                             "sft": yaml.safe_load(sft_conf.read_text())})
    return OmegaConf.to_container(tree, resolve=True)["sft"]


def run_sft(args: argparse.Namespace) -> None:
    from learner.sft import run_sft_local

    if not args.world or not args.out:
        raise SystemExit("--sft needs --world WORLD_DIR and --out DIR")
    if Path(args.out).exists():
        raise SystemExit(f"--out {args.out} already exists")
    sft = load_sft_conf(Path(args.sft_conf), Path(args.tools_conf))
    if args.steps is not None:
        sft["steps"] = args.steps
        sft["vision_steps"] = min(sft.get("vision_steps", 0), args.steps)
    cfg = {"learner": load_group(Path(args.learner_conf)), "sft": sft}

    def write(row: dict) -> None:
        if args.metrics:
            with open(args.metrics, "a") as f:
                f.write(json.dumps(row) + "\n")

    report = run_sft_local(args.model, args.world, args.out, cfg, on_row=write)
    print(json.dumps(report), flush=True)
