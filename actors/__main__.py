"""`python -m actors eval`: evaluate a fixed policy on a questions parquet (see actors/eval.py)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any


def parse_tools(specs: list[str]) -> dict[str, list[str]]:
    """["image_search=tcp://127.0.0.1:5001,tcp://127.0.0.1:5002", ...] -> {tool: [endpoints]}."""
    tools: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, endpoints = spec.partition("=")
        if not sep or not name or not endpoints:
            raise ValueError(f"--tools takes TOOL=ENDPOINT[,ENDPOINT...], got {spec!r}")
        tools.setdefault(name, []).extend(e for e in endpoints.split(",") if e)
    return tools


def actors_conf(path: str | None, temperature: float, cache_dir: str) -> dict[str, Any]:
    """The `actors` settings: a conf/actors YAML (its ${run.cache_dir} and ${algo.temperature} resolved from the
    arguments) or the defaults; sampling.temperature is always the --temperature given."""
    from omegaconf import OmegaConf

    actors: dict[str, Any] = {}
    if path:
        root = OmegaConf.create({"actors": OmegaConf.load(path), "run": {"cache_dir": cache_dir},
                                 "algo": {"temperature": temperature}})
        actors = OmegaConf.to_container(root, resolve=True)["actors"]
    actors.setdefault("sampling", {})["temperature"] = temperature
    actors["cache_dir"] = cache_dir
    return actors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m actors", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="evaluate a fixed policy on a questions parquet")
    ev.add_argument("--model", required=True, help="local HF model folder")
    ev.add_argument("--data", required=True, help="questions parquet (id, image, question, answer, aliases, ...)")
    ev.add_argument("--out", required=True, help="output folder (samples.jsonl/.parquet, summary.json/.md)")
    ev.add_argument("--tools", action="append", default=[], metavar="TOOL=ENDPOINT[,ENDPOINT]",
                    help="tool server replicas, e.g. image_search=tcp://127.0.0.1:5001 (repeatable); a tool "
                         "without servers answers every call with the in-band error text")
    ev.add_argument("--split", default=None, help="only questions of this split (default: all rows)")
    ev.add_argument("--limit", type=int, default=None, help="only the first N questions")
    ev.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    ev.add_argument("--mode", default="policy",
                    help="policy: the model decides; always_search: image search, text search, answer (the RAG "
                         "baseline); never_search: the answer at once; workflow: the searches each question's kind "
                         "needs")
    ev.add_argument("--actors-conf", default=None, help="a conf/actors YAML for episode limits and engine settings")
    ev.add_argument("--cache-dir", default=".forage_cache", help="vLLM / inductor compile caches")
    ev.add_argument("--token-env", default=None, metavar="VAR",
                    help="environment variable holding the tool servers' shared token (when they have one)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)  # this process only tokenises and waits; vLLM's engine process does the work
    from actors.eval import format_table, run_eval

    from actors.eval import EVAL_MODES

    if args.mode not in EVAL_MODES:
        parser.error(f"--mode {args.mode!r}: expected one of {list(EVAL_MODES)}")
    from protocol.sockets import token_from_env

    try:
        tools = parse_tools(args.tools)
        cfg = {"actors": actors_conf(args.actors_conf, args.temperature, str(Path(args.cache_dir).resolve())),
               "tokens": {"tools": token_from_env(args.token_env, "--token-env")}}
    except ValueError as exc:
        parser.error(str(exc))
    summary = run_eval(args.model, args.data, args.out, tools, cfg, split=args.split, limit=args.limit,
                       mode=args.mode)
    print(format_table(summary["table"]))
    print(f"\n{summary['questions']} questions in {summary['seconds']:.1f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
