"""The rollout actor: spool slot -> admission -> question -> G concurrent episodes -> rewards -> spooled, acked
TrajectoryGroup, while a background task pulls new policy versions from the learner and swaps them into the engine
in place. A crashed engine is restarted (at the newest applied version) and the groups it was playing are re-run
from scratch: a group is shipped whole or not at all.

`RolloutActor` wires the parts together and owns their lifetime: the engine (actors/engine_slot.py), the episode
loop (actors/groups.py), admission and shipping (actors/admission.py) and weights in (actors/weights.py). A plain
class; the launcher wraps it as a Ray actor and calls start(), run(), stop() and metrics().
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import zlib
from pathlib import Path
from typing import Any, Mapping

from actors.admission import AdmissionLoop
from actors.config import ActorConfig, SamplingConfig
from actors.eval import EVAL_MODES, tool_clients
from actors.engine import engine_for_actor
from actors.engine_slot import EngineSlot
from actors.episode import Question, ToolCaller, first_prompt_length
from actors.groups import GroupPlayer
from actors.questions import QuestionOrder, load_questions
from actors.spool import Grant, GroupSpool
from actors.transport import LearnerLink
from actors.weights import WeightApplier, WeightPoller
from episode.tokenizer import EpisodeTokenizer
from protocol.ledger import Ledger, actor_ledger_path
from protocol.metrics import Metrics

log = logging.getLogger(__name__)


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
        self.tokenizer: EpisodeTokenizer | None = None
        self.tools: dict[str, ToolCaller] = {}
        self.link: LearnerLink | None = None
        self._order: QuestionOrder | None = None
        self._questions: dict[str, Question] = {}
        self._spool: GroupSpool | None = None
        self._weights: WeightApplier | None = None
        self._slot: EngineSlot | None = None
        self._poller: WeightPoller | None = None
        self._admissions: AdmissionLoop | None = None
        self._stopping: asyncio.Event | None = None  # events are created on the actor's loop, in start()
        self._run_done: asyncio.Event | None = None
        self._run_started: float | None = None
        self._eval_sets: dict[tuple[str | None, int | None], list[Question]] = {}
        self._ledger = Ledger(None)

    @property
    def engine(self) -> Any:
        """The engine in use (VllmEngine; tests substitute fakes through _make_engine)."""
        return None if self._slot is None else self._slot.engine

    # ------------------------------------------------------------------ lifetime

    async def start(self) -> None:
        """Load questions and tokenizer, start the engine (weights on disk = version 0), connect tools and learner."""
        cfg = self.cfg
        self._stopping, self._run_done = asyncio.Event(), asyncio.Event()
        self.tokenizer = EpisodeTokenizer.from_pretrained(self.model_path)
        playable = self._playable(load_questions(self.data_path, cfg.split, cfg.train_labels))
        self._questions = {q.id: q for q in playable}
        self._order = QuestionOrder(playable, seed=self.seed)
        self._spool = GroupSpool(self.actor_dir / "spool", cfg.spool_max_groups, self._metrics)
        # What became of each group, one line per event (launcher/audit.py); a restarted process appends.
        self._ledger = Ledger(actor_ledger_path(self.run_dir, self.actor_id), actor=self.actor_id)
        self._ledger.write("open")
        self._weights = WeightApplier(self.actor_dir / "weights", cfg.engine.dtype, self._metrics)
        weight_dir = self.actor_dir / "weights"
        for stale in [*weight_dir.glob("v*"), *weight_dir.glob(".v*.tmp")]:  # a previous incarnation's: never reloaded
            stale.unlink()
        self._slot = EngineSlot(self.actor_id, lambda: self._make_engine(), self._weights, cfg.max_engine_restarts,
                                self._metrics)
        await self._slot.start()
        self._metrics.set("engine_startup_s", self.engine.startup_s)
        self.tools = self._make_tools()
        self.link = LearnerLink(self.actor_id, self.learner_endpoints, cfg.transport, self._metrics,
                                token=cfg.tokens.learner)
        self._poller = WeightPoller(self.actor_id, self._slot, self.link, self._weights, cfg.weight_poll_s,
                                    self._metrics, on_fatal=lambda exc: self._stopping.set())
        player = GroupPlayer(self.actor_id, self.seed, cfg, self._slot, self.tokenizer, self.tools, self._spool,
                             self._metrics, self._poller.reach_version, self._release_grant, self._ledger)
        self._admissions = AdmissionLoop(self.actor_id, cfg, self.link, self._spool, player, self._order.next,
                                         self._questions, self._metrics, self._stopping, lambda: self._poller.fatal,
                                         self._ledger)
        log.info("%s ready: %s, tools %s, learner %s", self.actor_id, self.model_path, sorted(self.tools),
                 self.learner_endpoints)

    def _playable(self, questions: list[Question], count: bool = True) -> list[Question]:
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
        if count:
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
        return tool_clients(self.tool_endpoints, self.cfg)

    async def run(self) -> None:
        """Play admitted groups until stop() or the learner says it is stopping; re-raise the first group error
        (or the error that stopped weight updates)."""
        if self._admissions is None or self._poller is None:
            raise RuntimeError("RolloutActor.run() before start()")
        self._run_started = time.perf_counter()
        self._poller.start()
        try:
            await self._admissions.run()
        finally:
            self._run_done.set()

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop asking for admissions, let groups in flight finish and be acked (up to `timeout_s`, default
        stop_timeout_s), close. Groups not acked by then stay in the spool on disk (resent by the next actor with
        this run folder). Pass 0 when the learner has already closed its intake: no ack can come."""
        timeout = self.cfg.stop_timeout_s if timeout_s is None else timeout_s
        running = self._poller is not None and self._poller.task is not None  # run() was called
        if self._stopping is not None:
            self._stopping.set()
        if self._run_done is not None and running:
            try:
                await asyncio.wait_for(self._run_done.wait(), timeout)
            except asyncio.TimeoutError:
                log.warning("%s: groups still in flight after %.0f s; closing anyway (kept in the spool)",
                            self.actor_id, timeout)
        if self._poller is not None:
            await self._poller.stop()
        if self.link is not None:
            await self.link.close()
        if self._run_done is not None and running:
            try:  # with the link closed, run() ends at once (waiting senders get TransportClosed)
                await asyncio.wait_for(self._run_done.wait(), 10.0)
            except asyncio.TimeoutError:
                log.error("%s: run() did not end after the learner link closed", self.actor_id)
        for client in self.tools.values():
            close = getattr(client, "close", None)
            if close is not None:
                await close()
        if self._slot is not None:
            await self._slot.close()
        if self._weights is not None:
            self._weights.clear()
        self._ledger.close()
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

    async def evaluate(self, mode: str, min_version: int = 0, split: str | None = "test",
                       per_label: int | None = None) -> dict[str, Any]:
        """One greedy pass over held-out questions (`split`, the first `per_label` of each search label) played as
        eval `mode` says (actors/eval.py EVAL_MODES), on this actor's engine once it runs policy `min_version` or
        newer; weight updates wait until the pass is done, so every episode sees the same version. Rollout groups
        keep playing beside it. Returns {mode, version, seconds, samples, tool_failed} (samples:
        actors.eval.sample_row; tool_failed: how many of them a tool outage ended, each flagged in its sample)."""
        from actors.eval import eval_questions, heldout_questions

        if self._slot is None or self.tokenizer is None or self._poller is None:
            raise RuntimeError("RolloutActor.evaluate() before start()")
        if mode not in EVAL_MODES:
            raise ValueError(f"unknown eval mode {mode!r}; known: {EVAL_MODES}")
        key = (split, per_label)
        if key not in self._eval_sets:
            playable = self._playable(load_questions(self.data_path, split), count=False)
            self._eval_sets[key] = heldout_questions(playable, per_label)
        questions = self._eval_sets[key]
        if min_version > self._slot.version:
            await self._poller.reach_version(min_version)
        greedy = dataclasses.replace(self.cfg, sampling=SamplingConfig(temperature=0.0))
        started = time.perf_counter()

        async def play(engine: Any) -> tuple[int, list[dict[str, Any]]]:
            rows = await eval_questions(engine, self.tokenizer, self.tools, questions, greedy, seed=self.seed,
                                        metrics=self._metrics, mode=mode, request_prefix=f"eval-{mode}")
            return int(engine.version), rows

        version, rows = await self._slot.under_lock(play)
        seconds = time.perf_counter() - started
        self._metrics.inc("eval_passes")
        self._metrics.observe("eval_pass_s", seconds)
        failed = sum(bool(r["tool_failed"]) for r in rows)
        self._metrics.inc("eval_tool_failed", failed)
        log.info("%s: %s eval of %d held-out questions at policy version %d in %.1f s", self.actor_id, mode,
                 len(rows), version, seconds)
        if failed:
            log.warning("%s: %d of the %s eval's %d episodes were cut by a tool outage (tool_failed)", self.actor_id,
                        failed, mode, len(rows))
        return {"mode": mode, "version": version, "seconds": seconds, "samples": rows, "tool_failed": failed}

    async def _release_grant(self, grant: Grant, reason: str, group_id: str | None = None) -> None:
        assert self._admissions is not None
        await self._admissions.release_grant(grant, reason, group_id)
