"""Tool clients: `ToolClient` (asyncio, many concurrent calls on one loop) and `SyncToolClient` (blocking).

A client talks to the replicas of one tool over one DEALER each, picks the replica with the fewest requests in
flight, matches replies by request id, and retries `timeout`/`overloaded` on another replica while the call's
deadline allows. Replicas with no live connection are skipped without spending an attempt.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import zmq
import zmq.asyncio

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
from tool_servers.errors import ToolCallError

log = logging.getLogger(__name__)

RETRYABLE_CODES = frozenset({"timeout", "overloaded"})
_MIN_ATTEMPT_S = 0.002  # below this much time left, another attempt cannot come back in time
_MAX_BACKOFF_S = 0.1  # longest wait before retrying replicas that all failed or were unreachable


class _Replica:
    def __init__(self, endpoint: str, socket: zmq.asyncio.Socket) -> None:
        self.endpoint = endpoint
        self.socket = socket
        self.outstanding = 0
        self.reader: asyncio.Task | None = None


class ToolClient:
    """Call one tool on its replicas (`endpoints`).

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
        self._replicas: list[_Replica] = []
        self._waiters: dict[str, asyncio.Future] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._turn = 0

    # ------------------------------------------------------------------ public

    async def call(self, tool: str, args: Mapping[str, Any], deadline_s: float | None = None) -> ToolReply:
        """The ok reply of `tool(args)`, or ToolCallError (the server's code, or `timeout` with no reply)."""
        loop = self._open()
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
        while (remaining := end - loop.time()) > _MIN_ATTEMPT_S:
            replica = self._pick(avoid)
            if replica is None:  # every replica failed or has no connection: pause, then try them all again
                await asyncio.sleep(min(backoff, remaining))
                backoff = min(2 * backoff, _MAX_BACKOFF_S)
                avoid.clear()
                continue
            spare = sum(r not in timed_out for r in self._replicas)
            if self.attempt_timeout_s is not None:
                budget = min(self.attempt_timeout_s, remaining)
            else:
                budget = remaining / max(1, min(self.retries + 1 - attempts, spare))
            request_id = f"{call_id}.{attempts}"
            request = ToolRequest(id=request_id, tool=tool, args=dict(args), token=self.token,
                                  deadline_ms=max(1, int(budget * 1000)))
            try:
                reply = await self._exchange(replica, request_id, encode(request), budget)
            except zmq.Again:  # IMMEDIATE: no completed connection to this replica (down or still connecting)
                unreachable += 1
                self.metrics.inc("unreachable")
                avoid.add(replica)
                continue
            attempts += 1
            error = self._error_of(reply, replica, budget)
            if error is None:
                self.metrics.inc("replies_ok")
                self.metrics.observe("latency_ms", (loop.time() - started) * 1000.0)
                return reply
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
            "timeout", f"no reply from {tool} at {self.endpoints} within {deadline_s:.3f} s "
                       f"({attempts} attempts, {unreachable} sends found no live replica)")

    async def stats(self, timeout_s: float = 2.0) -> dict[str, dict[str, float]]:
        """Stats of every replica that answers within timeout_s, by endpoint."""
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
                break
            return replica.endpoint, None

        answers = await asyncio.gather(*(one(r) for r in self._replicas))
        return {endpoint: stats for endpoint, stats in answers if stats is not None}

    async def close(self) -> None:
        """Close the sockets; calls still waiting raise RuntimeError."""
        if self._closed:
            return
        self._closed = True
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(RuntimeError("ToolClient closed while the call was in flight"))
        readers = [r.reader for r in self._replicas if r.reader is not None]
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for replica in self._replicas:
            replica.socket.close(linger=0)

    # ------------------------------------------------------------------ internals

    def _open(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._closed:
            raise RuntimeError("ToolClient is closed")
        if self._loop is None:
            self._loop = loop
            context = zmq.asyncio.Context.instance()
            for endpoint in self.endpoints:
                socket = configure(context.socket(zmq.DEALER), self.max_frame_bytes)
                socket.setsockopt(zmq.IMMEDIATE, 1)  # queue only on live connections, so sends to the dead fail
                socket.setsockopt(zmq.RECONNECT_IVL, 100)
                socket.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
                socket.setsockopt(zmq.HEARTBEAT_IVL, 1000)  # notice peers that vanished without closing TCP
                socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
                socket.connect(endpoint)
                replica = _Replica(endpoint, socket)
                replica.reader = loop.create_task(self._read(replica), name=f"tool-client-read-{endpoint}")
                self._replicas.append(replica)
        elif loop is not self._loop:
            raise RuntimeError("ToolClient is bound to the event loop of its first call; create one per loop")
        return loop

    def _pick(self, avoid: set[_Replica]) -> _Replica | None:
        """The replica with the fewest requests in flight among those not to avoid; ties take turns."""
        candidates = [r for r in self._replicas if r not in avoid]
        if not candidates:
            return None
        fewest = min(r.outstanding for r in candidates)
        best = [r for r in candidates if r.outstanding == fewest]
        self._turn += 1
        return best[self._turn % len(best)]

    async def _exchange(self, replica: _Replica, request_id: str, frame: bytes, budget: float) -> Message | None:
        """Send one frame and wait up to `budget` s for the reply with its id (None on no reply)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = waiter
        try:
            await replica.socket.send(frame, flags=zmq.NOBLOCK)
            replica.outstanding += 1
            try:
                return await asyncio.wait_for(waiter, budget)
            except TimeoutError:
                return None
            finally:
                replica.outstanding -= 1
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
        self._client = ToolClient(endpoints, **kwargs)
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
