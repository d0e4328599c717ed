"""Eval mode: play every question of a parquet dataset once with a fixed policy (no learner, no weight updates),
write per-sample results and aggregate accuracy and search ratios per question kind and per search label.

    SR           = searches made / searches allowed   (allowed = max_image_searches + max_text_searches per sample)
    searched     = share of samples that made at least one search (the "search ratio" of the MMSearch-R1 paper)

A sample a tool outage ended (`tool_failed`: deadline, every replica down, server error) is not the model's error:
`tool_failed` counts them, and the outcome columns (accuracy, reward, format, SR, searches, turns) are computed
over the n − tool_failed samples the tools answered, so an outage shows as a count, not as lower accuracy. `n`,
`searched` and `tool_errors` count every sample (a tool_failed one did decide to search: that is where the outage
met it).

Outputs in `out_dir`: samples.jsonl and samples.parquet (one row per question), summary.json (the table and the
settings) and summary.md (the table as markdown). Run it with `python -m actors eval ...` or call `run_eval`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

from actors.config import ActorConfig
from actors.episode import EpisodeResult, Question, ToolCaller, run_episode
from actors.questions import load_questions
from actors.reward import compute_reward
from episode.tokenizer import EpisodeTokenizer
from episode.turns import ANSWER, IMAGE_SEARCH, TEXT_SEARCH, last_answer
from protocol.metrics import Metrics

log = logging.getLogger(__name__)

TABLE_COLUMNS = ("group", "n", "accuracy", "reward", "format", "SR", "SR_image", "SR_text", "searched",
                 "searches", "turns", "tool_errors", "tool_failed")

# How an evaluation plays each question (run_episode's `workflow` and `hint`): as MMSearch-R1 prompts its baselines,
# always_search and never_search tell the model the workflow (episode.prompts.HINTS) and force its actions too.
#   policy         the model decides every turn
#   always_search  the RAG workflow: image search, then text search, then the answer (hint + forced)
#   never_search   the answer at once, no search (hint + forced)
#   workflow       what each question's kind needs: search-free questions answered directly (as never_search),
#                  search-required ones with the searches the oracle makes (forced): the warm start's check
EVAL_MODES = ("policy", "always_search", "never_search", "workflow")
RAG_WORKFLOW = (IMAGE_SEARCH, TEXT_SEARCH, ANSWER)
KIND_WORKFLOWS = {"pixels": (ANSWER,), "image_search": (IMAGE_SEARCH, ANSWER),
                  "image_text_search": (IMAGE_SEARCH, TEXT_SEARCH, ANSWER), "text_search": (TEXT_SEARCH, ANSWER)}


def workflow_for(mode: str, question: Question) -> tuple[str, ...] | None:
    """The forced actions of `question` in eval `mode` (None: the model decides)."""
    if mode == "policy":
        return None
    if mode == "always_search":
        return RAG_WORKFLOW
    if mode == "never_search":
        return (ANSWER,)
    if mode == "workflow":
        if question.kind not in KIND_WORKFLOWS:
            raise ValueError(f"question {question.id}: kind {question.kind!r} has no workflow; known: "
                             f"{sorted(KIND_WORKFLOWS)}")
        return KIND_WORKFLOWS[question.kind]
    raise ValueError(f"unknown eval mode {mode!r}; known: {EVAL_MODES}")


def hint_for(mode: str, question: Question) -> str | None:
    """The workflow hint `question` shows in eval `mode` (episode.prompts.HINTS), if any."""
    if mode in ("always_search", "never_search"):
        return mode
    if mode == "workflow" and workflow_for(mode, question) == (ANSWER,):
        return "never_search"
    return None


def heldout_questions(questions: list[Question], per_label: int | None) -> list[Question]:
    """The first `per_label` questions of each search label, in file order (all when None)."""
    if per_label is None:
        return list(questions)
    if per_label < 1:
        raise ValueError(f"per_label={per_label} must be >= 1 (or null for every question)")
    taken: dict[str, int] = {}
    chosen = []
    for question in questions:
        if taken.get(question.search_label, 0) < per_label:
            taken[question.search_label] = taken.get(question.search_label, 0) + 1
            chosen.append(question)
    return chosen


def sample_row(question: Question, result: EpisodeResult, cfg: ActorConfig) -> dict[str, Any]:
    """One question's result: prediction, correctness, reward parts, searches, turns."""
    reward = compute_reward(result.turns, question.answer, question.aliases, cfg.reward)
    prediction = last_answer(result.turns[-1]) if result.turns else None
    return {
        "id": question.id, "kind": question.kind, "search_label": question.search_label,
        "question": question.question, "answer": question.answer,
        "prediction": None if prediction is None else prediction.strip(),
        "correct": bool(reward.accuracy), "reward": reward.total, "format": reward.format,
        "image_searches": result.image_searches, "text_searches": result.text_searches,
        "searches": result.image_searches + result.text_searches, "turns": len(result.turns),
        "finish_reason": result.finish_reason, "tool_errors": result.tool_errors, "tool_failed": result.tool_failed,
        "tokens_generated": int(sum(result.loss_mask)), "episode_s": result.timings.get("episode_s", 0.0),
    }


def aggregate(rows: list[Mapping[str, Any]], max_image_searches: int, max_text_searches: int) -> list[dict]:
    """Table rows: "all", then one per question kind ("kind=...") and per search label ("label=..."). `n`,
    `searched`, `tool_errors` count every sample, `tool_failed` those a tool outage ended; the other columns are
    over the rest."""
    groups: dict[str, list[Mapping[str, Any]]] = {"all": list(rows)}
    for row in rows:
        groups.setdefault(f"kind={row['kind'] or '-'}", []).append(row)
    for row in rows:
        groups.setdefault(f"label={row['search_label'] or '-'}", []).append(row)
    allowed = max_image_searches + max_text_searches
    table = []
    for name, everyone in groups.items():
        if not everyone:
            continue
        members = [r for r in everyone if not r.get("tool_failed", False)]
        n = max(len(members), 1)  # all tool_failed: the rates are 0 and `tool_failed` says why
        image = sum(r["image_searches"] for r in members)
        text = sum(r["text_searches"] for r in members)
        table.append({
            "group": name, "n": len(everyone),
            "accuracy": sum(r["correct"] for r in members) / n,
            "reward": sum(r["reward"] for r in members) / n,
            "format": sum(r["format"] for r in members) / n,
            "SR": (image + text) / (n * allowed) if allowed else 0.0,
            "SR_image": image / (n * max_image_searches) if max_image_searches else 0.0,
            "SR_text": text / (n * max_text_searches) if max_text_searches else 0.0,
            "searched": sum(r["searches"] > 0 for r in everyone) / len(everyone),
            "searches": (image + text) / n,
            "turns": sum(r["turns"] for r in members) / n,
            "tool_errors": sum(r["tool_errors"] for r in everyone),
            "tool_failed": len(everyone) - len(members),
        })
    return table


def format_table(table: list[Mapping[str, Any]]) -> str:
    """The aggregate table as markdown."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    for row in table:
        cells = [row[c] if isinstance(row[c], (str, int)) else f"{row[c]:.3f}" for c in TABLE_COLUMNS]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


async def eval_questions(engine: Any, tok: EpisodeTokenizer, tools: Mapping[str, ToolCaller],
                         questions: list[Question], cfg: ActorConfig, seed: int = 0,
                         metrics: Metrics | None = None, mode: str = "policy",
                         request_prefix: str = "eval") -> list[dict[str, Any]]:
    """One episode per question, up to cfg.max_concurrency at once, played as eval `mode` says; rows in question
    order. An episode whose engine call fails is an error (eval has no re-runs: a crash invalidates the
    measurement)."""
    slots = asyncio.Semaphore(cfg.max_concurrency)
    metrics = metrics or Metrics()
    workflows = [workflow_for(mode, q) for q in questions]  # bad modes and kinds fail before any episode
    hints = [hint_for(mode, q) for q in questions]

    async def one(i: int, question: Question) -> dict[str, Any]:
        async with slots:
            result = await run_episode(engine, tok, tools, question, cfg.episode, cfg.sampling,
                                       request_id=f"{request_prefix}-{i}", seed=seed + i, metrics=metrics,
                                       workflow=workflows[i], hint=hints[i])
        return sample_row(question, result, cfg)

    return list(await asyncio.gather(*(one(i, q) for i, q in enumerate(questions))))


async def eval_dataset(model_path: str | Path, data_path: str | Path, out_dir: str | Path,
                       tool_endpoints: Mapping[str, list[str]] | None = None, cfg: Mapping[str, Any] | None = None, *,
                       split: str | None = None, limit: int | None = None, engine: Any = None,
                       tokenizer: EpisodeTokenizer | None = None, mode: str = "policy") -> dict[str, Any]:
    """Evaluate `model_path` on the questions of `data_path` (all rows, or `split`; the first `limit`), played as
    eval `mode` says (EVAL_MODES); write the outputs to `out_dir` and return the summary. `engine`/`tokenizer`
    replace the vLLM engine (tests)."""
    from actors.engine import engine_for_actor

    actor_cfg = ActorConfig.from_dict(cfg or {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    questions = load_questions(data_path, split)[:limit]
    tok = tokenizer or EpisodeTokenizer.from_pretrained(model_path)
    own_engine = engine is None
    if own_engine:
        engine = engine_for_actor(model_path, actor_cfg, out)
        await engine.start()
    tools = tool_clients(tool_endpoints or {}, actor_cfg)
    metrics = Metrics()
    started = time.perf_counter()
    try:
        rows = await eval_questions(engine, tok, tools, questions, actor_cfg, seed=actor_cfg.seed, metrics=metrics,
                                    mode=mode)
    finally:
        for client in tools.values():
            await client.close()
        if own_engine:
            await engine.close()
    seconds = time.perf_counter() - started
    table = aggregate(rows, actor_cfg.episode.max_image_searches, actor_cfg.episode.max_text_searches)
    failed = sum(bool(r["tool_failed"]) for r in rows)
    if failed:
        log.warning("eval: %d of %d episodes were cut by a tool outage (tool_failed); the table's rates leave them "
                    "out", failed, len(rows))
    summary = {"model": str(model_path), "data": str(data_path), "split": split, "mode": mode, "questions": len(rows),
               "tool_failed": failed, "seconds": seconds, "table": table, "metrics": metrics.snapshot(),
               "settings": {"episode": asdict(actor_cfg.episode), "sampling": asdict(actor_cfg.sampling),
                            "reward": asdict(actor_cfg.reward)}}
    _write_outputs(out, rows, summary)
    log.info("eval of %d questions in %.1f s -> %s", len(rows), seconds, out)
    return summary


def run_eval(model_path: str | Path, data_path: str | Path, out_dir: str | Path,
             tool_endpoints: Mapping[str, list[str]] | None = None, cfg: Mapping[str, Any] | None = None, *,
             split: str | None = None, limit: int | None = None, mode: str = "policy") -> dict[str, Any]:
    """Blocking form of `eval_dataset` (for launch.py and scripts; not from inside a running event loop)."""
    return asyncio.run(eval_dataset(model_path, data_path, out_dir, tool_endpoints, cfg, split=split, limit=limit,
                                    mode=mode))


def tool_clients(endpoints: Mapping[str, list[str]], cfg: ActorConfig) -> dict[str, Any]:
    """A ToolClient per tool over its replicas, as every player of episodes (rollout actor, eval, curate) makes
    them: the tool servers' token (cfg.tokens.tools), the episode's tool deadline, cfg.tool_retries."""
    from tool_servers.client import ToolClient

    return {tool: ToolClient(list(eps), token=cfg.tokens.tools, default_deadline_s=cfg.episode.tool_deadline_s,
                             retries=cfg.tool_retries)
            for tool, eps in endpoints.items()}


def _write_outputs(out: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(out / "samples.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    if rows:
        pq.write_table(pa.Table.from_pylist(rows), out / "samples.parquet")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "summary.md").write_text(format_table(summary["table"]) + "\n")
