"""Is the search path sound? The scripted oracle plays the held-out questions of the synthetic world through the
run's real tool servers (ZMQ clients, the same replicas the actors use) and the real reward, so a backend or reward
that cannot carry a correct answer shows up before any model is blamed:

    image_top1      image search ranks the pictured entity first
    text_hit        text search for "<entity> <fact>" returns the entity's page stating the fact
    accuracy_<kind> the oracle's answer (the top title; the fact read off the top hit) scored by actors' reward

Run by launch.py after the tool servers start (its line goes to the console and <run>/warm_start.jsonl).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Mapping

from actors.reward import PAPER_PATTERNS, RewardConfig, compute_reward
from data.world import FACTS, KINDS, WorldPaths, load_world, read_fact

log = logging.getLogger(__name__)


async def _check(world_paths: WorldPaths, endpoints: Mapping[str, list[str]], split: str, limit: int | None,
                 reward_cfg: RewardConfig, deadline_s: float, token: str | None) -> dict[str, float]:
    from tool_servers.client import ToolClient

    world = load_world(world_paths)
    rows = [q for q in world.questions if q["split"] == split]
    if limit is not None:
        rows = [q for kind in KINDS for q in [r for r in rows if r["kind"] == kind][:limit]]
    clients = {tool: ToolClient(list(addresses), token=token, default_deadline_s=deadline_s)
               for tool, addresses in endpoints.items()}
    counts: dict[str, list[int]] = {"image_top1": [0, 0], "text_hit": [0, 0],
                                    **{f"accuracy_{k}": [0, 0] for k in KINDS}}

    async def play(row: dict) -> None:
        kind, attribute, entity = row["kind"], row["attribute"], row["entity"]
        name = entity if kind == "text_search" else None
        turns = []
        if kind in ("image_search", "image_text_search"):
            reply = await clients["image_search"].call("image_search", {"image": row["image"]})
            top = reply.items[0].title if reply.ok and reply.items else None
            counts["image_top1"][0] += top == entity
            counts["image_top1"][1] += 1
            name = top
            turns.append("<reason>i search the image.</reason><search><img></search>")
        if kind == "pixels":
            answer = row["answer"]
        elif kind == "image_search":
            answer = name
        else:
            value = None
            if name is not None and attribute in FACTS:
                reply = await clients["text_search"].call("text_search", {"query": f"{name} {attribute}"})
                hit = reply.items[0] if reply.ok and reply.items else None
                value = read_fact(hit.text, attribute, name) if hit is not None else None
                counts["text_hit"][0] += hit is not None and hit.title == entity and value == row["answer"]
                counts["text_hit"][1] += 1
                turns.append(f"<reason>i need the {attribute} of {name}.</reason>"
                             f"<text_search> {name} {attribute} </text_search>")
            answer = value
        turns.append(f"<reason>so.</reason><answer> {answer} </answer>")
        correct = answer is not None and compute_reward(turns, row["answer"], row["aliases"], reward_cfg).accuracy > 0
        counts[f"accuracy_{kind}"][0] += correct
        counts[f"accuracy_{kind}"][1] += 1

    try:
        for start in range(0, len(rows), 32):  # a few requests at a time: the servers' queues stay short
            await asyncio.gather(*(play(row) for row in rows[start:start + 32]))
    finally:
        for client in clients.values():
            await client.close()
    return {key: hits / total for key, (hits, total) in counts.items() if total}


def check_search_path(world_paths: WorldPaths, endpoints: Mapping[str, list[str]], reward: Mapping[str, Any],
                      split: str = "test", limit: int | None = None, deadline_s: float = 10.0,
                      token: str | None = None) -> dict[str, float]:
    """The figures above on the `split` questions (the first `limit` of each kind, or all); `token`: the tool
    servers' shared secret, when they have one."""
    missing = {"image_search", "text_search"} - set(endpoints)
    if missing:
        raise ValueError(f"the search-path check needs both tools; not running: {sorted(missing)}")
    started = time.monotonic()
    reward_cfg = RewardConfig(**{**reward, "valid_patterns": tuple(reward.get("valid_patterns", PAPER_PATTERNS))})
    figures = asyncio.run(_check(world_paths, endpoints, split, limit, reward_cfg, deadline_s, token))
    figures["seconds"] = time.monotonic() - started
    return figures


def describe(figures: Mapping[str, float]) -> str:
    kinds = ", ".join(f"{k} {figures[f'accuracy_{k}']:.2f}" for k in KINDS if f"accuracy_{k}" in figures)
    return (f"search path (oracle through the tool servers, held-out): image top-1 {figures.get('image_top1', 0):.3f}"
            f", text hit {figures.get('text_hit', 0):.3f}, oracle accuracy {kinds}")


def check_run_search_path(conf: Mapping[str, Any], world_paths: WorldPaths, endpoints: Mapping[str, list[str]],
                          run_dir: Any) -> dict[str, float] | None:
    """The check on a training run that plays the synthetic world on local tools (else None): console + the run's
    warm_start.jsonl. A failing check is logged, not fatal: the run's own evaluations show the consequences."""
    from launcher.heldout import record_warm_start
    from launcher.logs import STAGES
    from launcher.start import tool_token

    tools = conf["tool_servers"]
    if conf["data"].get("path") or any(tools[t].get("backend", "local") != "local" for t in ("image", "text")):
        return None
    try:
        figures = check_search_path(world_paths, endpoints, conf["actors"]["reward"],
                                    split=conf["run"]["report"]["split"] or "test", token=tool_token(tools))
    except Exception as exc:
        log.error("search-path check failed: %s", exc)
        return None
    logging.getLogger(STAGES).info(describe(figures))
    record_warm_start(run_dir, {"search_path": figures})
    return figures
