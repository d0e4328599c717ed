"""The run modes without a learner: `eval` (one policy over a questions parquet, actors' eval table; a learner
checkpoint is exported onto its model first, learner/checkpoint.py) and `curate` (search balancing: k runs per
question with and without search, labels, a balanced subset). `run_offline` runs either as one Ray task placed like
a rollout actor, with one engine, and returns the table launch.py prints.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

from launcher.run_folder import base_model_of
from launcher.start import Roles, actor_tokens

log = logging.getLogger(__name__)



def _worker_setup() -> None:
    import torch

    torch.set_num_threads(1)  # this process tokenises and waits; the engine process does the work
    logging.getLogger().setLevel(os.environ.get("FORAGE_LOG_LEVEL", "INFO"))


# ---------------------------------------------------------------------------------------------- the driver side

def run_offline(conf: Mapping[str, Any], roles: Roles, model_path: Path, questions: Path,
                tools: dict[str, list[str]], run_dir: Path) -> str:
    """run.mode=eval: the policy (model or learner checkpoint) over the questions; run.mode=curate: search-balance
    labels and a balanced subset of the questions. Returns the console summary (a line and the table). `run_dir` is
    the socket-safe alias of the run folder."""
    from actors.eval import format_table

    run, mode = conf["run"], conf["run"]["mode"]
    settings = run[mode]
    actor_cfg = {"actors": {**conf["actors"], "sampling": {**conf["actors"]["sampling"],
                                                           "temperature": settings["temperature"]}},
                 "algo": conf["algo"], "tokens": actor_tokens(conf)}
    out = run_dir / mode
    started = time.monotonic()
    if mode == "eval":
        summary = roles.run_offline("eval", eval_task, str(model_path), str(questions), str(out), tools, actor_cfg,
                                    checkpoint=settings["checkpoint"], split=settings["split"],
                                    limit=settings["limit"], mode=settings["mode"])
        table = format_table(summary["table"])
    else:
        curation = {k: settings[k] for k in ("k", "free_min_acc", "required_min_acc", "free_fraction", "seed")}
        summary = roles.run_offline("curate", curate_task, str(model_path), str(questions), str(out), tools,
                                    actor_cfg, curation, split=settings["split"], limit=settings["limit"])
        table = curate_table(summary)
    shown = Path(run["out_dir"]) / mode  # `out` goes through the socket-safe alias, removed at the end
    return f"{mode} of {summary['questions']} question(s) in {time.monotonic() - started:.0f}s -> {shown}\n{table}"


# ---------------------------------------------------------------------------------------------- eval

def eval_task(model_path: str, data_path: str, out_dir: str, tools: Mapping[str, list[str]],
              actor_cfg: Mapping[str, Any], checkpoint: str | None = None, split: str | None = None,
              limit: int | None = None, mode: str = "policy") -> dict[str, Any]:
    """Ray task: evaluate `model_path` (or the weights of `checkpoint` on top of it) with actors' eval; the
    outputs (samples.jsonl/.parquet, summary.json/.md) land in `out_dir`. Returns the summary."""
    _worker_setup()
    from actors.eval import run_eval
    from learner.checkpoint import export_checkpoint, find_checkpoint

    if checkpoint:
        try:
            step = find_checkpoint(checkpoint)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"run.eval.checkpoint={exc}") from None
        model_path = str(export_checkpoint(step, base_model_of(step, model_path), Path(out_dir) / "model"))
    return run_eval(model_path, data_path, out_dir, dict(tools), dict(actor_cfg), split=split, limit=limit, mode=mode)


# ---------------------------------------------------------------------------------------------- curate

def without_search(cfg: Any) -> Any:
    """The same ActorConfig with every search disallowed: a search attempt is answered in-band ("answer on your
    own") and the episode goes on, so the run measures what the policy knows without tools."""
    episode = dataclasses.replace(cfg.episode, max_image_searches=0, max_text_searches=0,
                                  on_search_over_limit="inform")
    return dataclasses.replace(cfg, episode=episode)


def curate_task(model_path: str, data_path: str, out_dir: str, tools: Mapping[str, list[str]],
                actor_cfg: Mapping[str, Any], curation: Mapping[str, Any], split: str | None = None,
                limit: int | None = None) -> dict[str, Any]:
    """Ray task: k runs per question with search and k without, labels, the balanced subset; writes
    labels.parquet, balanced.parquet and summary.json into `out_dir`. Returns the summary."""
    _worker_setup()

    async def main() -> dict[str, Any]:
        from actors.config import ActorConfig
        from actors.eval import tool_clients

        clients = tool_clients(tools, ActorConfig.from_dict(dict(actor_cfg)))
        try:
            return await curate(model_path, data_path, out_dir, clients, actor_cfg, curation, split=split,
                                limit=limit)
        finally:
            for client in clients.values():
                await client.close()

    return asyncio.run(main())


async def curate(model_path: str, data_path: str, out_dir: str, tools: Mapping[str, Any],
                 actor_cfg: Mapping[str, Any], curation: Mapping[str, Any], *, split: str | None = None,
                 limit: int | None = None, engine: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """See curate_task. `tools` are tool callers ({tool: client}); `engine`/`tokenizer` replace the vLLM engine
    (tests)."""
    from actors.questions import load_questions
    from actors.config import ActorConfig
    from episode.tokenizer import EpisodeTokenizer
    from actors.eval import eval_questions
    from data.curation import CurationConfig, balanced_subset, label_questions, write_curated

    cfg = CurationConfig(**dict(curation))
    searching = ActorConfig.from_dict(dict(actor_cfg))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    questions = load_questions(data_path, split)[:limit]
    runs = [q for q in questions for _ in range(cfg.k)]  # k copies: eval seeds each by position
    tok = tokenizer or EpisodeTokenizer.from_pretrained(model_path)
    own_engine = engine is None
    if own_engine:
        from actors.engine import engine_for_actor

        engine = engine_for_actor(model_path, searching, out)
        await engine.start()
    started = time.perf_counter()
    try:
        with_rows = await eval_questions(engine, tok, tools, runs, searching, seed=searching.seed)
        without_rows = await eval_questions(engine, tok, {}, runs, without_search(searching),
                                            seed=searching.seed + len(runs))
    finally:
        if own_engine:
            await engine.close()
    records = label_questions(with_rows, without_rows, cfg)
    subset = balanced_subset(records, cfg)
    paths = write_curated(data_path, records, subset, out)
    counts = {label: sum(r["curated_label"] == label for r in records) for label in ("search_free", "search_required",
                                                                                     "unsolved")}
    summary = {"model": str(model_path), "data": str(data_path), "questions": len(records), "k": cfg.k,
               "labels": counts, "balanced": len(subset), "seconds": time.perf_counter() - started,
               "settings": dataclasses.asdict(cfg), "files": {k: str(v) for k, v in paths.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not subset:
        log.warning("curate: no balanced subset (labels %s): both search_free and search_required questions are "
                    "needed", counts)
    return summary


def curate_table(summary: Mapping[str, Any]) -> str:
    """The curation summary as a small markdown table."""
    labels = summary["labels"]
    lines = ["| label | questions |", "|---|---|"]
    lines += [f"| {label} | {count} |" for label, count in labels.items()]
    lines.append(f"| balanced subset | {summary['balanced']} |")
    return "\n".join(lines)
