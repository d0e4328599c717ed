"""A ZMQ ROUTER served by one background thread: the shape both learner endpoints (trajectories, weights) share.

The socket is bound in the constructor (so a bad endpoint fails the caller) and afterwards touched only by the
serving thread, which polls with a short timeout so `close()` takes effect within ~0.1 s. Loopback by default;
beyond loopback a shared token is required, and every message must then carry it in its `token` field (checked
before the handler sees the frame; a missing or wrong one gets ErrorReply(unauthorized), counted as
`<name>_unauthorized`). A handler that raises is answered ErrorReply(backend_error), counted as
`<name>_handler_errors`. Frames over `max_frame_bytes` are never read (ZMQ drops that connection).
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

import msgspec
import zmq

from protocol import ErrorReply, encode
from protocol.codec import DEFAULT_MAX_FRAME_BYTES
from protocol.metrics import Metrics
from protocol.sockets import bind, configure, require_token_beyond_loopback, token_matches

log = logging.getLogger(__name__)

# A handler maps one request payload to the reply payloads (each sent as its own message to the same peer).
Handler = Callable[[bytes], list[bytes]]


class _Token(msgspec.Struct):
    """The `token` field of any learner-bound message, read without decoding the rest."""

    token: Optional[str] = None


_token_decoder = msgspec.msgpack.Decoder(_Token)


def frame_token(payload: bytes) -> Optional[str]:
    """The token a frame carries (None when it has none or is not a message at all)."""
    try:
        return _token_decoder.decode(payload).token
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        return None


def worth_logging(count: float) -> bool:
    """True for the 1st, 2nd, 4th, 8th, ... occurrence of an event: a flood of bad frames must not flood the log."""
    n = int(count)
    return n > 0 and n & (n - 1) == 0


class RouterThread:
    """Serve `handler` on a ROUTER bound to `endpoint` until `close()`. Beyond loopback, `allow_remote` must be set
    and a `token` given; rejections are counted on `metrics`."""

    def __init__(self, name: str, handler: Handler, endpoint: str = "tcp://127.0.0.1:*",
                 allow_remote: bool = False, poll_ms: int = 100, *, token: Optional[str] = None,
                 metrics: Optional[Metrics] = None, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        require_token_beyond_loopback(endpoint, token, f"the learner's {name} endpoint")
        self.name = name
        self._handler = handler
        self._poll_ms = poll_ms
        self._token = token or None
        self.metrics = metrics or Metrics()
        self.metrics.inc(f"{name}_unauthorized", 0.0)
        self.metrics.inc(f"{name}_handler_errors", 0.0)
        self._context = zmq.Context()
        self._socket = configure(self._context.socket(zmq.ROUTER), max_frame_bytes)
        try:
            self.endpoint = bind(self._socket, endpoint, allow_remote=allow_remote)
        except Exception:
            self._socket.close()
            self._context.term()
            raise
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"learner-{name}", daemon=True)
        self._thread.start()
        log.info("%s endpoint serving on %s", name, self.endpoint)

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(self._poll_ms):
                    continue
                frames = self._socket.recv_multipart()
                # DEALER peers send exactly one payload frame; anything else still gets an answer (the handler
                # sees an empty payload and replies with its decode error) so a confused peer is not left hanging.
                payload = frames[1] if len(frames) == 2 else b""
                if not token_matches(frame_token(payload), self._token):
                    self._unauthorized(frames[0], len(payload))
                    continue
                try:
                    replies = self._handler(payload)
                except Exception as exc:  # a handler bug must not kill the endpoint: count and log it, tell the peer
                    self.metrics.inc(f"{self.name}_handler_errors")
                    log.exception("%s handler failed on a %d-byte frame", self.name, len(payload))
                    replies = [encode(ErrorReply(code="backend_error", message=f"{type(exc).__name__}: {exc}"))]
                for reply in replies:
                    self._socket.send_multipart([frames[0], reply], copy=len(reply) < 65536)
        finally:
            self._socket.close(linger=0)
            self._context.term()

    def _unauthorized(self, peer: bytes, size: int) -> None:
        self.metrics.inc(f"{self.name}_unauthorized")
        count = int(self.metrics.counter(f"{self.name}_unauthorized"))
        if worth_logging(count):
            log.warning("%s endpoint: rejected a %d-byte frame with a missing or wrong token (%d so far)", self.name,
                        size, count)
        self._socket.send_multipart([peer, encode(ErrorReply(code="unauthorized", message="missing or wrong token"))])

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving and close the socket (idempotent)."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
