"""A ZMQ ROUTER served by one background thread: the shape both learner endpoints (trajectories, weights) share.

The socket is bound in the constructor (so a bad endpoint fails the caller) and afterwards touched only by the
serving thread, which polls with a short timeout so `close()` takes effect within ~0.1 s.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

import zmq

from protocol import ErrorReply, encode
from protocol.sockets import bind, configure

log = logging.getLogger(__name__)

# A handler maps one request payload to the reply payloads (each sent as its own message to the same peer).
Handler = Callable[[bytes], list[bytes]]


class RouterThread:
    """Serve `handler` on a ROUTER bound to `endpoint` until `close()`."""

    def __init__(self, name: str, handler: Handler, endpoint: str = "tcp://127.0.0.1:*",
                 allow_remote: bool = False, poll_ms: int = 100) -> None:
        self.name = name
        self._handler = handler
        self._poll_ms = poll_ms
        self._context = zmq.Context()
        self._socket = configure(self._context.socket(zmq.ROUTER))
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
                try:
                    replies = self._handler(payload)
                except Exception as exc:  # a handler bug must not kill the endpoint: log it, tell the peer
                    log.exception("%s handler failed on a %d-byte frame", self.name, len(payload))
                    replies = [encode(ErrorReply(code="backend_error", message=f"{type(exc).__name__}: {exc}"))]
                for reply in replies:
                    self._socket.send_multipart([frames[0], reply], copy=len(reply) < 65536)
        finally:
            self._socket.close(linger=0)
            self._context.term()

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving and close the socket (idempotent)."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
