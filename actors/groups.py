"""The rollout actor's episode loop: one admitted group is G concurrent episodes of its question on the current
engine, at most `max_concurrency` episodes in flight on the engine in all; on any failure the whole group is re-run
(after restarting a crashed engine), up to `group_attempts` times, so a group is shipped whole or not at all. The
finished episodes are scored (actors/reward.py), counted in metrics, and spooled as one TrajectoryGroup. Episodes
a tool outage ended (tool_failed) travel in the group, flagged, and are counted apart (`tool_failed_episodes`).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Awaitable, Callable, Mapping

from actors.config import ActorConfig
from actors.engine_slot import EngineSlot
from actors.episode import EpisodeResult, Question, ToolCaller, run_episode
from actors.reward import compute_reward
from actors.spool import Grant, GroupSpool
from episode.tokenizer import EpisodeTokenizer
from protocol import TrajectoryGroup, encode
from protocol.ledger import Ledger
from protocol.metrics import Metrics

log = logging.getLogger(__name__)


class GroupFailed(RuntimeError):
    """A group failed on every attempt (or its engine could not be restarted); its admission was released."""


def first_error(exc: BaseException) -> BaseException:
    """The first leaf of an exception group (TaskGroup wraps episode errors), else `exc` itself."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


class GroupPlayer:
    """Plays admitted groups for actor `actor_id` (seeded by `seed`) on the engine of `slot`. `reach_version(v)`
    waits for the engine to run the version a group was granted at; `release_grant(grant, reason, group_id)` gives
    an admission back when its group cannot be played. `ledger` gets a `started` line per group (with its
    admission's request id and granted version)."""

    def __init__(self, actor_id: str, seed: int, cfg: ActorConfig, slot: EngineSlot, tokenizer: EpisodeTokenizer,
                 tools: Mapping[str, ToolCaller], spool: GroupSpool, metrics: Metrics,
                 reach_version: Callable[[int], Awaitable[None]],
                 release_grant: Callable[[Grant, str, str], Awaitable[None]], ledger: Ledger | None = None) -> None:
        self.actor_id, self.seed, self.cfg = actor_id, seed, cfg
        self.slot, self.tokenizer, self.tools, self.spool = slot, tokenizer, tools, spool
        self.metrics = metrics
        self.reach_version, self.release_grant = reach_version, release_grant
        self.ledger = ledger or Ledger(None)
        self._episode_slots = asyncio.Semaphore(cfg.max_concurrency)
        self._groups_started = 0

    async def play(self, grant: Grant, question: Question) -> tuple[TrajectoryGroup, bytes]:
        """Play G episodes of `question` on the current engine; on any failure re-run the whole group (after
        restarting a crashed engine), up to group_attempts times. Returns the spooled group and its frame."""
        slot, cfg = self.slot, self.cfg
        assert slot.up is not None
        index = self._groups_started
        self._groups_started += 1
        group_id = f"{self.actor_id}-{index}-{uuid.uuid4().hex[:8]}"
        self.ledger.write("started", group_id=group_id, request_id=grant.request_id, question_id=grant.question_id,
                          version=grant.version)
        await self.reach_version(grant.version)
        started = time.perf_counter()
        for attempt in range(cfg.group_attempts):
            await slot.up.wait()
            engine, generation = slot.engine, slot.generation
            try:
                async with asyncio.TaskGroup() as episodes:
                    tasks = [episodes.create_task(self._episode(engine, question, f"{group_id}-a{attempt}-e{i}",
                                                                self._episode_seed(index, attempt, i)))
                             for i in range(cfg.group_size)]
                break
            except Exception as group_error:
                exc = first_error(group_error)
                self.metrics.inc("group_failures")
                log.warning("%s: group %s attempt %d failed: %r", self.actor_id, group_id, attempt + 1, exc)
                try:
                    if attempt + 1 == cfg.group_attempts:
                        raise GroupFailed(f"{self.actor_id}: group {group_id} failed {attempt + 1} times; "
                                          f"last error: {exc!r}") from exc
                    await slot.recover(generation, exc)
                except BaseException:
                    await self.release_grant(grant, f"group {group_id} failed: {exc!r}", group_id)
                    raise
                self.metrics.inc("group_reruns")
        group = self._make_group(group_id, question, [t.result() for t in tasks])
        self.metrics.observe("group_play_s", time.perf_counter() - started)
        self.metrics.inc("groups_played")
        frame = encode(group)
        await asyncio.get_running_loop().run_in_executor(None, self.spool.put, group, frame, grant.request_id)
        return group, frame

    def _episode_seed(self, group_index: int, attempt: int, i: int) -> int:
        return (self.seed * 1_000_003 + group_index * 1009 + attempt * 7919 + i) % (1 << 31)

    async def _episode(self, engine: Any, question: Question, request_id: str, seed: int
                       ) -> tuple[EpisodeResult, int]:
        """One episode; returns it with the policy version current when it finished."""
        async with self._episode_slots:
            result = await run_episode(engine, self.tokenizer, self.tools, question, self.cfg.episode,
                                       self.cfg.sampling, request_id=request_id, seed=seed, metrics=self.metrics)
        return result, int(engine.version)

    def _make_group(self, group_id: str, question: Question, played: list[tuple[EpisodeResult, int]]
                    ) -> TrajectoryGroup:
        """Score the episodes, record their metrics, and build the group."""
        trajectories = []
        m = self.metrics
        for result, finish_version in played:
            reward = compute_reward(result.turns, question.answer, question.aliases, self.cfg.reward,
                                    version=finish_version)
            trajectories.append(result.to_trajectory(reward))
            generated = [v for v, mask in zip(result.versions, result.loss_mask) if mask]
            m.inc("episodes")
            m.inc("tokens_generated", len(generated))
            m.inc("tokens_total", len(result.token_ids))
            m.inc("image_searches", result.image_searches)
            m.inc("text_searches", result.text_searches)
            m.inc("tool_errors", result.tool_errors)
            m.inc("tool_failed_episodes", int(result.tool_failed))
            if not result.tool_failed:  # an outage's reward says nothing about the policy (the learner drops it too)
                m.observe("reward", reward.total)
                m.observe("accuracy", reward.accuracy)
            m.observe("turns_per_episode", len(result.turns))
            m.observe("searches_per_episode", result.image_searches + result.text_searches)
            m.observe("episode_s", result.timings.get("episode_s", 0.0))
            if generated:
                lags = [finish_version - v for v in generated]
                m.observe("token_staleness", sum(lags) / len(lags))  # mean lag of an episode's tokens at its end
                m.observe("token_staleness_max", max(lags))
                m.observe("versions_per_episode", len(set(generated)))
        return TrajectoryGroup(group_id=group_id, actor_id=self.actor_id, prompt_id=question.id, kind=question.kind,
                               search_label=question.search_label, trajectories=trajectories)
