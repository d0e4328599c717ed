"""Rank 0's endpoint for actors: admissions (staleness control) and trajectory groups (acked, deduplicated),
handed to the training loop through a thread-safe buffer.

Serving runs on a background thread (learner.router), so actors are answered while the training loop computes.
Every malformed frame gets an ErrorReply and is counted; the endpoint keeps serving. Beyond loopback a shared
`token` is required and every message must carry it (learner/router.py); it never reaches the journal or checkpoints.
With a journal (learner/journal.py) an accepted group is on disk before its ack, so a crash loses no acked group.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from typing import Callable, Optional

import msgspec

from learner.admission import AdmissionController
from learner.journal import GroupJournal
from learner.router import RouterThread, worth_logging
from protocol import (
    AdmissionRelease,
    AdmissionReply,
    AdmissionRequest,
    ErrorReply,
    GroupAck,
    LearnerInbound,
    ProtocolError,
    TrajectoryGroup,
    decode,
    encode,
)
from protocol.codec import DEFAULT_MAX_FRAME_BYTES
from protocol.ledger import Ledger
from protocol.metrics import Metrics

log = logging.getLogger(__name__)

# Checks a received group against the current policy version; raises ValueError to reject it.
GroupValidator = Callable[[TrajectoryGroup, int], None]


class TrajectoryService:
    """Grant admissions, accept groups once each, and let the trainer `take` them."""

    def __init__(
        self,
        admission: AdmissionController,
        validate: Optional[GroupValidator] = None,
        metrics: Optional[Metrics] = None,
        endpoint: str = "tcp://127.0.0.1:*",
        allow_remote: bool = False,
        retry_after_ms: int = 200,
        max_remembered_ids: int = 1_000_000,
        restore: Optional[tuple[list[TrajectoryGroup], list[str]]] = None,
        version: int = 0,
        journal: Optional[GroupJournal] = None,
        replay_after: Optional[int] = None,
        token: Optional[str] = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        ledger: Optional[Ledger] = None,
    ) -> None:
        """`restore` = (untrained groups, remembered ids) from a checkpoint: put in front of the buffer and
        remembered before the endpoint serves, so a resent copy of a checkpointed group is acked as a duplicate
        (and the groups are not acked again). `journal`: every accepted group is appended before its ack;
        `replay_after` = the sequence number the checkpoint covers: newer entries are replayed after the restored
        groups (None: a fresh start, the journal's old entries are discarded). `token`: the shared secret every message
        must carry (required to bind beyond loopback). Frames over `max_frame_bytes` are never read. `ledger`: the
        group ledger (protocol/ledger.py) gets a line per group accepted, replayed, rejected or received again."""
        self.admission = admission
        self.metrics = metrics or Metrics()
        self._validate = validate
        self._retry_after_ms = retry_after_ms
        self._max_ids = max_remembered_ids
        self._cond = threading.Condition()
        self._buffer: deque[TrajectoryGroup] = deque()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._granted: OrderedDict[str, None] = OrderedDict()  # granted request ids not yet released
        self._version = version
        self._denied_at = float("-inf")  # time.monotonic() of the last denied admission
        self._stopping = False
        self._intake_open = True
        self._journal = journal
        self._ledger = ledger or Ledger(None)
        if restore is not None:
            self._restore(*restore)
        if journal is not None:
            self._replay_journal(replay_after)
        self._max_frame_bytes = max_frame_bytes
        self._router = RouterThread("trajectories", self._handle, endpoint, allow_remote=allow_remote, token=token,
                                    metrics=self.metrics, max_frame_bytes=max_frame_bytes)
        self.endpoint = self._router.endpoint

    # ---------------------------------------------------------------- training-loop side
    def set_version(self, version: int) -> None:
        """The policy version admissions are granted against (call after each optimiser step)."""
        with self._cond:
            self._version = version

    def retry_pending(self) -> bool:
        """True while an actor denied an admission may still be sleeping out its retry_after_ms (it asks again
        after that delay, even if room appeared meanwhile): the learner's idle clock puts such waits down to it."""
        with self._cond:
            return time.monotonic() - self._denied_at < self._retry_after_ms / 1000.0

    def stop_admissions(self) -> None:
        """From now on every AdmissionReply is a refusal with stopping=True; pending `take`s return []."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    @property
    def stopping(self) -> bool:
        with self._cond:
            return self._stopping

    def buffered(self) -> int:
        with self._cond:
            return len(self._buffer)

    def close_intake(self) -> None:
        """Stop accepting groups (they get ErrorReply(overloaded) naming the group, so the actor keeps and resends
        them): after this, the buffer changes only through `take`, so a snapshot of it is final."""
        with self._cond:
            self._intake_open = False

    def open_intake(self) -> None:
        with self._cond:
            self._intake_open = True

    def snapshot(self) -> tuple[list[TrajectoryGroup], list[str], dict[str, int], int]:
        """(acked-but-untrained groups in arrival order, remembered group ids oldest first, admission counters,
        the journal's last sequence number or -1), taken together under the lock that accepting a group holds, for
        a checkpoint."""
        with self._cond:
            seq = self._journal.last_seq if self._journal is not None else -1
            return list(self._buffer), list(self._seen), self.admission.snapshot(), seq

    def checkpointed(self, journal_seq: int) -> None:
        """A checkpoint holding the snapshot of `journal_seq` is complete: its journal entries can go."""
        if self._journal is not None and journal_seq >= 0:
            with self._cond:
                self.metrics.inc("journal_truncated", self._journal.truncate(journal_seq))

    def _replay_journal(self, after: Optional[int]) -> None:
        """Groups acked after the checkpoint (or since a fresh start, after=-1) go back into the buffer; a fresh
        start (after=None) discards the entries of a previous run instead (counted and logged)."""
        assert self._journal is not None
        entries = self._journal.entries_after(-1 if after is None else after)
        if after is None:
            if entries:
                self._journal.truncate(self._journal.last_seq)
                self.metrics.inc("journal_discarded", len(entries))
                log.warning("fresh start: discarded %d journal entr(ies) of a previous run in %s (set "
                            "learner.resume_from to replay them)", len(entries), self._journal.folder)
            return
        self._journal.truncate(after)  # covered by the checkpoint: its rename finished before the crash
        replayed = 0
        with self._cond:
            for seq, frame in entries:
                try:
                    group = decode(frame, TrajectoryGroup)
                except ProtocolError as exc:  # written whole (atomic rename) by us: this is disk damage
                    self.metrics.inc("journal_bad_entries")
                    log.error("journal entry %d is unreadable (%s); skipped", seq, exc)
                    continue
                if group.group_id in self._seen:
                    continue  # also in the checkpoint (the crash fell between its rename and the truncation)
                self._seen[group.group_id] = None
                self._buffer.append(group)
                self.admission.on_group_received()  # accepted anew: counted like any group without a grant
                self._ledger.write("replayed", group_id=group.group_id, actor=group.actor_id, seq=seq)
                replayed += 1
            self._cond.notify_all()
        self.metrics.inc("journal_replayed", replayed)
        if replayed:
            log.warning("replayed %d acked group(s) from the journal %s (acked after the checkpoint)", replayed,
                        self._journal.folder)

    def _restore(self, groups: list[TrajectoryGroup], seen_ids: list[str]) -> None:
        with self._cond:
            for group_id in seen_ids:
                self._seen[group_id] = None
            self._buffer.extendleft(reversed(groups))
            while len(self._seen) > self._max_ids:
                self._seen.popitem(last=False)
            self._cond.notify_all()

    def requeue(self, groups: list[TrajectoryGroup]) -> None:
        """Return taken-but-untrained groups to the front of the buffer, in order."""
        with self._cond:
            self._buffer.extendleft(reversed(groups))
            self._cond.notify_all()

    def take(self, n_groups: int, timeout: float) -> list[TrajectoryGroup]:
        """Exactly `n_groups` groups in arrival order, or [] if they did not all arrive within `timeout` seconds
        (or admissions stopped); nothing is removed from the buffer unless all `n_groups` are returned."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._buffer) >= n_groups or self._stopping, timeout)
            if len(self._buffer) < n_groups:
                return []
            return [self._buffer.popleft() for _ in range(n_groups)]

    def close(self) -> None:
        self.stop_admissions()
        self._router.close()

    # ---------------------------------------------------------------- serving thread
    def _handle(self, payload: bytes) -> list[bytes]:
        try:
            message = decode(payload, LearnerInbound, max_frame_bytes=self._max_frame_bytes)
        except ProtocolError as exc:
            self.metrics.inc("bad_frames")
            if worth_logging(self.metrics.counter("bad_frames")):
                log.warning("trajectory endpoint: rejected a %d-byte frame (%d bad frames so far): %s", len(payload),
                            self.metrics.counter("bad_frames"), exc)
            return [encode(ErrorReply(code="bad_request", message=str(exc)))]
        if isinstance(message, AdmissionRequest):
            return [encode(self._admit(message))]
        if isinstance(message, TrajectoryGroup):
            return [encode(self._accept(message, payload))]
        if isinstance(message, AdmissionRelease):
            self._release(message)
            return []  # fire and forget
        self.metrics.inc("bad_frames")
        return [encode(ErrorReply(code="bad_request",
                                  message=f"{type(message).__name__} is served on the weights endpoint"))]

    def _admit(self, request: AdmissionRequest) -> AdmissionReply:
        with self._cond:
            version, stopping = self._version, self._stopping
            repeat = request.request_id in self._granted
        if repeat:  # the actor resent a request whose grant reply it lost: the same grant, not a second slot
            self.metrics.inc("admission_repeats")
            return AdmissionReply(request_id=request.request_id, granted=True, version=version)
        if stopping:
            self.metrics.inc("admissions_refused_stopping")
            return AdmissionReply(request_id=request.request_id, granted=False, version=version, stopping=True)
        if self.admission.try_grant(version):
            with self._cond:
                self._granted[request.request_id] = None
                if len(self._granted) > self._max_ids:
                    self._granted.popitem(last=False)
            self.metrics.inc("admissions_granted")
            return AdmissionReply(request_id=request.request_id, granted=True, version=version)
        self.metrics.inc("admissions_denied")
        with self._cond:
            self._denied_at = time.monotonic()
        return AdmissionReply(request_id=request.request_id, granted=False, version=version,
                              retry_after_ms=self._retry_after_ms)

    def _release(self, release: AdmissionRelease) -> None:
        """Free the slot of a granted group its actor gave up; each grant is released at most once."""
        with self._cond:
            known = self._granted.pop(release.request_id, False) is None
        if not known:
            self.metrics.inc("admission_releases_unknown")
            log.warning("ignored release of unknown or already released admission %s from %s",
                        release.request_id, release.actor_id)
            return
        self.admission.on_group_lost()
        self.metrics.inc("admission_releases")
        log.warning("actor %s gave up admission %s: %s", release.actor_id, release.request_id,
                    release.reason or "no reason given")

    def _accept(self, group: TrajectoryGroup, frame: Optional[bytes] = None) -> GroupAck | ErrorReply:
        with self._cond:
            duplicate = group.group_id in self._seen
            version, intake_open = self._version, self._intake_open
        if not intake_open and not duplicate:
            self.metrics.inc("groups_refused_closed")
            return ErrorReply(code="overloaded", id=group.group_id,
                              message="learner is shutting down: keep the group and resend it after the restart")
        if duplicate:
            self.metrics.inc("groups_duplicate")
            self._ledger.write("duplicate", group_id=group.group_id, actor=group.actor_id)
            return GroupAck(group_id=group.group_id, accepted=True, duplicate=True)
        if self._validate is not None:
            try:
                self._validate(group, version)
            except ValueError as exc:
                self.metrics.inc("groups_rejected")
                self.admission.on_group_lost()
                self._ledger.write("rejected", group_id=group.group_id, actor=group.actor_id, reason=str(exc)[:500])
                log.warning("rejected group %s from %s: %s", group.group_id, group.actor_id, exc)
                return GroupAck(group_id=group.group_id, accepted=False, message=str(exc))
        if group.token is not None:  # the shared secret stays off the disk (journal, checkpoints)
            group, frame = msgspec.structs.replace(group, token=None), None
        with self._cond:
            if not self._intake_open:  # closed while validating: the snapshot must not miss an acked group
                self.metrics.inc("groups_refused_closed")
                return ErrorReply(code="overloaded", id=group.group_id,
                                  message="learner is shutting down: keep the group and resend it after the restart")
            if self._journal is not None:  # durable before the ack; under the lock, so snapshots see both or neither
                try:
                    self._journal.append(frame if frame is not None else encode(group))
                except OSError as exc:  # a full or broken disk: refuse, so the actor keeps the group
                    self.metrics.inc("journal_errors")
                    log.error("cannot journal group %s: %s", group.group_id, exc)
                    return ErrorReply(code="overloaded", id=group.group_id,
                                      message=f"learner cannot store the group durably ({exc}); resend later")
            self._seen[group.group_id] = None
            if len(self._seen) > self._max_ids:
                self._seen.popitem(last=False)
            self._buffer.append(group)
            self.admission.on_group_received()  # under the lock, so a snapshot sees buffer and counters agree
            self._ledger.write("accepted", group_id=group.group_id, actor=group.actor_id, version=version)
            self._cond.notify_all()
        self.metrics.inc("groups_received")
        self.metrics.inc("trajectories_received", len(group.trajectories))
        return GroupAck(group_id=group.group_id, accepted=True)
