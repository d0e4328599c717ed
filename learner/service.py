"""Rank 0's endpoint for actors: admissions (staleness control) and trajectory groups (acked, deduplicated),
handed to the training loop through a thread-safe buffer.

Serving runs on a background thread (learner.router), so actors are answered while the training loop computes.
Every malformed frame gets an ErrorReply and is counted; the endpoint keeps serving.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from typing import Callable, Optional

from learner.admission import AdmissionController
from learner.router import RouterThread
from protocol import (
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
    ) -> None:
        self.admission = admission
        self.metrics = metrics or Metrics()
        self._validate = validate
        self._retry_after_ms = retry_after_ms
        self._max_ids = max_remembered_ids
        self._cond = threading.Condition()
        self._buffer: deque[TrajectoryGroup] = deque()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._version = 0
        self._stopping = False
        self._router = RouterThread("trajectories", self._handle, endpoint, allow_remote=allow_remote)
        self.endpoint = self._router.endpoint

    # ---------------------------------------------------------------- training-loop side
    def set_version(self, version: int) -> None:
        """The policy version admissions are granted against (call after each optimiser step)."""
        with self._cond:
            self._version = version

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
            message = decode(payload, LearnerInbound)
        except ProtocolError as exc:
            self.metrics.inc("bad_frames")
            log.warning("trajectory endpoint: rejected a %d-byte frame: %s", len(payload), exc)
            return [encode(ErrorReply(code="bad_request", message=str(exc)))]
        if isinstance(message, AdmissionRequest):
            return [encode(self._admit(message))]
        if isinstance(message, TrajectoryGroup):
            return [encode(self._accept(message))]
        self.metrics.inc("bad_frames")
        return [encode(ErrorReply(code="bad_request",
                                  message=f"{type(message).__name__} is served on the weights endpoint"))]

    def _admit(self, request: AdmissionRequest) -> AdmissionReply:
        with self._cond:
            version, stopping = self._version, self._stopping
        if stopping:
            self.metrics.inc("admissions_refused_stopping")
            return AdmissionReply(request_id=request.request_id, granted=False, version=version, stopping=True)
        if self.admission.try_grant(version):
            self.metrics.inc("admissions_granted")
            return AdmissionReply(request_id=request.request_id, granted=True, version=version)
        self.metrics.inc("admissions_denied")
        return AdmissionReply(request_id=request.request_id, granted=False, version=version,
                              retry_after_ms=self._retry_after_ms)

    def _accept(self, group: TrajectoryGroup) -> GroupAck:
        with self._cond:
            duplicate = group.group_id in self._seen
            version = self._version
        if duplicate:
            self.metrics.inc("groups_duplicate")
            return GroupAck(group_id=group.group_id, accepted=True, duplicate=True)
        if self._validate is not None:
            try:
                self._validate(group, version)
            except ValueError as exc:
                self.metrics.inc("groups_rejected")
                self.admission.on_group_lost()
                log.warning("rejected group %s from %s: %s", group.group_id, group.actor_id, exc)
                return GroupAck(group_id=group.group_id, accepted=False, message=str(exc))
        with self._cond:
            self._seen[group.group_id] = None
            if len(self._seen) > self._max_ids:
                self._seen.popitem(last=False)
            self._buffer.append(group)
            self._cond.notify_all()
        self.admission.on_group_received()
        self.metrics.inc("groups_received")
        self.metrics.inc("trajectories_received", len(group.trajectories))
        return GroupAck(group_id=group.group_id, accepted=True)
