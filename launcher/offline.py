"""The run modes without a learner: `eval` (one policy over a questions parquet, actors' eval table) and `curate`
(search balancing: k runs per question with and without search, labels, a balanced subset). Each runs as one Ray
task placed like a rollout actor, with one engine; `export_checkpoint` turns a learner checkpoint into a model folder.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

RUN_MODEL_FILE = "model.json"  # in a run folder: {"model_path": the model the run trained from}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _worker_setup() -> None:
    import torch

    torch.set_num_threads(1)  # this process tokenises and waits; the engine process does the work
    logging.getLogger().setLevel(os.environ.get("FORAGE_LOG_LEVEL", "INFO"))


# ---------------------------------------------------------------------------------------------- checkpoints

def resolve_eval_checkpoint(path: str | Path) -> Path:
    """A learner checkpoint directory (step_NNNNNNNN/) or a checkpoint root (its newest complete checkpoint)."""
    from learner.checkpoint import STATE_FILE, list_checkpoints

    candidate = Path(path)
    if (candidate / STATE_FILE).is_file() and (candidate / ".metadata").is_file():
        return candidate
    found = list_checkpoints(candidate)
    if not found:
        raise FileNotFoundError(f"run.eval.checkpoint={path}: neither a learner checkpoint (step_NNNNNNNN/ with "
                                f"{STATE_FILE} and .metadata) nor a folder holding one")
    return found[-1]


def base_model_of(checkpoint: Path, default: str | Path) -> str:
    """The model a checkpoint was trained from: the `model.json` launch.py wrote into that run's folder (the
    checkpoint's grandparent, or its parent), else `default`. The tiny model's cache key changes with its build
    code, so the run's own record beats whatever model this launch built."""
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        record = folder / RUN_MODEL_FILE
        if record.is_file():
            recorded = Path(json.loads(record.read_text())["model_path"])
            if (recorded / "config.json").is_file():
                return str(recorded)
            log.warning("%s names %s, which is gone; exporting onto %s", record, recorded, default)
    return str(default)


def export_checkpoint(checkpoint: str | Path, base_model: str | Path, out_dir: str | Path) -> Path:
    """An HF model folder at `out_dir`: the model weights of a learner checkpoint (DCP, any world size) on top of
    `base_model`'s architecture, with the base folder's tokenizer, processor and chat-template files. Returns it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from learner.trainer import load_model

    checkpoint, base, out = Path(checkpoint), Path(base_model), Path(out_dir)
    started = time.perf_counter()
    model = load_model(str(base))
    state = {"model": get_model_state_dict(model)}
    with warnings.catch_warnings():  # no process group on purpose: DCP reads every rank's shard in this process
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, checkpoint_id=str(checkpoint))
    set_model_state_dict(model, state["model"])
    out.mkdir(parents=True, exist_ok=True)
    for item in base.iterdir():  # tokenizer, processor, chat template, generation config, build notes
        if item.is_file() and item.name not in WEIGHT_FILES and not item.name.startswith("model-"):
            shutil.copy2(item, out / item.name)
    model.save_pretrained(out)
    (out / "forage_checkpoint.json").write_text(json.dumps({"checkpoint": str(checkpoint), "base": str(base)}) + "\n")
    log.info("exported %s onto %s -> %s in %.1fs", checkpoint, base, out, time.perf_counter() - started)
    return out


# ---------------------------------------------------------------------------------------------- eval

def eval_task(model_path: str, data_path: str, out_dir: str, tools: Mapping[str, list[str]],
              actor_cfg: Mapping[str, Any], checkpoint: str | None = None, split: str | None = None,
              limit: int | None = None) -> dict[str, Any]:
    """Ray task: evaluate `model_path` (or the weights of `checkpoint` on top of it) with actors' eval; the
    outputs (samples.jsonl/.parquet, summary.json/.md) land in `out_dir`. Returns the summary."""
    _worker_setup()
    from actors.eval import run_eval

    if checkpoint:
        step = resolve_eval_checkpoint(checkpoint)
        model_path = str(export_checkpoint(step, base_model_of(step, model_path), Path(out_dir) / "model"))
    return run_eval(model_path, data_path, out_dir, dict(tools), dict(actor_cfg), split=split, limit=limit)


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
        from tool_servers.client import ToolClient

        searching = ActorConfig.from_dict(dict(actor_cfg))
        clients = {tool: ToolClient(list(eps), default_deadline_s=searching.episode.tool_deadline_s,
                                    retries=searching.tool_retries) for tool, eps in tools.items()}
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
    from actors.actor import load_questions
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
