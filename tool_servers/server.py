"""The tool server: one asyncio ZMQ ROUTER answering ToolRequests with micro-batched backend searches.

Every request is answered exactly once and never after its deadline: a timer sends `timeout` just before the
deadline, and a result that comes later is dropped (and counted). A result cache answers repeated queries
from memory on the event loop, or from disk in the worker thread before the backend is asked. A snapshot
(tool_servers/snapshot.py) records every ok reply, or answers in the backend's place when replaying.
`ToolServerRole` runs a server on its own thread and event loop so that plain Python (or a Ray actor in
launch.py) can start, query and stop it.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import json
import logging
import os
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
from protocol.sockets import configure, require_token_beyond_loopback, token_matches
from tool_servers.backends import DEPLOYMENT_KEYS, Backend, BatchResult, build_backend
from tool_servers.cache import CacheConfig, ResultCache, request_text
from tool_servers.errors import ToolCallError
from tool_servers.latency import LatencyModel, latency_model
from tool_servers.limits import ServerLimits, check_args
from tool_servers.snapshot import SnapshotConfig, SnapshotReader, SnapshotRecorder

log = logging.getLogger(__name__)


class _PeekId(msgspec.Struct):
    """Just enough of a frame to address an error reply to the request that caused it."""

    id: str = ""


_peek_decoder = msgspec.msgpack.Decoder(_PeekId)


def _split_route(frames: list[bytes]) -> tuple[tuple[bytes, ...], list[bytes]]:
    """(the route to reply on, the payload frames) of a message a ROUTER received: the peer's identity, plus the
    empty delimiter of a REQ peer (identity, b"", payload)."""
    if len(frames) == 3 and frames[1] == b"":
        return (frames[0], b""), frames[2:]
    return (frames[0],), frames[1:]


def _peek_id(frame: bytes) -> str:
    try:
        return _peek_decoder.decode(frame).id
    except Exception:  # garbage, a non-map, a non-string id: nothing to address the reply to
        return ""


@dataclass(eq=False)
class _Pending:
    """A request between receipt and its one reply."""

    route: tuple[bytes, ...]  # the ROUTER identity, plus an empty delimiter frame for REQ peers
    request: ToolRequest
    received: float  # loop.time() at receipt
    timer: Optional[asyncio.TimerHandle] = None
    answered: bool = False
    cache_key: Optional[str] = None
    request_text: Optional[str] = None  # the normalised request, when a snapshot records or replays
    release_at: Optional[float] = None  # loop.time() before which no reply leaves (the latency model's draw)


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
    per-tool executor threads. `cache` (optional) is shared by all tools; its keys include the tool name.
    `snapshot` (optional): `record` stores every ok reply in a snapshot; `replay` answers from one before (and,
    with replay_miss="error", instead of) the backend, and cannot be combined with a cache. `latency` (optional,
    {tool: LatencyModel}) holds each reply of that tool back until its drawn delay has passed since receipt
    (tool_servers/latency.py).
    """

    def __init__(self, backends: Mapping[str, Backend], *, bind: str = "tcp://127.0.0.1:*",
                 token: str | None = None, limits: ServerLimits | None = None,
                 metrics: Metrics | None = None, cache: ResultCache | None = None,
                 snapshot: SnapshotConfig | None = None,
                 latency: Mapping[str, LatencyModel] | None = None) -> None:
        if not backends:
            raise ValueError("ToolServer needs at least one backend")
        require_token_beyond_loopback(bind, token, "a tool server")
        snapshot = snapshot or SnapshotConfig()
        if snapshot.replay and cache is not None:
            raise ValueError("a replaying tool server answers from its snapshot alone: build it without a cache")
        self.backends = dict(backends)
        self.bind = bind
        self.limits = limits or ServerLimits()
        self.metrics = metrics or Metrics()
        self.cache = cache
        self.snapshot = snapshot
        self.latency = dict(latency or {})
        unknown = sorted(set(self.latency) - set(self.backends))
        if unknown:
            raise ValueError(f"latency models for tools {unknown} this server does not serve ({sorted(self.backends)})")
        self._replay: SnapshotReader | None = None
        self._recorder: SnapshotRecorder | None = None
        self._sources = {tool: type(backend).__name__ for tool, backend in self.backends.items()}
        self.endpoint: str | None = None
        self._token = token or None
        self._socket: zmq.asyncio.Socket | None = None
        self._lanes: dict[str, _ToolLane] = {}
        self._pending: set[_Pending] = set()
        self._receiver: asyncio.Task | None = None
        self._stopping = False
        self._closed: asyncio.Event | None = None
        for code in ERROR_CODES:  # every code appears in stats, even at zero
            self.metrics.inc(f"error_{code}", 0.0)
        for name in ("requests", "replies_ok", "stats_replies", "expired_in_queue", "late_results_dropped",
                     "undecodable_frames", "frame_handler_errors", "send_failures", "cache_hits", "cache_hits_disk",
                     "cache_misses"):
            self.metrics.inc(name, 0.0)
        if snapshot.enabled:
            for name in ("snapshot_hits", "snapshot_misses", "snapshot_records", "snapshot_record_dropped"):
                self.metrics.inc(name, 0.0)
        if self.latency:
            for name in ("latency_injected_s", "latency_injected_count", "latency_past_deadline"):
                self.metrics.inc(name, 0.0)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> str:
        """Bind, start the receive loop and the workers; return the concrete endpoint."""
        if self._socket is not None:
            raise RuntimeError(f"ToolServer already started on {self.endpoint}")
        self._open_snapshots()  # bad snapshot paths fail the start, before anything listens
        self._closed = asyncio.Event()
        socket = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        configure(socket, self.limits.socket_max_frame_bytes)
        try:
            self.endpoint = bind_socket(socket, self.bind, allow_remote=self._token is not None)
        except Exception:
            socket.close(linger=0)
            self._close_snapshots()
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
        if self.cache is not None:
            self.cache.close()
        self._close_snapshots()
        self._socket.close(linger=0)
        log.info("tool server on %s stopped", self.endpoint)
        self._closed.set()

    def _open_snapshots(self) -> None:
        try:
            if self.snapshot.replay:
                self._replay = SnapshotReader(self.snapshot.replay)
                log.info("replaying tool replies from %s (a miss: %s)", self._replay.file, self.snapshot.replay_miss)
            if self.snapshot.record:
                self._recorder = SnapshotRecorder(self.snapshot.record, self.metrics)
                log.info("recording tool replies into %s", self._recorder.file)
        except BaseException:
            self._close_snapshots()
            raise

    def _close_snapshots(self) -> None:
        if self._recorder is not None:
            self._recorder.close(timeout_s=10.0)
            self._recorder = None
        if self._replay is not None:
            self._replay.close()
            self._replay = None

    def flush_snapshot(self, timeout_s: float = 30.0) -> bool:
        """Wait until every reply recorded so far is in the snapshot file (True when there is nothing to record)."""
        return self._recorder is None or self._recorder.flush(timeout_s)

    def stats(self) -> dict[str, float]:
        """Counters (requests, replies_ok, error_<code>, drops, cache_*, snapshot_*), latency_ms summary, queue
        depth."""
        self.metrics.set("pending", len(self._pending))
        self.metrics.set("queued", sum(lane.queue.qsize() for lane in self._lanes.values()))
        if self.cache is not None:
            hits, misses = self.metrics.counter("cache_hits"), self.metrics.counter("cache_misses")
            entries, size = self.cache.sizes()
            self.metrics.set("cache_hit_rate", hits / (hits + misses) if hits + misses else 0.0)
            self.metrics.set("cache_entries", entries)
            self.metrics.set("cache_bytes", size)
        snapshot = self.metrics.snapshot()
        for tool, lane in self._lanes.items():  # optional per-backend counters (web: requests, retries, 5xx...)
            backend_stats = getattr(lane.backend, "stats", None)
            if callable(backend_stats):
                snapshot.update({f"{tool}_{name}": value for name, value in backend_stats().items()})
        return snapshot

    # ------------------------------------------------------------------ receiving

    async def _receive(self) -> None:
        assert self._socket is not None
        while True:
            frames = await self._socket.recv_multipart()
            route, payloads = _split_route(frames)
            try:
                self._on_frames(route, payloads)
            except Exception as exc:  # a bug handling one frame must neither stop the server nor leave its peer waiting
                self.metrics.inc("frame_handler_errors")
                log.exception("tool server failed to handle a frame")
                request_id = _peek_id(payloads[0]) if len(payloads) == 1 else ""
                self._frame_error(route, "backend_error", f"{type(exc).__name__}: {exc}", request_id)

    def _on_frames(self, route: tuple[bytes, ...], payloads: list[bytes]) -> None:
        if len(payloads) != 1:
            self._frame_error(route, "bad_request", f"expected 1 payload frame, got {len(payloads)}", "")
            return
        payload = payloads[0]
        if len(payload) > self.limits.max_frame_bytes:
            self._frame_error(route, "too_large",
                              f"frame of {len(payload)} bytes exceeds the limit of {self.limits.max_frame_bytes}",
                              _peek_id(payload))
            return
        try:
            message = decode(payload, ToolInbound, max_frame_bytes=self.limits.max_frame_bytes)
        except (ProtocolError, ValueError) as exc:  # msgspec raises UnicodeDecodeError for invalid UTF-8
            self.metrics.inc("undecodable_frames")
            self._frame_error(route, "bad_request", str(exc), _peek_id(payload))
            return
        if not self._authorised(message.token):
            self._frame_error(route, "unauthorized", "missing or wrong token", message.id)
            return
        if isinstance(message, StatsRequest):
            stats = self.stats()
            self.metrics.inc("stats_replies")
            self._send(route, StatsReply(id=message.id, stats=stats))
            return
        self._admit(route, message)

    def _authorised(self, token: str | None) -> bool:
        return token_matches(token, self._token)

    def _admit(self, route: tuple[bytes, ...], request: ToolRequest) -> None:
        """Check a decoded request and answer it from the memory cache, or queue it, or answer its error."""
        loop = asyncio.get_running_loop()
        pending = _Pending(route=route, request=request, received=loop.time())
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
            if self.snapshot.enabled:
                pending.request_text = request_text(request.args)
            model = self.latency.get(request.tool)
            if model is not None:
                pending.release_at = pending.received + model.draw()
                if pending.release_at >= self._expiry(pending):  # its reply will be the deadline's `timeout`
                    self.metrics.inc("latency_past_deadline")
            if self.cache is not None:
                pending.cache_key = self.cache.key(request.tool, request.args)
                items = self.cache.get_memory(pending.cache_key)
                if items is not None:
                    self.metrics.inc("cache_hits")
                    self._reply(pending, items=items, source="cache")
                    return
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
        pending.timer = loop.call_at(self._expiry(pending), self._expire, pending)

    def _expiry(self, pending: _Pending) -> float:
        """When `timeout` is sent: a margin before the deadline, so that it reaches the client in time."""
        margin_s = min(self.limits.reply_margin_ms, pending.request.deadline_ms / 2) / 1000.0
        return pending.received + pending.request.deadline_ms / 1000.0 - margin_s

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
        sources = ["live"] * len(batch)
        try:
            results, sources = await loop.run_in_executor(
                lane.executor, self._run_batch, tool, lane.backend,
                [dict(p.request.args) for p in batch], [p.cache_key for p in batch], [p.request_text for p in batch],
            )
        except Exception as exc:
            log.warning("%s search_batch of %d failed: %s: %s", tool, len(batch), type(exc).__name__, exc)
            batch_error = exc
            results = [exc] * len(batch)
        self.metrics.observe("batch_size", len(batch))
        self.metrics.observe(f"backend_ms_{tool}", (loop.time() - started) * 1000.0)
        for pending, result, source in zip(batch, results, sources):
            if pending.answered:
                self.metrics.inc("late_results_dropped")
                if not isinstance(result, BaseException):  # paid for all the same: a replay will have it
                    self._record(pending, result, source)
            elif isinstance(result, BaseException):
                error = result if isinstance(result, ToolCallError) else ToolCallError(
                    "backend_error", f"{type(result).__name__}: {result}")
                if error.code == "backend_error" and result is not batch_error:  # batch failures logged above
                    log.warning("%s request %s failed: %s", tool, pending.request.id, error.message)
                self._reply(pending, error=error)
            else:
                self._reply(pending, items=result, source=source)

    def _run_batch(self, tool: str, backend: Backend, batch: list[dict[str, Any]], keys: list[str | None],
                   requests: list[str | None]) -> tuple[list[BatchResult], list[str]]:
        """In the executor: snapshot lookups (replay), disk-cache lookups, one search_batch for the rest (duplicates
        searched once), stores. Returns each result and where it came from: "snapshot", "cache" or "live".

        Raises when search_batch raises or breaks its contract (that fails the whole batch).
        """
        results: list[BatchResult | None] = [None] * len(batch)
        sources = ["live"] * len(batch)
        todo: dict[str, list[int]] = {}  # one search per distinct request; unkeyed requests get their own slot
        for i, key in enumerate(keys):
            if self._replay is not None and requests[i] is not None:
                hit = self._replay.get(tool, requests[i])
                if hit is not None:
                    self.metrics.inc("snapshot_hits")
                    results[i], sources[i] = hit, "snapshot"
                    continue
                self.metrics.inc("snapshot_misses")
                if self.snapshot.replay_miss == "error":
                    sources[i] = "snapshot"  # the snapshot answered (with its miss), not the backend
                    results[i] = ToolCallError("backend_error", f"snapshot miss: {tool} {requests[i]:.300} is not "
                                                                f"in the replayed snapshot {self._replay.file}")
                    continue
            if key is not None and self.cache is not None:
                # memory again: an identical request queued earlier may have filled it since admission
                hit = self.cache.get_memory(key)
                if hit is None and self.cache.has_disk:
                    hit = self.cache.get_disk(key)
                    if hit is not None:
                        self.metrics.inc("cache_hits_disk")
                if hit is not None:
                    self.metrics.inc("cache_hits")
                    results[i], sources[i] = hit, "cache"
                    continue
            todo.setdefault(key or requests[i] or f"#{i}", []).append(i)
        if todo:
            if self.cache is not None:
                self.metrics.inc("cache_misses", sum(len(slots) for slots in todo.values()))
            firsts = [slots[0] for slots in todo.values()]
            found = backend.search_batch([batch[i] for i in firsts])
            if not isinstance(found, list) or len(found) != len(firsts):
                raise TypeError(f"search_batch returned {type(found).__name__} of length "
                                f"{len(found) if isinstance(found, list) else '?'} for {len(firsts)} requests")
            for (key, slots), result in zip(todo.items(), found):
                if not isinstance(result, BaseException):
                    if not isinstance(result, list) or not all(isinstance(item, ToolItem) for item in result):
                        result = TypeError(f"{tool} returned {type(result).__name__} "
                                           f"{[type(i).__name__ for i in result] if isinstance(result, list) else ''}"
                                           f" instead of a list of ToolItems")
                    elif self.cache is not None and keys[slots[0]] is not None:
                        self.cache.put(key, result)
                for i in slots:
                    results[i] = result
        return results, sources

    # ------------------------------------------------------------------ replying

    def _reply(self, pending: _Pending, *, items: list[ToolItem] | None = None,
               error: ToolCallError | None = None, source: str = "live") -> None:
        """Answer now, or at the request's `release_at` when the latency model holds it back: a timer per reply, so
        held replies wait side by side. One that would land after the deadline is left to the deadline's
        `timeout` (its draw was counted in latency_past_deadline; its result, as any late one, in
        late_results_dropped)."""
        model = self.latency.get(pending.request.tool)
        release = pending.release_at
        if pending.answered or model is None or release is None or (source != "live" and not model.cached):
            self._answer(pending, items=items, error=error, source=source)
            return
        loop = asyncio.get_running_loop()
        wait_s = release - loop.time()
        if wait_s <= 0:  # the backend took longer than the drawn delay
            self._answer(pending, items=items, error=error, source=source)
            return
        expiry = self._expiry(pending)
        if release >= expiry:
            self.metrics.inc("late_results_dropped")
            if error is None:
                self._record(pending, items or [], source)  # paid for all the same, as any late result
            if pending.timer is None:  # answered from the memory cache at admission: no deadline timer yet
                pending.timer = loop.call_at(expiry, self._expire, pending)
            return
        self.metrics.inc("latency_injected_s", wait_s)
        self.metrics.inc("latency_injected_count")
        loop.call_at(release, functools.partial(self._answer, pending, items=items, error=error, source=source))

    def _answer(self, pending: _Pending, *, items: list[ToolItem] | None = None,
                error: ToolCallError | None = None, source: str = "live") -> None:
        """Send the one reply of a request (no-op when it was already answered); `source` is where ok items came
        from ("live", "cache" or "snapshot"): replies from a cache or a snapshot say `cached`."""
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
            reply = ToolReply(id=request.id, ok=True, items=items or [], cached=source != "live",
                              server_ms=server_ms)
            self._record(pending, reply.items, source)
        else:
            self.metrics.inc(f"error_{error.code}")
            if error.code not in ("timeout", "overloaded", "backend_error"):
                log.info("%s request %s rejected: %s", request.tool, request.id, error)
            reply = ToolReply(id=request.id, ok=False, error=ToolError(code=error.code, message=error.message),
                              server_ms=server_ms)
        self._send(pending.route, reply)

    def _record(self, pending: _Pending, items: list[ToolItem], source: str) -> None:
        """Hand an ok reply to the recorder (unless it came from the very snapshot being recorded)."""
        if self._recorder is None or pending.request_text is None:
            return
        if source == "snapshot" and self._replay is not None and self._replay.file == self._recorder.file:
            return
        label = "snapshot" if source == "snapshot" else self._sources[pending.request.tool]
        self._recorder.add(pending.request.tool, pending.request_text, items, label)

    def _frame_error(self, route: tuple[bytes, ...], code: str, message: str, request_id: str) -> None:
        self.metrics.inc(f"error_{code}")
        log.info("rejected frame (id %r) with %s: %s", request_id, code, message)
        self._send(route, ErrorReply(code=code, message=message, id=request_id))

    def _send(self, route: tuple[bytes, ...], message: Message) -> None:
        assert self._socket is not None
        try:
            # ROUTER never blocks: it drops replies to peers that are gone or over their high-water mark.
            self._socket.send_multipart([*route, encode(message)], flags=zmq.NOBLOCK)
        except (zmq.ZMQError, ValueError, OverflowError, TypeError) as exc:  # or the reply would not encode
            self.metrics.inc("send_failures")
            log.warning("reply to %r failed: %s", route[0], exc)


def cache_namespace(tool: str, backend_cfg: Mapping[str, Any]) -> str:
    """A cache namespace that changes whenever the backend would answer differently: its knobs and its corpus.

    The corpus file's size and modification time stand in for its content, so a rebuilt corpus starts a fresh
    namespace in a shared on-disk store.
    """
    knobs = {k: v for k, v in backend_cfg.items() if k not in DEPLOYMENT_KEYS or k == "backend"}
    corpus = knobs.get("corpus")
    if corpus is not None and os.path.exists(str(corpus)):
        stat = os.stat(str(corpus))
        knobs["corpus_stat"] = [stat.st_size, stat.st_mtime_ns]
    text = json.dumps({"tool": tool, **knobs}, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def build_cache(tool: str, backend_cfg: Mapping[str, Any]) -> ResultCache | None:
    """The ResultCache described by the section's `cache:` mapping (None when absent or disabled)."""
    config = CacheConfig.from_mapping(backend_cfg.get("cache"))
    if backend_cfg.get("cache") is None or not config.enabled:
        return None
    return ResultCache(config, namespace=cache_namespace(tool, backend_cfg))


def advertised(endpoint: str, host: str | None) -> str:
    """`endpoint` with a wildcard bind address (0.0.0.0, ::, *) replaced by `host`, for clients elsewhere."""
    if host is None:
        return endpoint
    for wildcard in ("0.0.0.0", "[::]", "*"):
        if f"://{wildcard}:" in endpoint:
            return endpoint.replace(f"://{wildcard}:", f"://{host}:", 1)
    return endpoint


class ToolServerRole:
    """A ToolServer for one tool on a background thread with its own event loop (plain Python, no Ray).

    `backend_cfg` is the tool's conf section (see build_backend; its optional `cache:` mapping builds the
    server's ResultCache); `limits` the conf `limits:` mapping. `advertise_host` replaces a wildcard bind
    address in the returned endpoint (replicas on other hosts bind 0.0.0.0 and need a token). `snapshot`: the
    conf's `record` / `replay` / `replay_miss` (a replaying server has no result cache: the snapshot is the store).
    The section's optional `latency:` mapping turns on the latency model; `replica` (this replica's index) is mixed
    into its seed so that replicas draw different delays.
    """

    def __init__(self, tool: str, backend_cfg: Mapping[str, Any], bind: str = "tcp://127.0.0.1:*", *,
                 limits: ServerLimits | Mapping[str, Any] | None = None, token: str | None = None,
                 advertise_host: str | None = None, snapshot: SnapshotConfig | Mapping[str, Any] | None = None,
                 replica: int = 0) -> None:
        self.tool = tool
        self.backend_cfg = dict(backend_cfg)
        self.bind = bind
        self.limits = limits if isinstance(limits, ServerLimits) else ServerLimits.from_mapping(limits)
        self.token = token
        self.advertise_host = advertise_host
        self.snapshot = snapshot if isinstance(snapshot, SnapshotConfig) else SnapshotConfig.from_mapping(snapshot)
        CacheConfig.from_mapping(self.backend_cfg.get("cache"))  # typos in the cache section fail here, early
        self.latency = latency_model(tool, self.backend_cfg, replica)  # and in the latency section
        self.endpoint: str | None = None
        self._server: ToolServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 120.0) -> str:
        """Build the backend (loads the corpus), start serving, return the endpoint."""
        if self._thread is not None:
            raise RuntimeError(f"ToolServerRole({self.tool}) already started on {self.endpoint}")
        backend = build_backend(self.tool, self.backend_cfg)
        cache = None if self.snapshot.replay else build_cache(self.tool, self.backend_cfg)  # the snapshot is the store
        self._server = ToolServer({self.tool: backend}, bind=self.bind, token=self.token, limits=self.limits,
                                  cache=cache, snapshot=self.snapshot,
                                  latency={self.tool: self.latency} if self.latency else None)
        self._loop = asyncio.new_event_loop()
        started: concurrent.futures.Future[str] = concurrent.futures.Future()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                started.set_result(self._loop.run_until_complete(self._server.start()))
            except BaseException as exc:
                self._loop.close()
                backend.close()  # a web backend holds a session thread; a failed start must not leak it
                if cache is not None:
                    cache.close()
                started.set_exception(exc)
                return
            self._loop.run_until_complete(self._server.serve_forever())
            self._loop.close()

        self._thread = threading.Thread(target=run, name=f"tool-server-{self.tool}", daemon=True)
        self._thread.start()
        try:
            self.endpoint = advertised(started.result(timeout=timeout_s), self.advertise_host)
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
