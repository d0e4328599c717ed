"""The rollout actor: spool slot -> admission -> question -> G concurrent episodes -> rewards -> spooled, acked
TrajectoryGroup, while a background task pulls new policy versions from the learner and swaps them into the engine
in place. A crashed engine is restarted (at the newest applied version) and the groups it was playing are re-run
from scratch: a group is shipped whole or not at all.

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
from actors.engine import EngineError, EngineHung, engine_for_actor
from actors.episode import EpisodeResult, Question, ToolCaller, first_prompt_length, run_episode
from episode.tokenizer import EpisodeTokenizer
from actors.reward import compute_reward
from actors.spool import Grant, GroupSpool
from actors.transport import LearnerLink, TransportClosed
from actors.weights import WeightApplier
from protocol import ProtocolError, TrajectoryGroup, encode
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


class GroupFailed(RuntimeError):
    """A group failed on every attempt (or its engine could not be restarted); its admission was released."""


def first_error(exc: BaseException) -> BaseException:
    """The first leaf of an exception group (TaskGroup wraps episode errors), else `exc` itself."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


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
        self.actor_dir = self.run_dir / "actors" / actor_id
        # Actors share cfg.seed; mixing in the id gives each its own question order and sampling seeds.
        self.seed = (self.cfg.seed * 1_000_003 + zlib.crc32(actor_id.encode())) % (1 << 31)
        self._metrics = Metrics()
        self.engine: Any = None  # VllmEngine (tests substitute fakes through _make_engine)
        self.tokenizer: EpisodeTokenizer | None = None
        self.tools: dict[str, ToolCaller] = {}
        self.link: LearnerLink | None = None
        self._order: QuestionOrder | None = None
        self._questions: dict[str, Question] = {}
        self._spool: GroupSpool | None = None
        self._weights: WeightApplier | None = None
        self._episode_slots: asyncio.Semaphore | None = None
        self._stopping: asyncio.Event | None = None  # events and locks are created on the actor's loop, in start()
        self._run_done: asyncio.Event | None = None
        self._engine_up: asyncio.Event | None = None  # cleared while the engine restarts
        self._engine_lock: asyncio.Lock | None = None  # weight updates and restarts, one at a time
        self._engine_generation = 0  # bumped by every restart
        self._poller: asyncio.Task | None = None
        self._fatal: BaseException | None = None  # why the weight poller died (re-raised by run())
        self._groups_started = 0
        self._run_started: float | None = None

    # ------------------------------------------------------------------ lifetime

    async def start(self) -> None:
        """Load questions and tokenizer, start the engine (weights on disk = version 0), connect tools and learner."""
        cfg = self.cfg
        self._stopping, self._run_done, self._engine_up = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self._engine_lock = asyncio.Lock()
        self._episode_slots = asyncio.Semaphore(cfg.max_concurrency)
        self.tokenizer = EpisodeTokenizer.from_pretrained(self.model_path)
        playable = self._playable(load_questions(self.data_path, cfg.split))
        self._questions = {q.id: q for q in playable}
        self._order = QuestionOrder(playable, seed=self.seed)
        self._spool = GroupSpool(self.actor_dir / "spool", cfg.spool_max_groups, self._metrics)
        self._weights = WeightApplier(self.actor_dir / "weights", cfg.engine.dtype, self._metrics)
        weight_dir = self.actor_dir / "weights"
        for stale in [*weight_dir.glob("v*"), *weight_dir.glob(".v*.tmp")]:  # a previous incarnation's: never reloaded
            stale.unlink()
        self.engine = self._make_engine()
        await self.engine.start()
        self._engine_up.set()
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

    def _make_engine(self) -> Any:
        cfg = self.cfg
        transfer = "nccl" if self.learner_endpoints.get("weights_transport") == "nccl" else "file"
        return engine_for_actor(self.model_path, cfg, self.actor_dir, seed=self.seed, weight_transfer=transfer)

    def _make_tools(self) -> dict[str, ToolCaller]:
        from tool_servers.client import ToolClient

        return {tool: ToolClient(endpoints, default_deadline_s=self.cfg.episode.tool_deadline_s,
                                 retries=self.cfg.tool_retries)
                for tool, endpoints in self.tool_endpoints.items()}

    async def run(self) -> None:
        """Play admitted groups until stop() or the learner says it is stopping; re-raise the first group error.

        Each group holds a spool slot from before its admission until its ack: with `spool_max_groups` groups
        unacked (a slow or dead learner) no admission is asked for."""
        if self.engine is None or self.link is None or self._spool is None:
            raise RuntimeError("RolloutActor.run() before start()")
        self._run_started = time.perf_counter()
        self._poller = asyncio.create_task(self._poll_weights(), name=f"{self.actor_id}-weights")
        self._poller.add_done_callback(self._on_poller_done)
        group_slots = asyncio.Semaphore(self.cfg.max_groups_in_flight)
        groups: set[asyncio.Task] = set(self._resume_spool(group_slots))
        try:
            while await self._take_slots(group_slots):
                _reap(groups)
                request_id = uuid.uuid4().hex
                self._spool.record_request(request_id)  # a crash before the answer is recorded releases it
                reply = await self.link.request_admission(request_id)
                if not reply.granted:
                    self._spool.drop_request(request_id)
                    group_slots.release()
                    self._spool.release()
                    if reply.stopping:
                        log.info("%s: learner is stopping; no more groups", self.actor_id)
                        break
                    self._metrics.inc("admissions_denied")
                    await self._sleep_unless_stopping(reply.retry_after_ms / 1000.0)
                    continue
                groups.add(self._start_group(reply, group_slots))
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
            log.warning("%s: learner link closed during stop; %d group(s) stay in the spool for the next start",
                        self.actor_id, self._spool.count())
        finally:
            self._run_done.set()

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop asking for admissions, let groups in flight finish and be acked (up to `timeout_s`, default
        stop_timeout_s), close. Groups not acked by then stay in the spool on disk (resent by the next actor with
        this run folder). Pass 0 when the learner has already closed its intake: no ack can come."""
        timeout = self.cfg.stop_timeout_s if timeout_s is None else timeout_s
        if self._stopping is not None:
            self._stopping.set()
        if self._run_done is not None and self._poller is not None:
            try:
                await asyncio.wait_for(self._run_done.wait(), timeout)
            except asyncio.TimeoutError:
                log.warning("%s: groups still in flight after %.0f s; closing anyway (kept in the spool)",
                            self.actor_id, timeout)
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        if self.link is not None:
            await self.link.close()
        if self._run_done is not None and self._poller is not None:
            try:  # with the link closed, run() ends at once (waiting senders get TransportClosed)
                await asyncio.wait_for(self._run_done.wait(), 10.0)
            except asyncio.TimeoutError:
                log.error("%s: run() did not end after the learner link closed", self.actor_id)
        for client in self.tools.values():
            close = getattr(client, "close", None)
            if close is not None:
                await close()
        if self.engine is not None:
            await self.engine.close()
        if self._weights is not None:
            self._weights.clear()
        log.info("%s stopped", self.actor_id)

    def metrics(self) -> dict[str, float]:
        """Counters, gauges and latency summaries of this actor (flat, for metrics.jsonl)."""
        if self.engine is not None:
            self._metrics.set("policy_version", self.engine.version)
        if self.link is not None:
            self._metrics.set("groups_unacked", self.link.unacked)
        if self._run_started is not None:
            elapsed = max(time.perf_counter() - self._run_started, 1e-9)
            self._metrics.set("run_s", elapsed)
            self._metrics.set("episodes_per_s", self._metrics.counter("episodes") / elapsed)
            self._metrics.set("tokens_per_s", self._metrics.counter("tokens_generated") / elapsed)
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

    # ------------------------------------------------------------------ groups

    async def _take_slots(self, group_slots: asyncio.Semaphore) -> bool:
        """A spool slot, then a group slot; False (holding neither) once stop() was called."""
        if not await self._unless_stopping(self._spool.acquire(), self._spool.release):
            return False
        if not await self._unless_stopping(group_slots.acquire(), group_slots.release):
            self._spool.release()
            return False
        return True

    def _start_group(self, reply: Any, group_slots: asyncio.Semaphore) -> asyncio.Task:
        """Record the granted admission (until its group is spooled) and play its group in a task."""
        assert self._order is not None and self._spool is not None
        self._metrics.inc("admissions_granted")
        question = self._order.next()
        grant = Grant(request_id=reply.request_id, question_id=question.id, version=reply.version)
        self._spool.record_grant(grant)
        self._spool.drop_request(reply.request_id)
        return asyncio.create_task(self._admitted_group(grant, question, group_slots, acquire=False),
                                   name=f"{self.actor_id}-group")

    def _resume_spool(self, group_slots: asyncio.Semaphore) -> list[asyncio.Task]:
        """Tasks for what a previous actor with this folder left: resend its finished groups, re-play its grants."""
        assert self._spool is not None
        unanswered = self._spool.unanswered_requests()
        grants, groups = self._spool.leftovers()
        tasks = [asyncio.create_task(self._release_unanswered(request_id)) for request_id in unanswered]
        if not (grants or groups):
            return tasks
        if not self.cfg.spool_resume:
            self._metrics.inc("spool_discarded", self._spool.discard_leftovers())
            log.warning("%s: discarded %d leftover group(s) and %d grant(s) (spool_resume=false); their admissions "
                        "are given back", self.actor_id, len(groups), len(grants))
            for grant in grants:
                tasks.append(asyncio.create_task(self._release_unanswered(grant.request_id, "spool_resume=false")))
            return tasks
        log.info("%s: resending %d spooled group(s), re-playing %d admitted group(s)", self.actor_id, len(groups),
                 len(grants))
        self._metrics.inc("spool_resent", len(groups))
        self._metrics.inc("spool_replayed", len(grants))
        tasks += [asyncio.create_task(self._leftover_group(group)) for group in groups]
        for grant in grants:
            question = self._questions.get(grant.question_id)
            if question is None:  # the data changed: the group can never be played
                tasks.append(asyncio.create_task(self._give_up_grant(grant, "question no longer in the data")))
            else:
                tasks.append(asyncio.create_task(self._admitted_group(grant, question, group_slots, acquire=True)))
        return tasks

    async def _release_unanswered(self, request_id: str,
                                  reason: str = "the actor restarted before recording the answer") -> None:
        """Give back an admission a previous process of this actor asked for (or held) and will never play; the
        learner frees it if it had granted it (and counts an unknown one)."""
        assert self._spool is not None and self.link is not None
        await self.link.release_admission(request_id, reason)
        self._spool.drop_request(request_id)
        self._metrics.inc("spool_admissions_released")
        log.warning("%s: released admission %s (%s)", self.actor_id, request_id, reason)

    async def _admitted_group(self, grant: Grant, question: Question, group_slots: asyncio.Semaphore,
                              acquire: bool) -> None:
        """One admitted group from play to ack, holding a spool slot throughout and a group slot while playing."""
        assert self._spool is not None
        if acquire:
            await self._spool.acquire()
            await group_slots.acquire()
        try:
            try:
                group, frame = await self._play_group(grant, question)
            finally:
                group_slots.release()
            await self._ship(group, frame)
        finally:
            self._spool.release()

    async def _leftover_group(self, group: TrajectoryGroup) -> None:
        assert self._spool is not None
        await self._spool.acquire()
        try:
            await self._ship(group, encode(group))
        finally:
            self._spool.release()

    async def _ship(self, group: TrajectoryGroup, frame: bytes) -> None:
        """Send until acked (the learner may restart meanwhile), then forget the spooled copy."""
        assert self.link is not None and self._spool is not None
        ack = await self.link.send_group(group, frame)
        self._spool.remove(group.group_id)
        if not ack.accepted:  # the learner freed its admission slot; the group is not retried
            log.warning("%s: learner rejected group %s: %s", self.actor_id, group.group_id, ack.message)

    async def _give_up_grant(self, grant: Grant, reason: str) -> None:
        assert self.link is not None and self._spool is not None
        self._spool.drop_grant(grant.request_id)
        self._metrics.inc("admissions_released")
        await self.link.release_admission(grant.request_id, reason)

    async def _play_group(self, grant: Grant, question: Question) -> tuple[TrajectoryGroup, bytes]:
        """Play G episodes of `question` on the current engine; on any failure re-run the whole group (after
        restarting a crashed engine), up to group_attempts times. Returns the spooled group and its frame."""
        assert self._spool is not None and self._engine_up is not None
        cfg = self.cfg
        index = self._groups_started
        self._groups_started += 1
        group_id = f"{self.actor_id}-{index}-{uuid.uuid4().hex[:8]}"
        await self._reach_version(grant.version)
        started = time.perf_counter()
        for attempt in range(cfg.group_attempts):
            await self._engine_up.wait()
            engine, generation = self.engine, self._engine_generation
            try:
                async with asyncio.TaskGroup() as episodes:
                    tasks = [episodes.create_task(self._episode(engine, question, f"{group_id}-a{attempt}-e{i}",
                                                                self._episode_seed(index, attempt, i)))
                             for i in range(cfg.group_size)]
                break
            except Exception as group_error:
                exc = first_error(group_error)
                self._metrics.inc("group_failures")
                log.warning("%s: group %s attempt %d failed: %r", self.actor_id, group_id, attempt + 1, exc)
                try:
                    if attempt + 1 == cfg.group_attempts:
                        raise GroupFailed(f"{self.actor_id}: group {group_id} failed {attempt + 1} times; "
                                          f"last error: {exc!r}") from exc
                    await self._recover_engine(generation, exc)
                except BaseException:
                    await self._give_up_grant(grant, f"group {group_id} failed: {exc!r}")
                    raise
                self._metrics.inc("group_reruns")
        group = self._make_group(group_id, question, [t.result() for t in tasks])
        self._metrics.observe("group_play_s", time.perf_counter() - started)
        self._metrics.inc("groups_played")
        frame = encode(group)
        await asyncio.get_running_loop().run_in_executor(None, self._spool.put, group, frame, grant.request_id)
        return group, frame

    async def _reach_version(self, version: int) -> None:
        """Wait until the engine runs policy `version` (or newer) before playing a group granted at it: the
        admission rule bounds staleness from the granted version, and with max_staleness=0 (run.mode=sync) this is
        what makes actors wait for each new version. The weight poller brings it within a poll interval."""
        assert self._engine_up is not None
        if int(self.engine.version) >= version:
            return
        started = time.perf_counter()
        self._metrics.inc("version_waits")
        while int(self.engine.version) < version or not self._engine_up.is_set():
            if self._poller is None or self._poller.done():
                raise TransportClosed(f"{self.actor_id}: weight updates stopped before version {version} arrived")
            await asyncio.sleep(min(self.cfg.weight_poll_s, 0.05))
        self._metrics.observe("version_wait_s", time.perf_counter() - started)

    def _episode_seed(self, group_index: int, attempt: int, i: int) -> int:
        return (self.seed * 1_000_003 + group_index * 1009 + attempt * 7919 + i) % (1 << 31)

    async def _episode(self, engine: Any, question: Question, request_id: str, seed: int
                       ) -> tuple[EpisodeResult, int]:
        """One episode; returns it with the policy version current when it finished."""
        assert self._episode_slots is not None and self.tokenizer is not None
        async with self._episode_slots:
            result = await run_episode(engine, self.tokenizer, self.tools, question, self.cfg.episode,
                                       self.cfg.sampling, request_id=request_id, seed=seed, metrics=self._metrics)
        return result, int(engine.version)

    def _make_group(self, group_id: str, question: Question, played: list[tuple[EpisodeResult, int]]
                    ) -> TrajectoryGroup:
        """Score the episodes, record their metrics, and build the group."""
        trajectories = []
        m = self._metrics
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

    # ------------------------------------------------------------------ engine crashes

    def _engine_healthy(self) -> bool:
        check = getattr(self.engine, "is_healthy", None)
        return True if check is None else bool(check())

    async def _recover_engine(self, generation: int, exc: BaseException) -> None:
        """After a failure seen on engine `generation`: restart the engine if it died (once, however many groups
        saw it die), at the newest applied weight version. A live engine is left alone (the group just re-runs)."""
        assert self._engine_lock is not None and self._engine_up is not None and self._weights is not None
        async with self._engine_lock:
            hung = isinstance(exc, EngineHung)  # alive to is_healthy(), but answering nothing: restart it too
            if generation != self._engine_generation or (not hung and self._engine_healthy()):
                return
            restarts = self._metrics.counter("engine_restarts")
            if restarts >= self.cfg.max_engine_restarts:
                raise EngineError(f"{self.actor_id}: engine died again after {restarts:.0f} restart(s) "
                                  f"(max_engine_restarts={self.cfg.max_engine_restarts}): {exc!r}") from exc
            self._metrics.inc("engine_restarts")
            log.error("%s: engine %s (%r); restarting it", self.actor_id, "hung" if hung else "died", exc)
            self._engine_up.clear()
            started = time.perf_counter()
            try:
                try:
                    await self.engine.close()
                except Exception as close_error:  # a dead engine may not close cleanly; a new one replaces it
                    log.warning("%s: closing the dead engine raised %r", self.actor_id, close_error)
                self.engine = self._make_engine()
                await self.engine.start()
                await self._weights.reapply(self.engine)
                self._engine_generation += 1
            finally:
                self._engine_up.set()
            self._metrics.observe("engine_restart_s", time.perf_counter() - started)
            log.info("%s: engine restarted at version %d in %.1f s", self.actor_id, self.engine.version,
                     time.perf_counter() - started)

    # ------------------------------------------------------------------ weights

    async def _poll_weights(self) -> None:
        """Every weight_poll_s: fetch a newer version if there is one and apply it while episodes run."""
        assert self.link is not None and self._engine_up is not None and self._engine_lock is not None
        while True:
            await self._engine_up.wait()
            try:
                update = await self.link.poll_weights(self.engine.version)
            except ProtocolError as exc:
                self._metrics.inc("weight_errors")
                log.error("%s: bad weights from the learner: %s", self.actor_id, exc)
                update = None
            if update is not None:
                await self._apply_weights(update)
            await asyncio.sleep(self.cfg.weight_poll_s)

    async def _apply_weights(self, update: Any) -> None:
        assert self._weights is not None and self._engine_lock is not None
        generation = self._engine_generation
        try:
            async with self._engine_lock:
                version, seconds = await self._weights.apply(self.engine, update)
        except ProtocolError as exc:  # nothing reached the engine (e.g. an fs version vanished): poll again
            self._metrics.inc("weight_errors")
            log.error("%s: could not stage weights version %d: %s", self.actor_id, update.version, exc)
            return
        except Exception as exc:
            if self._engine_healthy():
                raise  # a live engine that failed to load: its weights are in doubt (fatal, see _on_poller_done)
            await self._recover_engine(generation, exc)  # it died loading: back at the previous version
            return
        self._metrics.observe("weight_update_s", seconds)
        self._metrics.inc("weight_updates")
        log.info("%s: now at policy version %d (%.2f s)", self.actor_id, version, seconds)

    async def _unless_stopping(self, acquire: Any, release: Any) -> bool:
        """Await `acquire` (a slot) unless stop() comes first; True when the slot was taken."""
        assert self._stopping is not None
        take = asyncio.ensure_future(acquire)
        stop = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({take, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not take.done():
            take.cancel()
        try:
            await take
        except asyncio.CancelledError:
            return False
        if self._stopping.is_set():
            release()
            return False
        return True

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass


def _reap(groups: set[asyncio.Task]) -> None:
    """Drop finished group tasks; re-raise the first failure now rather than at the end."""
    for done in [t for t in groups if t.done()]:
        groups.discard(done)
        done.result()
