"""Socket helpers shared by every listener: loopback-first binding (a token required beyond it), the shared-token
check, frame limits, and no lingering on close."""
from __future__ import annotations

import hmac
import ipaddress
import os
import socket
from urllib.parse import urlparse

import zmq

from protocol.codec import DEFAULT_MAX_FRAME_BYTES


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for tcp://127.x.x.x:PORT, tcp://[::1]:PORT, tcp://localhost:PORT, ipc:// and inproc:// endpoints."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = urlparse(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_token_beyond_loopback(endpoint: str, token: str | None, what: str) -> None:
    """Refuse (ValueError) to listen on `endpoint` beyond loopback without a shared token (every listener's rule)."""
    if not is_loopback_endpoint(endpoint) and not token:
        raise ValueError(f"refusing to start {what} on {endpoint!r}: binding beyond loopback requires a token "
                         f"(a shared secret every client sends)")


def token_matches(given: str | None, expected: str | None) -> bool:
    """True when no token is expected, or `given` equals it (compared in constant time)."""
    if expected is None:
        return True
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def token_from_env(variable: str | None, knob: str) -> str | None:
    """The shared token held by the environment variable `variable` (named by config knob `knob`, e.g.
    learner.token_env), or None when no variable is named. A named variable that is unset or empty is a ValueError
    naming both: a run that asked for a token must never start without one. Tokens live only in the environment,
    never in config or run files."""
    if not variable:
        return None
    token = os.environ.get(variable)
    if not token:
        raise ValueError(f"{knob}={variable!r} but that environment variable is empty or unset (it must hold the "
                         f"shared token)")
    return token


def configure(socket: zmq.Socket, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> zmq.Socket:
    """Apply the limits every forage socket uses: bounded frames (ZMQ drops bigger ones), no linger on close."""
    socket.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
    socket.setsockopt(zmq.LINGER, 0)
    return socket


def bind(socket: zmq.Socket, endpoint: str = "tcp://127.0.0.1:*", allow_remote: bool = False) -> str:
    """Bind and return the concrete endpoint (with the chosen port). Non-loopback needs allow_remote=True."""
    if not allow_remote and not is_loopback_endpoint(endpoint):
        raise ValueError(f"refusing to bind {endpoint!r} beyond loopback without allow_remote=True")
    socket.bind(endpoint)
    return socket.getsockopt_string(zmq.LAST_ENDPOINT)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at `host` right now (for rendezvous that need a number up front, and for tests
    that need a port no server answers on). Another process may take it before it is used: bind `:*` when you can."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
