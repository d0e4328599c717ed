"""The tool server: one asyncio ZMQ ROUTER answering ToolRequests with micro-batched backend searches.

Every request is answered exactly once and never after its deadline: a timer sends `timeout` just before the
deadline, and a result that comes later is dropped (and counted). `ToolServerRole` runs a server on its own
thread and event loop so that plain Python (or a Ray actor in launch.py) can start, query and stop it.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import msgspec
import zmq
import zmq.asyncio

from protocol import (
    ERROR_CODES,
    ErrorReply,
    ProtocolError,
    StatsReply,
    StatsRequest,
    ToolError,
    ToolInbound,
    ToolItem,
    ToolReply,
    ToolRequest,
    decode,
    encode,
)
from protocol.messages import Message
from protocol.metrics import Metrics
from protocol.sockets import bind as bind_socket
from protocol.sockets import configure, is_loopback_endpoint
from tool_servers.backends import Backend, build_backend
from tool_servers.errors import ToolCallError
from tool_servers.limits import ServerLimits, check_args

log = logging.getLogger(__name__)


class _PeekId(msgspec.Struct):
    """Just enough of a frame to address an error reply to the request that caused it."""

    id: str = ""


_peek_decoder = msgspec.msgpack.Decoder(_PeekId)


def _peek_id(frame: bytes) -> str:
    try:
        return _peek_decoder.decode(frame).id
    except Exception:  # garbage, a non-map, a non-string id: nothing to address the reply to
        return ""


@dataclass(eq=False)
class _Pending:
    """A request between receipt and its one reply."""

    identity: bytes
    request: ToolRequest
    received: float  # loop.time() at receipt
    timer: Optional[asyncio.TimerHandle] = None
    answered: bool = False


@dataclass
class _ToolLane:
    """One tool's queue, worker tasks and executor, so a slow tool never holds up another."""

    backend: Backend
    queue: asyncio.Queue
    executor: concurrent.futures.ThreadPoolExecutor
    workers: list[asyncio.Task] = field(default_factory=list)


class ToolServer:
    """Serve `backends` ({tool name: Backend}) on one ROUTER socket.

    Loopback binds by default; binding beyond loopback requires a shared `token`, which every request must
    then carry (compared in constant time). All socket I/O happens on the event loop; backends run in
    per-tool executor threads.
    """

    def __init__(self, backends: Mapping[str, Backend], *, bind: str = "tcp://127.0.0.1:*",
                 token: str | None = None, limits: ServerLimits | None = None,
                 metrics: Metrics | None = None) -> None:
        if not backends:
            raise ValueError("ToolServer needs at least one backend")
        if not is_loopback_endpoint(bind) and not token:
            raise ValueError(f"binding {bind!r} beyond loopback requires a token")
        self.backends = dict(backends)
        self.bind = bind
        self.limits = limits or ServerLimits()
        self.metrics = metrics or Metrics()
        self.endpoint: str | None = None
        self._token = token.encode() if token else None
        self._socket: zmq.asyncio.Socket | None = None
        self._lanes: dict[str, _ToolLane] = {}
        self._pending: set[_Pending] = set()
        self._receiver: asyncio.Task | None = None
        self._stopping = False
        self._closed: asyncio.Event | None = None
        for code in ERROR_CODES:  # every code appears in stats, even at zero
            self.metrics.inc(f"error_{code}", 0.0)
        for name in ("requests", "replies_ok", "expired_in_queue", "late_results_dropped", "undecodable_frames"):
            self.metrics.inc(name, 0.0)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> str:
        """Bind, start the receive loop and the workers; return the concrete endpoint."""
        if self._socket is not None:
            raise RuntimeError(f"ToolServer already started on {self.endpoint}")
        self._closed = asyncio.Event()
        socket = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        configure(socket, self.limits.socket_max_frame_bytes)
        try:
            self.endpoint = bind_socket(socket, self.bind, allow_remote=self._token is not None)
        except Exception:
            socket.close(linger=0)
            raise
        self._socket = socket
        for tool, backend in self.backends.items():
            lane = _ToolLane(
                backend=backend,
                queue=asyncio.Queue(maxsize=self.limits.max_queue),
                executor=concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.limits.max_concurrent_batches, thread_name_prefix=f"tool-{tool}"
                ),
            )
            lane.workers = [
                asyncio.create_task(self._work(tool, lane), name=f"tool-worker-{tool}-{i}")
                for i in range(self.limits.max_concurrent_batches)
            ]
            self._lanes[tool] = lane
        self._receiver = asyncio.create_task(self._receive(), name="tool-server-receive")
        log.info("tool server for %s listening on %s", sorted(self.backends), self.endpoint)
        return self.endpoint

    async def serve_forever(self) -> None:
        """Start if needed and return once `stop()` has finished."""
        if self._socket is None:
            await self.start()
        assert self._closed is not None
        await self._closed.wait()

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop gracefully: refuse new work (`overloaded`), answer everything in flight, then close.

        Waiting is bounded by the pending requests' deadlines (each gets `timeout` at worst) and `timeout_s`.
        """
        if self._socket is None or self._closed is None:
            return
        if self._stopping:
            await self._closed.wait()
            return
        self._stopping = True
        end = time.monotonic() + timeout_s
        while self._pending and time.monotonic() < end:
            await asyncio.sleep(0.005)
        if self._pending:
            log.warning("tool server stopping with %d requests unanswered after %.1f s", len(self._pending),
                        timeout_s)
        tasks = [t for lane in self._lanes.values() for t in lane.workers] + [self._receiver]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for tool, lane in self._lanes.items():
            lane.executor.shutdown(wait=False, cancel_futures=True)
            try:
                lane.backend.close()
            except Exception:
                log.exception("closing backend %s failed", tool)
        self._socket.close(linger=0)
        log.info("tool server on %s stopped", self.endpoint)
        self._closed.set()

    def stats(self) -> dict[str, float]:
        """Counters (requests, replies_ok, error_<code>, drops), latency_ms summary, queue depth."""
        self.metrics.set("pending", len(self._pending))
        self.metrics.set("queued", sum(lane.queue.qsize() for lane in self._lanes.values()))
        return self.metrics.snapshot()

    # ------------------------------------------------------------------ receiving

    async def _receive(self) -> None:
        assert self._socket is not None
        while True:
            frames = await self._socket.recv_multipart()
            try:
                self._on_frames(frames)
            except Exception:  # a bug handling one frame must not stop the server
                log.exception("tool server failed to handle a frame")

    def _on_frames(self, frames: list[bytes]) -> None:
        identity, payloads = frames[0], frames[1:]
        if len(payloads) != 1:
            self._frame_error(identity, "bad_request", f"expected 1 payload frame, got {len(payloads)}", "")
            return
        payload = payloads[0]
        if len(payload) > self.limits.max_frame_bytes:
            self._frame_error(identity, "too_large",
                              f"frame of {len(payload)} bytes exceeds the limit of {self.limits.max_frame_bytes}",
                              _peek_id(payload))
            return
        try:
            message = decode(payload, ToolInbound, max_frame_bytes=self.limits.max_frame_bytes)
        except (ProtocolError, ValueError) as exc:  # msgspec raises UnicodeDecodeError for invalid UTF-8
            self.metrics.inc("undecodable_frames")
            self._frame_error(identity, "bad_request", str(exc), _peek_id(payload))
            return
        if not self._authorised(message.token):
            self._frame_error(identity, "unauthorized", "missing or wrong token", message.id)
            return
        if isinstance(message, StatsRequest):
            self._send(identity, StatsReply(id=message.id, stats=self.stats()))
            return
        self._admit(identity, message)

    def _authorised(self, token: str | None) -> bool:
        if self._token is None:
            return True
        return token is not None and hmac.compare_digest(token.encode(), self._token)

    def _admit(self, identity: bytes, request: ToolRequest) -> None:
        """Check a decoded request and queue it, or answer it at once with its error."""
        loop = asyncio.get_running_loop()
        pending = _Pending(identity=identity, request=request, received=loop.time())
        self.metrics.inc("requests")
        self._pending.add(pending)
        lane = self._lanes.get(request.tool)
        if lane is not None:
            self.metrics.inc(f"requests_{request.tool}")
        try:
            if self._stopping:
                raise ToolCallError("overloaded", f"server {self.endpoint} is stopping")
            if lane is None:
                raise ToolCallError("unknown_tool", f"{request.tool!r}; this server has {sorted(self._lanes)}")
            if not 0 < request.deadline_ms <= self.limits.max_deadline_ms:
                raise ToolCallError(
                    "bad_request", f"deadline_ms {request.deadline_ms} outside 1..{self.limits.max_deadline_ms}"
                )
            check_args(request.args, self.limits)
            lane.backend.validate(request.args)
            lane.queue.put_nowait(pending)
        except ToolCallError as exc:
            self._answer(pending, error=exc)
            return
        except asyncio.QueueFull:
            self._answer(pending, error=ToolCallError(
                "overloaded", f"{request.tool} queue is full ({self.limits.max_queue} waiting)"))
            return
        except Exception as exc:  # a validate() bug is the backend's fault, not the caller's
            log.exception("%s validate failed", request.tool)
            self._answer(pending, error=ToolCallError("backend_error", f"{type(exc).__name__}: {exc}"))
            return
        # Leave a margin so the timeout reply reaches the client before its own deadline passes.
        margin_s = min(self.limits.reply_margin_ms, request.deadline_ms / 2) / 1000.0
        pending.timer = loop.call_at(
            pending.received + request.deadline_ms / 1000.0 - margin_s, self._expire, pending
        )

    def _expire(self, pending: _Pending) -> None:
        self._answer(pending, error=ToolCallError(
            "timeout", f"{pending.request.tool} found no answer within {pending.request.deadline_ms} ms"))

    # ------------------------------------------------------------------ working

    async def _work(self, tool: str, lane: _ToolLane) -> None:
        """Take whatever is queued (up to max_batch, without waiting for more) and search it as one batch."""
        while True:
            batch = [await lane.queue.get()]
            while len(batch) < self.limits.max_batch and not lane.queue.empty():
                batch.append(lane.queue.get_nowait())
            live = [p for p in batch if not p.answered]
            if len(live) < len(batch):
                self.metrics.inc("expired_in_queue", len(batch) - len(live))
            if live:
                await self._search(tool, lane, live)

    async def _search(self, tool: str, lane: _ToolLane, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        batch_error: Exception | None = None
        try:
            results = await loop.run_in_executor(
                lane.executor, lane.backend.search_batch, [dict(p.request.args) for p in batch]
            )
            if not isinstance(results, list) or len(results) != len(batch):
                raise TypeError(f"search_batch returned {type(results).__name__} of length "
                                f"{len(results) if isinstance(results, list) else '?'} for {len(batch)} requests")
        except Exception as exc:
            log.warning("%s search_batch of %d failed: %s: %s", tool, len(batch), type(exc).__name__, exc)
            batch_error = exc
            results = [exc] * len(batch)
        self.metrics.observe("batch_size", len(batch))
        self.metrics.observe(f"backend_ms_{tool}", (loop.time() - started) * 1000.0)
        for pending, result in zip(batch, results):
            if pending.answered:
                self.metrics.inc("late_results_dropped")
            elif isinstance(result, BaseException):
                error = result if isinstance(result, ToolCallError) else ToolCallError(
                    "backend_error", f"{type(result).__name__}: {result}")
                if error.code == "backend_error" and result is not batch_error:  # batch failures logged above
                    log.warning("%s request %s failed: %s", tool, pending.request.id, error.message)
                self._answer(pending, error=error)
            elif not all(isinstance(item, ToolItem) for item in result):
                self._answer(pending, error=ToolCallError(
                    "backend_error", f"{tool} returned {[type(i).__name__ for i in result]} instead of ToolItems"))
            else:
                self._answer(pending, items=result)

    # ------------------------------------------------------------------ replying

    def _answer(self, pending: _Pending, *, items: list[ToolItem] | None = None,
                error: ToolCallError | None = None) -> None:
        """Send the one reply of a request (no-op when it was already answered)."""
        if pending.answered:
            return
        pending.answered = True
        self._pending.discard(pending)
        if pending.timer is not None:
            pending.timer.cancel()
        server_ms = (asyncio.get_running_loop().time() - pending.received) * 1000.0
        self.metrics.observe("latency_ms", server_ms)
        request = pending.request
        if error is None:
            self.metrics.inc("replies_ok")
            reply = ToolReply(id=request.id, ok=True, items=items or [], server_ms=server_ms)
        else:
            self.metrics.inc(f"error_{error.code}")
            if error.code not in ("timeout", "overloaded", "backend_error"):
                log.info("%s request %s rejected: %s", request.tool, request.id, error)
            reply = ToolReply(id=request.id, ok=False, error=ToolError(code=error.code, message=error.message),
                              server_ms=server_ms)
        self._send(pending.identity, reply)

    def _frame_error(self, identity: bytes, code: str, message: str, request_id: str) -> None:
        self.metrics.inc(f"error_{code}")
        log.info("rejected frame (id %r) with %s: %s", request_id, code, message)
        self._send(identity, ErrorReply(code=code, message=message, id=request_id))

    def _send(self, identity: bytes, message: Message) -> None:
        assert self._socket is not None
        try:
            # ROUTER never blocks: it drops replies to peers that are gone or over their high-water mark.
            self._socket.send_multipart([identity, encode(message)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self.metrics.inc("send_failures")
            log.warning("reply to %r failed: %s", identity, exc)


class ToolServerRole:
    """A ToolServer for one tool on a background thread with its own event loop (plain Python, no Ray).

    `backend_cfg` is the tool's conf section (see build_backend); `limits` the conf `limits:` mapping.
    """

    def __init__(self, tool: str, backend_cfg: Mapping[str, Any], bind: str = "tcp://127.0.0.1:*", *,
                 limits: ServerLimits | Mapping[str, Any] | None = None, token: str | None = None) -> None:
        self.tool = tool
        self.backend_cfg = dict(backend_cfg)
        self.bind = bind
        self.limits = limits if isinstance(limits, ServerLimits) else ServerLimits.from_mapping(limits)
        self.token = token
        self.endpoint: str | None = None
        self._server: ToolServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 120.0) -> str:
        """Build the backend (loads the corpus), start serving, return the endpoint."""
        if self._thread is not None:
            raise RuntimeError(f"ToolServerRole({self.tool}) already started on {self.endpoint}")
        backend = build_backend(self.tool, self.backend_cfg)
        self._server = ToolServer({self.tool: backend}, bind=self.bind, token=self.token, limits=self.limits)
        self._loop = asyncio.new_event_loop()
        started: concurrent.futures.Future[str] = concurrent.futures.Future()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                started.set_result(self._loop.run_until_complete(self._server.start()))
            except BaseException as exc:
                started.set_exception(exc)
                self._loop.close()
                return
            self._loop.run_until_complete(self._server.serve_forever())
            self._loop.close()

        self._thread = threading.Thread(target=run, name=f"tool-server-{self.tool}", daemon=True)
        self._thread.start()
        try:
            self.endpoint = started.result(timeout=timeout_s)
        except BaseException:
            self._thread.join(timeout=5.0)
            self._thread = None
            raise
        return self.endpoint

    def stats(self) -> dict[str, float]:
        if self._server is None:
            raise RuntimeError(f"ToolServerRole({self.tool}) is not started")
        return self._server.stats()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish in-flight requests, close the socket and the loop's thread."""
        if self._thread is None or self._server is None or self._loop is None:
            return
        if self._thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self._server.stop(timeout_s), self._loop)
            future.result(timeout=timeout_s + 5.0)
            self._thread.join(timeout=5.0)
        self._thread = None
