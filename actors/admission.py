"""The rollout actor's admission and shipping: a spool slot, then a group slot; ask the learner for an admission
(admission control bounds staleness, docs/architecture.md); record the grant and hand its group to the episode loop
(actors/groups.py); ship the spooled group until acked. What a previous process of this actor left in its spool is
resent (finished groups) or re-played (admitted groups) first, so a crash at any instant loses no slot and plays no
group twice.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, Callable

from actors.config import ActorConfig
from actors.episode import Question
from actors.groups import GroupPlayer
from actors.spool import Grant, GroupSpool
from actors.transport import LearnerLink, TransportClosed
from protocol import TrajectoryGroup, encode
from protocol.ledger import Ledger
from protocol.metrics import Metrics

log = logging.getLogger(__name__)


class AdmissionLoop:
    """Asks for admissions and ships groups until `stopping` is set or the learner says it is stopping.
    `next_question()` picks each admitted group's question; `questions` finds a spooled grant's question by id;
    `weights_failed()` is the error that stopped weight updates, if any (run() then fails with it). `ledger` gets
    a line per group sent, acked or given up and per admission released (protocol/ledger.py)."""

    def __init__(self, actor_id: str, cfg: ActorConfig, link: LearnerLink, spool: GroupSpool, player: GroupPlayer,
                 next_question: Callable[[], Question], questions: dict[str, Question], metrics: Metrics,
                 stopping: asyncio.Event, weights_failed: Callable[[], BaseException | None],
                 ledger: Ledger | None = None) -> None:
        self.actor_id, self.cfg, self.link, self.spool, self.player = actor_id, cfg, link, spool, player
        self.next_question, self.questions, self.metrics = next_question, questions, metrics
        self.stopping, self.weights_failed = stopping, weights_failed
        self.ledger = ledger or Ledger(None)

    async def run(self) -> None:
        """Each group holds a spool slot from before its admission until its ack: with `spool_max_groups` groups
        unacked (a slow or dead learner) no admission is asked for. Re-raises the first group error."""
        group_slots = asyncio.Semaphore(self.cfg.max_groups_in_flight)
        groups: set[asyncio.Task] = set(self._resume_spool(group_slots))
        try:
            while await self._take_slots(group_slots):
                _reap(groups)
                request_id = uuid.uuid4().hex
                self.spool.record_request(request_id)  # a crash before the answer is recorded releases it
                reply = await self.link.request_admission(request_id)
                if not reply.granted:
                    self.spool.drop_request(request_id)
                    group_slots.release()
                    self.spool.release()
                    if reply.stopping:
                        log.info("%s: learner is stopping; no more groups", self.actor_id)
                        break
                    self.metrics.inc("admissions_denied")
                    await self._sleep_unless_stopping(reply.retry_after_ms / 1000.0)
                    continue
                groups.add(self._start_group(reply, group_slots))
            if groups:
                await asyncio.gather(*groups)  # flush: finish and deliver the groups in flight
            failed = self.weights_failed()
            if failed is not None:
                raise RuntimeError(f"{self.actor_id}: applying new weights failed") from failed
        except BaseException as exc:
            for task in groups:
                task.cancel()
            await asyncio.gather(*groups, return_exceptions=True)
            if not (isinstance(exc, TransportClosed) and self.stopping.is_set()):
                raise
            log.warning("%s: learner link closed during stop; %d group(s) stay in the spool for the next start",
                        self.actor_id, self.spool.count())

    async def release_grant(self, grant: Grant, reason: str, group_id: str | None = None) -> None:
        """Give back the admission of a group that cannot be played (the learner frees its slot); `group_id`: the
        group this process started for it, if any (the ledger's `given_up` line names it)."""
        self.spool.drop_grant(grant.request_id)
        self.metrics.inc("admissions_released")
        self.ledger.write("given_up", group_id=group_id, request_id=grant.request_id, reason=reason[:500])
        await self.link.release_admission(grant.request_id, reason)

    async def _take_slots(self, group_slots: asyncio.Semaphore) -> bool:
        """A spool slot, then a group slot; False (holding neither) once stop() was called."""
        if not await self._unless_stopping(self.spool.acquire(), self.spool.release):
            return False
        if not await self._unless_stopping(group_slots.acquire(), group_slots.release):
            self.spool.release()
            return False
        return True

    def _start_group(self, reply: Any, group_slots: asyncio.Semaphore) -> asyncio.Task:
        """Record the granted admission (until its group is spooled) and play its group in a task."""
        self.metrics.inc("admissions_granted")
        question = self.next_question()
        grant = Grant(request_id=reply.request_id, question_id=question.id, version=reply.version)
        self.spool.record_grant(grant)
        self.spool.drop_request(reply.request_id)
        return asyncio.create_task(self._admitted_group(grant, question, group_slots, acquire=False),
                                   name=f"{self.actor_id}-group")

    def _resume_spool(self, group_slots: asyncio.Semaphore) -> list[asyncio.Task]:
        """Tasks for what a previous actor with this folder left: resend its finished groups, re-play its grants."""
        unanswered = self.spool.unanswered_requests()
        grants, groups = self.spool.leftovers()
        tasks = [asyncio.create_task(self._release_unanswered(request_id)) for request_id in unanswered]
        if not (grants or groups):
            return tasks
        if not self.cfg.spool_resume:
            self.metrics.inc("spool_discarded", self.spool.discard_leftovers())
            log.warning("%s: discarded %d leftover group(s) and %d grant(s) (spool_resume=false); their admissions "
                        "are given back", self.actor_id, len(groups), len(grants))
            for group in groups:
                self.ledger.write("given_up", group_id=group.group_id, request_id=None, reason="spool_resume=false")
            for grant in grants:
                self.ledger.write("given_up", group_id=None, request_id=grant.request_id, reason="spool_resume=false")
                tasks.append(asyncio.create_task(self._release_unanswered(grant.request_id, "spool_resume=false")))
            return tasks
        log.info("%s: resending %d spooled group(s), re-playing %d admitted group(s)", self.actor_id, len(groups),
                 len(grants))
        self.metrics.inc("spool_resent", len(groups))
        self.metrics.inc("spool_replayed", len(grants))
        tasks += [asyncio.create_task(self._leftover_group(group)) for group in groups]
        for grant in grants:
            question = self.questions.get(grant.question_id)
            if question is None:  # the data changed: the group can never be played
                tasks.append(asyncio.create_task(self.release_grant(grant, "question no longer in the data")))
            else:
                tasks.append(asyncio.create_task(self._admitted_group(grant, question, group_slots, acquire=True)))
        return tasks

    async def _release_unanswered(self, request_id: str,
                                  reason: str = "the actor restarted before recording the answer") -> None:
        """Give back an admission a previous process of this actor asked for (or held) and will never play; the
        learner frees it if it had granted it (and counts an unknown one)."""
        await self.link.release_admission(request_id, reason)
        self.spool.drop_request(request_id)
        self.metrics.inc("spool_admissions_released")
        self.ledger.write("released", request_id=request_id, reason=reason)
        log.warning("%s: released admission %s (%s)", self.actor_id, request_id, reason)

    async def _admitted_group(self, grant: Grant, question: Question, group_slots: asyncio.Semaphore,
                              acquire: bool) -> None:
        """One admitted group from play to ack, holding a spool slot throughout and a group slot while playing."""
        if acquire:
            await self.spool.acquire()
            await group_slots.acquire()
        try:
            try:
                group, frame = await self.player.play(grant, question)
            finally:
                group_slots.release()
            await self._ship(group, frame)
        finally:
            self.spool.release()

    async def _leftover_group(self, group: TrajectoryGroup) -> None:
        await self.spool.acquire()
        try:
            await self._ship(group, encode(group))
        finally:
            self.spool.release()

    async def _ship(self, group: TrajectoryGroup, frame: bytes) -> None:
        """Send until acked (the learner may restart meanwhile), then forget the spooled copy."""
        self.ledger.write("sent", group_id=group.group_id)
        ack = await self.link.send_group(group, frame)
        self.ledger.write("acked", group_id=group.group_id, accepted=ack.accepted, duplicate=ack.duplicate,
                          **({} if ack.accepted else {"message": ack.message[:500]}))
        self.spool.remove(group.group_id)
        if not ack.accepted:  # the learner freed its admission slot; the group is not retried
            log.warning("%s: learner rejected group %s: %s", self.actor_id, group.group_id, ack.message)

    async def _unless_stopping(self, acquire: Any, release: Any) -> bool:
        """Await `acquire` (a slot) unless stop() comes first; True when the slot was taken."""
        take = asyncio.ensure_future(acquire)
        stop = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({take, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not take.done():
            take.cancel()
        try:
            await take
        except asyncio.CancelledError:
            return False
        if self.stopping.is_set():
            release()
            return False
        return True

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass


def _reap(groups: set[asyncio.Task]) -> None:
    """Drop finished group tasks; re-raise the first failure now rather than at the end."""
    for done in [t for t in groups if t.done()]:
        groups.discard(done)
        done.result()
