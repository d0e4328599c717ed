"""The actor's side of the learner link: admissions and acked trajectory groups on the `trajectories` endpoint,
versioned weights on the `weights` endpoint. One DEALER per endpoint; every frame is a protocol message.

Delivery rules: an admission request is resent (with backoff) until some reply arrives; a group is kept and
resent until a GroupAck names it, including right after the connection to the learner comes back (the learner
drops duplicates by group_id); an `ErrorReply(overloaded)` naming the group (a learner closing its intake for a
final checkpoint) is counted and the group is resent later. Replies nobody waits for any more (late answers to
resent requests) are dropped. Weights: zmq buckets (whole tensors or row chunks) are reassembled here; an
out-of-band version (fs, nccl) comes back as its `WeightAnnounce` for actors.weights to apply.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

import msgspec
import torch
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from actors.config import TransportConfig
from protocol import (
    AdmissionRelease,
    AdmissionReply,
    AdmissionRequest,
    ErrorReply,
    GroupAck,
    LearnerOutbound,
    ProtocolError,
    TrajectoryGroup,
    WeightAnnounce,
    WeightBucket,
    WeightNone,
    WeightQuery,
    decode,
    encode,
)
from protocol.metrics import Metrics
from protocol.sockets import configure
from protocol.weights import assemble_weight_buckets

log = logging.getLogger(__name__)


class TransportClosed(RuntimeError):
    """The link was closed while a call was waiting."""


class LearnerUnauthorized(RuntimeError):
    """The learner rejected this actor's token (missing or different from the learner's: learner.token_env)."""


@dataclass(frozen=True)
class WeightUpdate:
    """A policy version newer than the actor's: `state` for zmq (buckets reassembled, bf16 as torch.bfloat16),
    or the learner's `announce` for an out-of-band transport (fs: files under announce.location; nccl: join the
    broadcast)."""

    version: int
    transport: str
    state: dict[str, torch.Tensor] | None = None
    announce: WeightAnnounce | None = None


class LearnerLink:
    """DEALERs to the learner's `trajectories` and `weights` endpoints (`endpoints` as launch.py passes them).
    `token`: the learner's shared secret, put in every message sent (groups are stamped when sent, so the spooled
    copies on disk never hold it); a reply `unauthorized` fails every waiting call with LearnerUnauthorized."""

    def __init__(self, actor_id: str, endpoints: dict[str, str], cfg: TransportConfig | None = None,
                 metrics: Metrics | None = None, *, token: str | None = None) -> None:
        missing = {"trajectories", "weights"} - set(endpoints)
        if missing:
            raise ValueError(f"learner endpoints lack {sorted(missing)}: {endpoints}")
        self.actor_id = actor_id
        self.endpoints = dict(endpoints)
        self.token = token or None
        self.cfg = cfg or TransportConfig()
        self.metrics = metrics or Metrics()
        self._ctx = zmq.asyncio.Context.instance()
        self._traj: zmq.asyncio.Socket | None = None
        self._weights: zmq.asyncio.Socket | None = None
        self._admission_waiters: dict[str, asyncio.Future] = {}
        self._releases: set[str] = set()  # request ids of AdmissionReleases sent (to recognise error replies)
        self._ack_waiters: dict[str, asyncio.Future] = {}
        self._unacked: dict[str, bytes] = {}  # group_id -> encoded group, until acked
        self._weights_lock = asyncio.Lock()
        self._reconnected = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        self._unauthorized: LearnerUnauthorized | None = None

    def _open(self) -> None:
        if self._closed:
            raise TransportClosed("learner link is closed")
        if self._unauthorized is not None:
            raise self._unauthorized
        if self._traj is not None:
            return
        self._traj, monitor = self._socket(self.endpoints["trajectories"], monitored=True)
        self._weights, _ = self._socket(self.endpoints["weights"])
        self._tasks = [asyncio.create_task(self._read_trajectories(), name="learner-link-read"),
                       asyncio.create_task(self._watch_reconnects(monitor), name="learner-link-monitor")]

    def _socket(self, endpoint: str, monitored: bool = False
                ) -> tuple[zmq.asyncio.Socket, zmq.asyncio.Socket | None]:
        sock = configure(self._ctx.socket(zmq.DEALER))
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)  # notice a learner that vanished without closing TCP
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        # The monitor is attached before connecting so that no connection event can be missed.
        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED) if monitored else None
        sock.connect(endpoint)
        return sock, monitor

    # ------------------------------------------------------------------ trajectories endpoint

    async def request_admission(self, request_id: str | None = None) -> AdmissionReply:
        """Ask to start one group; resend (same `request_id`: the learner answers a repeat with the same grant)
        with backoff until any reply (granted or not) arrives. Pass `request_id` to record it before asking."""
        self._open()
        request_id = request_id or uuid.uuid4().hex
        frame = encode(AdmissionRequest(actor_id=self.actor_id, request_id=request_id, token=self.token))
        waiter = asyncio.get_running_loop().create_future()
        self._admission_waiters[request_id] = waiter
        timeout = self.cfg.reply_timeout_s
        try:
            while True:
                await self._traj.send(frame)
                self.metrics.inc("admission_requests_sent")
                try:
                    return await asyncio.wait_for(asyncio.shield(waiter), timeout)
                except asyncio.TimeoutError:
                    self.metrics.inc("admission_timeouts")
                    log.warning("no admission reply from %s in %.1f s; asking again",
                                self.endpoints["trajectories"], timeout)
                    timeout = min(2 * timeout, self.cfg.max_backoff_s)
        finally:
            self._admission_waiters.pop(request_id, None)

    async def send_group(self, group: TrajectoryGroup, frame: bytes | None = None) -> GroupAck:
        """Deliver `group` (already encoded as `frame`, when given); resend on timeout and after a reconnect until
        the learner acks it. With a token the group is encoded again with it (the spooled frame has none)."""
        self._open()
        if self.token is not None:
            frame = encode(msgspec.structs.replace(group, token=self.token))
        elif frame is None:
            frame = encode(group)
        waiter = asyncio.get_running_loop().create_future()
        self._ack_waiters[group.group_id] = waiter
        self._unacked[group.group_id] = frame
        timeout = self.cfg.reply_timeout_s
        started = time.perf_counter()
        try:
            while True:
                await self._traj.send(self._unacked[group.group_id])
                self.metrics.inc("group_sends")
                try:
                    ack = await asyncio.wait_for(asyncio.shield(waiter), timeout)
                except asyncio.TimeoutError:
                    self.metrics.inc("group_resends")
                    log.warning("group %s not acked in %.1f s; resending", group.group_id, timeout)
                    timeout = min(2 * timeout, self.cfg.max_backoff_s)
                    continue
                self.metrics.observe("group_ack_s", time.perf_counter() - started)
                self.metrics.inc("groups_acked" if ack.accepted else "groups_rejected")
                if ack.duplicate:
                    self.metrics.inc("groups_duplicate_acks")
                return ack
        finally:
            self._ack_waiters.pop(group.group_id, None)
            self._unacked.pop(group.group_id, None)

    @property
    def unacked(self) -> int:
        return len(self._unacked)

    async def _read_trajectories(self) -> None:
        while True:
            frames = await self._traj.recv_multipart()
            try:
                message = decode(frames[-1], LearnerOutbound)  # DEALER: one payload frame (a delimiter is tolerated)
            except ProtocolError as exc:
                self.metrics.inc("bad_frames")
                log.warning("dropped an undecodable frame from the learner: %s", exc)
                continue
            if isinstance(message, AdmissionReply):
                waiter = self._admission_waiters.get(message.request_id)
            elif isinstance(message, GroupAck):
                waiter = self._ack_waiters.get(message.group_id)
            elif isinstance(message, ErrorReply):
                self._on_error_reply(message)
                continue
            else:
                self.metrics.inc("unexpected_messages")
                log.warning("unexpected %s on the trajectories endpoint", type(message).__name__)
                continue
            if waiter is None or waiter.done():
                self.metrics.inc("late_replies")
                continue
            waiter.set_result(message)

    def _on_error_reply(self, message: ErrorReply) -> None:
        if message.code == "unauthorized":
            self._fail_unauthorized(message)
            return
        if message.id in self._ack_waiters:  # the learner refused the group for now (intake closed): keep it
            self.metrics.inc("groups_refused")
            log.info("learner refused group %s for now (%s): %s", message.id, message.code, message.message)
            return
        if message.id in self._releases or "AdmissionRelease" in message.message:
            self.metrics.inc("admission_releases_unsupported")
            log.warning("learner does not handle AdmissionRelease (%s); its slot frees when it restarts",
                        message.message)
            return
        self.metrics.inc("error_replies")
        log.error("learner error reply (%s): %s", message.code, message.message)

    def _fail_unauthorized(self, message: ErrorReply) -> None:
        """The learner refused our token: nothing this link sends will ever be taken, so every call fails now."""
        self.metrics.inc("learner_unauthorized")
        if self._unauthorized is None:
            log.error("the learner at %s rejected this actor's token (%s): learner.token_env must name the same "
                      "token for the learner and the actors", self.endpoints["trajectories"], message.message)
        self._unauthorized = LearnerUnauthorized(
            f"{self.actor_id}: the learner rejected the token ({message.message}); set learner.token_env to the "
            f"variable holding the learner's token")
        for waiter in [*self._admission_waiters.values(), *self._ack_waiters.values()]:
            if not waiter.done():
                waiter.set_exception(self._unauthorized)

    async def release_admission(self, request_id: str, reason: str) -> None:
        """Give back a granted admission whose group will never be sent (fire and forget; the learner frees the
        slot). `request_id` is the granted AdmissionRequest's."""
        self._open()
        self._releases.add(request_id)
        await self._traj.send(encode(AdmissionRelease(actor_id=self.actor_id, request_id=request_id,
                                                      reason=reason, token=self.token)))
        self.metrics.inc("admission_releases")
        log.info("released admission %s: %s", request_id, reason)

    async def _watch_reconnects(self, monitor: zmq.asyncio.Socket) -> None:
        """Resend every unacked group as soon as a lost connection is back (the learner may have restarted and
        forgotten it, or its ack may have been lost with the connection)."""
        lost = False
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    lost = True
                    self.metrics.inc("disconnects")
                    log.warning("lost the connection to %s", self.endpoints["trajectories"])
                    continue
                if event["event"] != zmq.EVENT_CONNECTED or not lost:
                    continue
                lost = False
                self.metrics.inc("reconnects")
                log.info("reconnected to %s; resending %d unacked group(s)", self.endpoints["trajectories"],
                         len(self._unacked))
                for frame in list(self._unacked.values()):
                    await self._traj.send(frame)
                    self.metrics.inc("group_resends_on_reconnect")
        finally:
            monitor.close(linger=0)

    # ------------------------------------------------------------------ weights endpoint

    async def poll_weights(self, have_version: int) -> WeightUpdate | None:
        """The newest version when the learner has one > have_version, else None.

        zmq: waits for all buckets of the newest version and reassembles them (row chunks included); returns None
        when they do not all arrive within weight_timeout_s (counted; the caller polls again later). fs / nccl:
        returns the announcement. Raises ProtocolError on inconsistent buckets.
        """
        self._open()
        async with self._weights_lock:
            await self._weights.send(encode(WeightQuery(actor_id=self.actor_id, have_version=have_version,
                                                        token=self.token)))
            self.metrics.inc("weight_queries")
            deadline = time.perf_counter() + self.cfg.weight_timeout_s
            version: int | None = None
            buckets: dict[int, WeightBucket] = {}
            num_buckets = 0
            while version is None or len(buckets) < num_buckets:
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or not await self._weights.poll(remaining * 1000):
                    self.metrics.inc("weight_timeouts")
                    log.warning("weights: %s after %.1f s (%d/%d buckets of version %s)",
                                "incomplete" if buckets else "no reply", self.cfg.weight_timeout_s,
                                len(buckets), num_buckets, version)
                    return None
                frames = await self._weights.recv_multipart()
                try:
                    message = decode(frames[-1], LearnerOutbound)
                except ProtocolError as exc:
                    self.metrics.inc("bad_frames")
                    log.warning("dropped an undecodable weights frame: %s", exc)
                    continue
                if isinstance(message, WeightNone):
                    if version is None:
                        return None
                    continue  # a late answer to an earlier query
                if isinstance(message, ErrorReply):
                    if message.code == "unauthorized":
                        self._fail_unauthorized(message)
                        raise self._unauthorized
                    self.metrics.inc("weight_error_replies")
                    log.error("learner weights error (%s): %s", message.code, message.message)
                    return None
                if isinstance(message, WeightAnnounce):
                    if message.version <= have_version or version is not None:
                        self.metrics.inc("unexpected_messages")
                        continue
                    self.metrics.inc("weight_versions_received")
                    return WeightUpdate(version=message.version, transport=message.transport, announce=message)
                if not isinstance(message, WeightBucket) or message.version <= have_version:
                    self.metrics.inc("unexpected_messages")
                    continue
                if version is None or message.version > version:  # a newer version supersedes partial buckets
                    version, num_buckets, buckets = message.version, message.num_buckets, {}
                elif message.version < version:
                    continue
                if message.num_buckets != num_buckets:
                    raise ProtocolError(f"weights version {version}: bucket {message.index} says "
                                        f"{message.num_buckets} buckets, earlier ones said {num_buckets}")
                if message.index in buckets:
                    raise ProtocolError(f"weights version {version}: bucket {message.index} arrived twice")
                buckets[message.index] = message
            loop = asyncio.get_running_loop()  # reassembly copies every tensor: off the event loop
            assembled, state = await loop.run_in_executor(None, assemble_weight_buckets, list(buckets.values()))
            if assembled != version:
                raise ProtocolError(f"reassembled weights version {assembled}, expected {version}")
            self.metrics.inc("weight_versions_received")
            return WeightUpdate(version=version, transport="zmq", state=state)

    # ------------------------------------------------------------------ lifetime

    async def close(self) -> None:
        """Close the sockets; callers still waiting get TransportClosed."""
        if self._closed:
            return
        self._closed = True
        for waiter in [*self._admission_waiters.values(), *self._ack_waiters.values()]:
            if not waiter.done():
                waiter.set_exception(TransportClosed("learner link closed while waiting for a reply"))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sock in (self._traj, self._weights):
            if sock is not None:
                if sock is self._traj:
                    sock.disable_monitor()
                sock.close(linger=0)
        if self._unacked:
            log.warning("learner link closed with %d unacked group(s)", len(self._unacked))
