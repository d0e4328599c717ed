"""Tool clients: `ToolClient` (asyncio, many concurrent calls on one loop) and `SyncToolClient` (blocking).

A client talks to the replicas of one tool over one DEALER each, picks the replica with the fewest requests in
flight, matches replies by request id, and retries `timeout`/`overloaded` on another replica while the call's
deadline allows. A socket monitor tells which replicas are connected: a replica that disconnects (killed,
crashed, restarted) fails its in-flight calls over to the others at once, is skipped while down, and is
re-probed by ZMQ's reconnect timer until it comes back. `health()` reports each replica's state.
"""
from __future__ import annotations

import asyncio
import logging
import random
import threading
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from protocol import (
    ErrorReply,
    ProtocolError,
    StatsReply,
    StatsRequest,
    ToolOutbound,
    ToolReply,
    ToolRequest,
    decode,
    encode,
)
from protocol.codec import DEFAULT_MAX_FRAME_BYTES
from protocol.messages import Message
from protocol.metrics import Metrics
from protocol.sockets import configure
from tool_servers.discovery import read_discovery
from tool_servers.errors import ToolCallError

log = logging.getLogger(__name__)

RETRYABLE_CODES = frozenset({"timeout", "overloaded"})
_MIN_ATTEMPT_S = 0.002  # below this much time left, another attempt cannot come back in time
_MAX_BACKOFF_S = 0.1  # longest wait before retrying replicas that all failed or were unreachable
_DISCONNECTED = object()  # what an in-flight attempt gets when its replica's connection drops


class _Replica:
    def __init__(self, endpoint: str, socket: zmq.asyncio.Socket) -> None:
        self.endpoint = endpoint
        self.socket = socket
        self.outstanding = 0
        self.inflight: dict[str, asyncio.Future] = {}
        self.connected = False  # set by the monitor: a ZMTP handshake succeeded and no disconnect since
        self.seen = False  # connected at least once
        self.disconnects = 0
        self.replies_ok = 0
        self.errors = 0
        self.last_error = ""
        self.tasks: list[asyncio.Task] = []


class ToolClient:
    """Call one tool on its replicas (`endpoints`, or a discovery file via `from_discovery`).

    Each attempt gets the remaining deadline divided among the attempts still possible on replicas that have
    not timed out (so a lone replica gets the whole deadline), or `attempt_timeout_s` when set. The client is
    bound to the event loop of its first call.
    """

    def __init__(self, endpoints: Sequence[str] | str, *, token: str | None = None,
                 default_deadline_s: float = 10.0, retries: int = 2, attempt_timeout_s: float | None = None,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, metrics: Metrics | None = None) -> None:
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not self.endpoints or not all(isinstance(e, str) and e for e in self.endpoints):
            raise ValueError(f"ToolClient needs at least one endpoint, got {endpoints!r}")
        if default_deadline_s <= 0 or retries < 0 or (attempt_timeout_s is not None and attempt_timeout_s <= 0):
            raise ValueError(f"need default_deadline_s > 0, retries >= 0, attempt_timeout_s > 0 or None; got "
                             f"{default_deadline_s}, {retries}, {attempt_timeout_s}")
        self.token = token
        self.default_deadline_s = default_deadline_s
        self.retries = retries
        self.attempt_timeout_s = attempt_timeout_s
        self.max_frame_bytes = max_frame_bytes
        self.metrics = metrics or Metrics()
        for name in ("calls", "replies_ok", "retries", "unreachable", "unanswered", "replica_disconnects",
                     "disconnected_in_flight", "cached_replies"):
            self.metrics.inc(name, 0.0)
        self._replicas: list[_Replica] = []
        self._waiters: dict[str, asyncio.Future] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._turn = 0
        self._discovery: tuple[Path, str, float] | None = None  # (file, tool, refresh_s)
        self._discovery_seen: tuple[float, int] | None = None  # (mtime, size) last read
        self._discovery_checked = 0.0

    @classmethod
    def from_discovery(cls, path: str | Path, tool: str, *, refresh_s: float = 1.0, **kwargs: Any) -> "ToolClient":
        """A client for `tool`'s replicas listed in a discovery file, re-read (at most every refresh_s) on change."""
        path = Path(path)
        endpoints = read_discovery(path).get(tool, [])
        if not endpoints:
            raise ValueError(f"discovery file {path} lists no replicas of {tool!r}")
        client = cls(endpoints, **kwargs)
        client._discovery = (path, tool, refresh_s)
        stat = path.stat()
        client._discovery_seen = (stat.st_mtime, stat.st_size)
        return client

    # ------------------------------------------------------------------ public

    async def call(self, tool: str, args: Mapping[str, Any], deadline_s: float | None = None) -> ToolReply:
        """The ok reply of `tool(args)`, or ToolCallError (the server's code, or `timeout` with no reply)."""
        loop = self._open()
        self._refresh_discovery(loop)
        deadline_s = self.default_deadline_s if deadline_s is None else deadline_s
        if not deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s!r}")
        started = loop.time()
        end = started + deadline_s
        call_id = uuid.uuid4().hex
        self.metrics.inc("calls")
        avoid: set[_Replica] = set()  # failed or unreachable during this call: tried last
        timed_out: set[_Replica] = set()
        attempts, backoff, unreachable = 0, 0.002, 0
        last_error: ToolCallError | None = None
        frame_args = dict(args)
        while (remaining := end - loop.time()) > _MIN_ATTEMPT_S:
            replica = self._pick(avoid)
            if replica is None:  # every replica failed or has no connection: pause, then try them all again
                await asyncio.sleep(min(backoff, remaining) * random.uniform(0.5, 1.0))  # jitter: no herd
                backoff = min(2 * backoff, _MAX_BACKOFF_S)
                avoid.clear()
                continue
            spare = sum(r not in timed_out for r in self._replicas)
            if self.attempt_timeout_s is not None:
                budget = min(self.attempt_timeout_s, remaining)
            else:
                budget = remaining / max(1, min(self.retries + 1 - attempts, spare))
            request_id = f"{call_id}.{attempts}.{unreachable}"
            request = ToolRequest(id=request_id, tool=tool, args=frame_args, token=self.token,
                                  deadline_ms=max(1, int(budget * 1000)))
            try:
                frame = encode(request)
            except (ValueError, OverflowError, TypeError) as exc:  # a lone surrogate, an int beyond 64 bits, ...
                self.metrics.inc("error_bad_request")
                raise ToolCallError("bad_request", f"{tool} arguments cannot be sent: {type(exc).__name__}: "
                                                   f"{exc}") from exc
            try:
                reply = await self._exchange(replica, request_id, frame, budget)
            except zmq.Again:  # IMMEDIATE: no completed connection to this replica (down or still connecting)
                unreachable += 1
                self.metrics.inc("unreachable")
                avoid.add(replica)
                continue
            if reply is _DISCONNECTED:  # the replica went away with this attempt in flight: try another now
                unreachable += 1
                self.metrics.inc("disconnected_in_flight")
                avoid.add(replica)
                continue
            attempts += 1
            if reply is None:  # the attempt's budget ran out with no reply at all: a hung (or very slow) replica
                self.metrics.inc("unanswered")
            error = self._error_of(reply, replica, budget)
            if error is None:
                replica.replies_ok += 1
                self.metrics.inc("replies_ok")
                if reply.cached:
                    self.metrics.inc("cached_replies")
                self.metrics.observe("latency_ms", (loop.time() - started) * 1000.0)
                return reply
            replica.errors += 1
            replica.last_error = error.code
            self.metrics.inc(f"error_{error.code}")
            last_error = error
            if error.code not in RETRYABLE_CODES or attempts > self.retries:
                raise error
            self.metrics.inc("retries")
            avoid.add(replica)
            if error.code == "timeout":
                timed_out.add(replica)
        if last_error is not None and last_error.code == "overloaded":
            raise last_error
        if last_error is None:  # attempts that timed out were counted already
            self.metrics.inc("error_timeout")
        raise ToolCallError(
            "timeout", f"no reply from {tool} at {[r.endpoint for r in self._replicas]} within {deadline_s:.3f} s "
                       f"({attempts} attempts, {unreachable} sends found no live replica)")

    async def stats(self, timeout_s: float = 2.0) -> dict[str, dict[str, float]]:
        """Stats of every replica that answers within timeout_s, by endpoint (a dead replica is absent)."""
        loop = self._open()

        async def one(replica: _Replica) -> tuple[str, dict[str, float] | None]:
            request_id = f"stats.{uuid.uuid4().hex}"
            frame = encode(StatsRequest(id=request_id, token=self.token))
            end = loop.time() + timeout_s
            while loop.time() < end:
                try:
                    reply = await self._exchange(replica, request_id, frame, end - loop.time())
                except zmq.Again:
                    await asyncio.sleep(0.01)
                    continue
                if isinstance(reply, StatsReply):
                    return replica.endpoint, reply.stats
                if isinstance(reply, ErrorReply):
                    raise ToolCallError(reply.code, f"{replica.endpoint}: {reply.message}")
                if reply is _DISCONNECTED:
                    continue
                break
            return replica.endpoint, None

        answers = await asyncio.gather(*(one(r) for r in self._replicas))
        return {endpoint: stats for endpoint, stats in answers if stats is not None}

    async def wait_connected(self, timeout_s: float = 5.0) -> bool:
        """Wait until every replica has connected (handshake done); False when some did not within timeout_s."""
        loop = self._open()
        end = loop.time() + timeout_s
        while not all(r.connected for r in self._replicas):
            if loop.time() >= end:
                return False
            await asyncio.sleep(0.005)
        return True

    def health(self) -> dict[str, dict[str, Any]]:
        """Per replica: connected now, ever connected, disconnects, calls in flight, replies ok, errors."""
        return {
            r.endpoint: {"connected": r.connected, "seen": r.seen, "disconnects": r.disconnects,
                         "outstanding": r.outstanding, "replies_ok": r.replies_ok, "errors": r.errors,
                         "last_error": r.last_error}
            for r in self._replicas
        }

    async def close(self) -> None:
        """Close the sockets; calls still waiting raise RuntimeError."""
        if self._closed:
            return
        self._closed = True
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(RuntimeError("ToolClient closed while the call was in flight"))
        for replica in list(self._replicas):
            await self._drop_replica(replica)

    # ------------------------------------------------------------------ replicas

    def _open(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._closed:
            raise RuntimeError("ToolClient is closed")
        if self._loop is None:
            self._loop = loop
            for endpoint in self.endpoints:
                self._add_replica(endpoint)
        elif loop is not self._loop:
            raise RuntimeError("ToolClient is bound to the event loop of its first call; create one per loop")
        return loop

    def _add_replica(self, endpoint: str) -> None:
        assert self._loop is not None
        socket = configure(zmq.asyncio.Context.instance().socket(zmq.DEALER), self.max_frame_bytes)
        socket.setsockopt(zmq.IMMEDIATE, 1)  # queue only on live connections, so sends to the dead fail
        socket.setsockopt(zmq.RECONNECT_IVL, 100)  # the re-probe of a dead replica: 100 ms, backing off to 2 s
        socket.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        socket.setsockopt(zmq.HEARTBEAT_IVL, 1000)  # notice peers that vanished without closing TCP
        socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        monitor = socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        socket.connect(endpoint)
        replica = _Replica(endpoint, socket)
        replica.tasks = [self._loop.create_task(self._read(replica), name=f"tool-client-read-{endpoint}"),
                         self._loop.create_task(self._watch(replica, monitor), name=f"tool-client-watch-{endpoint}")]
        self._replicas.append(replica)
        if endpoint not in self.endpoints:
            self.endpoints.append(endpoint)

    async def _drop_replica(self, replica: _Replica) -> None:
        self._fail_inflight(replica)
        for task in replica.tasks:
            task.cancel()
        await asyncio.gather(*replica.tasks, return_exceptions=True)
        replica.socket.close(linger=0)
        if replica in self._replicas:
            self._replicas.remove(replica)
        self._update_connected()

    def _refresh_discovery(self, loop: asyncio.AbstractEventLoop) -> None:
        """Re-read the discovery file when it changed: connect new replicas, drop vanished ones."""
        if self._discovery is None or loop.time() - self._discovery_checked < self._discovery[2]:
            return
        path, tool, _ = self._discovery
        self._discovery_checked = loop.time()
        try:
            stat = path.stat()
            if (stat.st_mtime, stat.st_size) == self._discovery_seen:
                return
            self._discovery_seen = (stat.st_mtime, stat.st_size)
            wanted = read_discovery(path).get(tool, [])
        except (OSError, ValueError) as exc:  # keep the replicas we have; the file may be mid-rewrite elsewhere
            log.warning("discovery file %s unreadable, keeping %d replicas: %s", path, len(self._replicas), exc)
            return
        if not wanted:
            log.warning("discovery file %s lists no replicas of %s; keeping the current ones", path, tool)
            return
        for endpoint in wanted:
            if endpoint not in [r.endpoint for r in self._replicas]:
                log.info("discovery: new %s replica %s", tool, endpoint)
                self._add_replica(endpoint)
        for replica in [r for r in self._replicas if r.endpoint not in wanted]:
            log.info("discovery: %s replica %s removed", tool, replica.endpoint)
            self.endpoints.remove(replica.endpoint)
            loop.create_task(self._drop_replica(replica))
            self._replicas.remove(replica)

    def _pick(self, avoid: set[_Replica]) -> _Replica | None:
        """The connected replica with the fewest requests in flight among those not to avoid; ties take turns.

        Replicas not known to be connected are tried only when no connected one is left (a send to them fails
        at once under IMMEDIATE, so trying costs nothing).
        """
        candidates = [r for r in self._replicas if r not in avoid]
        live = [r for r in candidates if r.connected]
        candidates = live or candidates
        if not candidates:
            return None
        fewest = min(r.outstanding for r in candidates)
        best = [r for r in candidates if r.outstanding == fewest]
        self._turn += 1
        return best[self._turn % len(best)]

    def _fail_inflight(self, replica: _Replica) -> None:
        for waiter in replica.inflight.values():
            if not waiter.done():
                waiter.set_result(_DISCONNECTED)

    def _update_connected(self) -> None:
        self.metrics.set("replicas_connected", sum(r.connected for r in self._replicas))
        self.metrics.set("replicas", len(self._replicas))

    async def _watch(self, replica: _Replica, monitor: zmq.asyncio.Socket) -> None:
        """Follow the DEALER's connection events: up after a handshake, down on disconnect."""
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    if replica.seen and not replica.connected:
                        log.info("tool replica %s is back", replica.endpoint)
                        self.metrics.inc("replica_reconnects")
                    replica.connected = replica.seen = True
                elif event == zmq.EVENT_DISCONNECTED and replica.connected:
                    replica.connected = False
                    replica.disconnects += 1
                    self.metrics.inc("replica_disconnects")
                    log.warning("tool replica %s disconnected with %d calls in flight; failing them over",
                                replica.endpoint, len(replica.inflight))
                    self._fail_inflight(replica)
                self._update_connected()
        finally:
            replica.socket.disable_monitor()
            monitor.close(linger=0)

    # ------------------------------------------------------------------ messages

    async def _exchange(self, replica: _Replica, request_id: str, frame: bytes, budget: float) -> Any:
        """Send one frame and wait up to `budget` s for the reply with its id (None: no reply; _DISCONNECTED)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = waiter
        try:
            await replica.socket.send(frame, flags=zmq.NOBLOCK)
            replica.outstanding += 1
            replica.inflight[request_id] = waiter
            try:
                return await asyncio.wait_for(waiter, budget)
            except TimeoutError:
                return None
            finally:
                replica.outstanding -= 1
                replica.inflight.pop(request_id, None)
        finally:
            self._waiters.pop(request_id, None)

    async def _read(self, replica: _Replica) -> None:
        while True:
            frames = await replica.socket.recv_multipart()
            try:
                message = decode(frames[-1], ToolOutbound, max_frame_bytes=self.max_frame_bytes)
            except (ProtocolError, ValueError) as exc:
                self.metrics.inc("undecodable_replies")
                log.warning("undecodable reply from %s: %s", replica.endpoint, exc)
                continue
            waiter = self._waiters.get(message.id)
            if waiter is None or waiter.done():
                self.metrics.inc("unmatched_replies")  # usually a reply that came after its attempt gave up
                if isinstance(message, ErrorReply) and not message.id:
                    log.warning("%s rejected a frame with %s: %s", replica.endpoint, message.code, message.message)
                continue
            waiter.set_result(message)

    @staticmethod
    def _error_of(reply: Message | None, replica: _Replica, budget: float) -> ToolCallError | None:
        if reply is None:
            return ToolCallError("timeout", f"no reply from {replica.endpoint} within {budget * 1000:.0f} ms")
        if isinstance(reply, ToolReply):
            if reply.ok:
                return None
            if reply.error is None:
                return ToolCallError("backend_error", f"{replica.endpoint} replied not ok without an error")
            return ToolCallError(reply.error.code, reply.error.message)
        if isinstance(reply, ErrorReply):
            return ToolCallError(reply.code, reply.message)
        return ToolCallError("backend_error", f"{replica.endpoint} answered with a {type(reply).__name__}")


class SyncToolClient:
    """A blocking ToolClient: its own event loop on a daemon thread; `call` is safe from any thread."""

    def __init__(self, endpoints: Sequence[str] | str, **kwargs: Any) -> None:
        self._start(ToolClient(endpoints, **kwargs))

    @classmethod
    def from_discovery(cls, path: str | Path, tool: str, **kwargs: Any) -> "SyncToolClient":
        client = cls.__new__(cls)
        client._start(ToolClient.from_discovery(path, tool, **kwargs))
        return client

    def _start(self, client: ToolClient) -> None:
        self._client = client
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tool-client", daemon=True)
        self._thread.start()

    @property
    def metrics(self) -> Metrics:
        return self._client.metrics

    def call(self, tool: str, args: Mapping[str, Any], deadline_s: float | None = None) -> ToolReply:
        """Blocking ToolClient.call."""
        deadline = self._client.default_deadline_s if deadline_s is None else deadline_s
        future = asyncio.run_coroutine_threadsafe(self._client.call(tool, args, deadline_s), self._loop)
        return future.result(timeout=deadline + 5.0)

    def stats(self, timeout_s: float = 2.0) -> dict[str, dict[str, float]]:
        future = asyncio.run_coroutine_threadsafe(self._client.stats(timeout_s), self._loop)
        return future.result(timeout=timeout_s + 5.0)

    def health(self) -> dict[str, dict[str, Any]]:
        return asyncio.run_coroutine_threadsafe(self._health(), self._loop).result(timeout=5.0)

    async def _health(self) -> dict[str, dict[str, Any]]:
        return self._client.health()

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._client.close(), self._loop).result(timeout=5.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5.0)
        self._loop.close()

    def __enter__(self) -> "SyncToolClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
