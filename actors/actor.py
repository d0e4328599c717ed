"""The rollout actor: admission -> question -> G concurrent episodes -> rewards -> acked TrajectoryGroup, while a
background task pulls new policy versions from the learner and swaps them into the engine in place.

A plain class; launch.py wraps it as a Ray actor and calls start(), run(), stop() and metrics().
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
import zlib
from pathlib import Path
from typing import Any, Mapping

from actors.config import ActorConfig
from actors.engine import VllmEngine
from actors.episode import EpisodeResult, EpisodeTokenizer, Question, ToolCaller, first_prompt_length, run_episode
from actors.reward import compute_reward
from actors.transport import LearnerLink, TransportClosed
from protocol import ProtocolError, TrajectoryGroup
from protocol.metrics import Metrics

log = logging.getLogger(__name__)


def load_questions(path: str | Path, split: str | None = "train") -> list[Question]:
    """Questions of `split` from a questions parquet (id, image, question, answer, aliases[, kind, search_label,
    split]); every row when the file has no split column or `split` is None."""
    import pyarrow.parquet as pq

    table = pq.read_table(str(path))
    missing = {"id", "image", "question", "answer", "aliases"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: questions parquet lacks columns {sorted(missing)}")
    rows = table.to_pylist()
    if split is not None and "split" in table.column_names:
        rows = [r for r in rows if r["split"] == split]
    if not rows:
        raise ValueError(f"{path}: no questions of split {split!r}")
    return [Question(id=str(r["id"]), question=r["question"], answer=r["answer"], aliases=list(r["aliases"] or []),
                     image=r["image"], kind=r.get("kind") or "", search_label=r.get("search_label") or "")
            for r in rows]


class QuestionOrder:
    """A seeded endless order over the questions: each epoch a fresh shuffle."""

    def __init__(self, questions: list[Question], seed: int) -> None:
        self._questions = questions
        self._rng = random.Random(seed)
        self._order: list[int] = []
        self.epoch = -1

    def next(self) -> Question:
        if not self._order:
            self._order = list(range(len(self._questions)))
            self._rng.shuffle(self._order)
            self._order.reverse()  # pop() from the end keeps the shuffled order
            self.epoch += 1
        return self._questions[self._order.pop()]


class RolloutActor:
    def __init__(self, actor_id: str, model_path: str, data_path: str, tool_endpoints: dict[str, list[str]],
                 learner_endpoints: dict[str, str], cfg: Mapping[str, Any], run_dir: str) -> None:
        self.actor_id = actor_id
        self.model_path = Path(model_path)
        self.data_path = Path(data_path)
        self.tool_endpoints = {k: list(v) for k, v in tool_endpoints.items()}
        self.learner_endpoints = dict(learner_endpoints)
        self.cfg = ActorConfig.from_dict(cfg)
        self.run_dir = Path(run_dir)
        # Actors share cfg.seed; mixing in the id gives each its own question order and sampling seeds.
        self.seed = (self.cfg.seed * 1_000_003 + zlib.crc32(actor_id.encode())) % (1 << 31)
        self._metrics = Metrics()
        self.engine: VllmEngine | None = None
        self.tokenizer: EpisodeTokenizer | None = None
        self.tools: dict[str, ToolCaller] = {}
        self.link: LearnerLink | None = None
        self._order: QuestionOrder | None = None
        self._episode_slots: asyncio.Semaphore | None = None
        self._stopping: asyncio.Event | None = None  # events are created on the actor's loop, in start()
        self._run_done: asyncio.Event | None = None
        self._poller: asyncio.Task | None = None
        self._fatal: BaseException | None = None  # why the weight poller died (re-raised by run())
        self._groups_started = 0

    # ------------------------------------------------------------------ lifetime

    async def start(self) -> None:
        """Load questions and tokenizer, start the engine (weights on disk = version 0), connect tools and learner."""
        cfg = self.cfg
        self._stopping = asyncio.Event()
        self._run_done = asyncio.Event()
        self._episode_slots = asyncio.Semaphore(cfg.max_concurrency)
        self.tokenizer = EpisodeTokenizer.from_pretrained(self.model_path)
        self._order = QuestionOrder(self._playable(load_questions(self.data_path, cfg.split)), seed=self.seed)
        self.engine = self._make_engine()
        await self.engine.start()
        self._metrics.set("engine_startup_s", self.engine.startup_s)
        self.tools = self._make_tools()
        self.link = LearnerLink(self.actor_id, self.learner_endpoints, cfg.transport, self._metrics)
        log.info("%s ready: %s, tools %s, learner %s", self.actor_id, self.model_path, sorted(self.tools),
                 self.learner_endpoints)

    def _playable(self, questions: list[Question]) -> list[Question]:
        """Questions whose first prompt leaves room to generate within max_total_tokens (and whose image reads).
        Skipping them here, before any admission, keeps the learner's admission count honest."""
        assert self.tokenizer is not None
        limit = self.cfg.episode.max_total_tokens
        playable = []
        for q in questions:
            try:
                fits = first_prompt_length(self.tokenizer, q) < limit
            except ValueError as exc:
                log.warning("%s: skipping question: %s", self.actor_id, exc)
                fits = False
            if fits:
                playable.append(q)
        skipped = len(questions) - len(playable)
        self._metrics.set("questions_skipped", skipped)
        if skipped:
            log.warning("%s: %d of %d questions skipped (unreadable image or first prompt >= max_total_tokens=%d)",
                        self.actor_id, skipped, len(questions), limit)
        if not playable:
            raise ValueError(f"no playable question in {self.data_path} with max_total_tokens={limit}")
        return playable

    def _make_engine(self) -> VllmEngine:
        cfg = self.cfg
        return VllmEngine(self.model_path, cfg.engine, self.run_dir / "actors" / self.actor_id,
                          cache_dir=cfg.cache_dir, max_model_len=cfg.episode.max_total_tokens,
                          max_images=cfg.episode.max_images, seed=self.seed)

    def _make_tools(self) -> dict[str, ToolCaller]:
        from tool_servers.client import ToolClient

        return {tool: ToolClient(endpoints, default_deadline_s=self.cfg.episode.tool_deadline_s,
                                 retries=self.cfg.tool_retries)
                for tool, endpoints in self.tool_endpoints.items()}

    async def run(self) -> None:
        """Play admitted groups until stop() or the learner says it is stopping; re-raise the first group error."""
        if self.engine is None or self.link is None:
            raise RuntimeError("RolloutActor.run() before start()")
        self._poller = asyncio.create_task(self._poll_weights(), name=f"{self.actor_id}-weights")
        self._poller.add_done_callback(self._on_poller_done)
        group_slots = asyncio.Semaphore(self.cfg.max_groups_in_flight)
        groups: set[asyncio.Task] = set()
        try:
            while not self._stopping.is_set():
                await group_slots.acquire()
                for done in [t for t in groups if t.done()]:
                    groups.discard(done)
                    done.result()  # surface a failed group now
                if self._stopping.is_set():
                    break
                reply = await self.link.request_admission()
                if reply.stopping:
                    log.info("%s: learner is stopping; no more groups", self.actor_id)
                    break
                if not reply.granted:
                    group_slots.release()
                    self._metrics.inc("admissions_denied")
                    await self._sleep_unless_stopping(reply.retry_after_ms / 1000.0)
                    continue
                self._metrics.inc("admissions_granted")
                task = asyncio.create_task(self._play_group(reply.version), name=f"{self.actor_id}-group")
                task.add_done_callback(lambda _t: group_slots.release())
                groups.add(task)
            if groups:
                await asyncio.gather(*groups)  # flush: finish and deliver the groups in flight
            if self._fatal is not None:
                raise RuntimeError(f"{self.actor_id}: applying new weights failed") from self._fatal
        except BaseException as exc:
            for task in groups:
                task.cancel()
            await asyncio.gather(*groups, return_exceptions=True)
            if not (isinstance(exc, TransportClosed) and self._stopping.is_set()):
                raise
            log.warning("%s: learner link closed during stop; %d group(s) not delivered", self.actor_id, len(groups))
        finally:
            self._run_done.set()

    async def stop(self) -> None:
        """Stop asking for admissions, let groups in flight finish and be acked (up to stop_timeout_s), close."""
        if self._stopping is not None:
            self._stopping.set()
        if self._run_done is not None and self._poller is not None:
            try:
                await asyncio.wait_for(self._run_done.wait(), self.cfg.stop_timeout_s)
            except asyncio.TimeoutError:
                log.warning("%s: groups still in flight after %.0f s; closing anyway", self.actor_id,
                            self.cfg.stop_timeout_s)
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        if self.link is not None:
            await self.link.close()
        for client in self.tools.values():
            close = getattr(client, "close", None)
            if close is not None:
                await close()
        if self.engine is not None:
            await self.engine.close()
        log.info("%s stopped", self.actor_id)

    def metrics(self) -> dict[str, float]:
        """Counters, gauges and latency summaries of this actor (flat, for metrics.jsonl)."""
        if self.engine is not None:
            self._metrics.set("policy_version", self.engine.version)
        if self.link is not None:
            self._metrics.set("groups_unacked", self.link.unacked)
        out = self._metrics.snapshot()
        for tool, client in self.tools.items():
            tool_metrics = getattr(client, "metrics", None)
            if isinstance(tool_metrics, Metrics):
                out.update({f"tool_client_{tool}_{k}": v for k, v in tool_metrics.snapshot().items()})
        return {f"actor_{k}": v for k, v in out.items()}

    def _on_poller_done(self, task: asyncio.Task) -> None:
        """A failed weight update leaves the engine's weights in doubt: stop taking groups and fail run()."""
        if task.cancelled() or task.exception() is None:
            return
        self._fatal = task.exception()
        self._metrics.inc("weight_errors")
        log.error("%s: weight updates stopped: %r", self.actor_id, self._fatal)
        self._stopping.set()

    # ------------------------------------------------------------------ groups and episodes

    async def _play_group(self, admitted_version: int) -> None:
        assert self._order is not None and self.link is not None
        question = self._order.next()
        index = self._groups_started
        self._groups_started += 1
        group_id = f"{self.actor_id}-{index}-{uuid.uuid4().hex[:8]}"
        started = time.perf_counter()
        results = await asyncio.gather(*(self._episode(question, group_id, index, i)
                                         for i in range(self.cfg.group_size)))
        trajectories = []
        for result in results:
            reward = compute_reward(result.turns, question.answer, question.aliases)
            trajectories.append(result.to_trajectory(reward))
            self._metrics.observe("reward", reward.total)
            self._metrics.observe("accuracy", reward.accuracy)
        group = TrajectoryGroup(group_id=group_id, actor_id=self.actor_id, prompt_id=question.id,
                                kind=question.kind, search_label=question.search_label, trajectories=trajectories)
        self._metrics.observe("group_play_s", time.perf_counter() - started)
        self._metrics.inc("groups_played")
        ack = await self.link.send_group(group)
        if not ack.accepted:
            log.warning("%s: learner rejected group %s (admitted at version %d): %s", self.actor_id, group_id,
                        admitted_version, ack.message)

    async def _episode(self, question: Question, group_id: str, group_index: int, i: int) -> EpisodeResult:
        assert self._episode_slots is not None and self.engine is not None and self.tokenizer is not None
        seed = (self.seed * 1_000_003 + group_index * 1009 + i) % (1 << 31)
        async with self._episode_slots:
            result = await run_episode(self.engine, self.tokenizer, self.tools, question, self.cfg.episode,
                                       self.cfg.sampling, request_id=f"{group_id}-e{i}", seed=seed,
                                       metrics=self._metrics)
        generated = sum(result.loss_mask)
        self._metrics.inc("episodes")
        self._metrics.inc("tokens_generated", generated)
        self._metrics.inc("tokens_total", len(result.token_ids))
        self._metrics.inc("image_searches", result.image_searches)
        self._metrics.inc("text_searches", result.text_searches)
        self._metrics.inc("tool_errors", result.tool_errors)
        if generated:
            versions = {v for v, m in zip(result.versions, result.loss_mask) if m}
            self._metrics.observe("versions_per_episode", len(versions))
        self._metrics.observe("episode_s", result.timings.get("episode_s", 0.0))
        return result

    # ------------------------------------------------------------------ weights

    async def _poll_weights(self) -> None:
        """Every weight_poll_s: fetch a newer version if there is one and apply it while episodes run."""
        assert self.link is not None and self.engine is not None
        while True:
            try:
                update = await self.link.poll_weights(self.engine.version)
            except ProtocolError as exc:
                self._metrics.inc("weight_errors")
                log.error("%s: bad weights from the learner: %s", self.actor_id, exc)
                update = None
            if update is not None:
                version, state = update
                await self._apply_weights(version, state)
            await asyncio.sleep(self.cfg.weight_poll_s)

    async def _apply_weights(self, version: int, state: dict) -> None:
        from safetensors.torch import save_file

        assert self.engine is not None
        folder = self.run_dir / "actors" / self.actor_id / "weights"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"v{version}.safetensors"
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, save_file, state, str(path))
            seconds = await self.engine.update_weights(version, path)
        finally:
            path.unlink(missing_ok=True)
        self._metrics.observe("weight_update_s", seconds)
        self._metrics.inc("weight_updates")
        log.info("%s: now at policy version %d (%.2f s)", self.actor_id, version, seconds)

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass
