"""Processes that listen, and peers that talk to them, shared by the security suite (tests/security/) and the fault
suite (tests/faults/): the listener processes of tests/security/listeners.py (`Listeners`: a tool server replica
with the gateway's HTTP and MCP faces in front of it, or the learner's trajectory and weights endpoints), tool
server replica processes (`start_replica`, `python -m tool_servers serve`), and one-shot peers for ZMQ and HTTP.
Everything binds and connects on 127.0.0.1.
"""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import zmq

from protocol import (
    AdmissionReply,
    AdmissionRequest,
    LearnerOutbound,
    ToolOutbound,
    ToolReply,
    ToolRequest,
    WeightNone,
    WeightQuery,
    decode,
    encode,
)

REPO = Path(__file__).resolve().parents[1]
LISTENERS_SCRIPT = REPO / "tests" / "security" / "listeners.py"


# ------------------------------------------------------------------------------------------------ processes


class Listeners:
    """One side's listener process ("tools" or "learner"); `stop()` returns the counters it printed on SIGTERM.

    `args` are extra command-line arguments of tests/security/listeners.py (e.g. ["--tool-latency-ms", "0"]). Its
    stderr is drained on a thread (the last lines kept in `stderr_tail`), so a process that logs a lot never blocks
    on a full pipe.
    """

    def __init__(self, side: str, token: str | None, args: list[str] | None = None) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "SECURITY_TEST_TOKEN": token or ""}
        command = [sys.executable, str(LISTENERS_SCRIPT), side, *(args or [])]
        if token:
            command += ["--token-env", "SECURITY_TEST_TOKEN"]
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        self.stderr_lines = 0
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=200)
        self._drain = threading.Thread(target=self._read_stderr, name=f"{side}-listeners-stderr", daemon=True)
        self._drain.start()
        line = self.process.stdout.readline()
        if not line.startswith("{"):
            self.process.kill()
            self.process.wait()
            self._drain.join(timeout=5)
            raise RuntimeError(f"{side} listeners did not start: {line!r} {self.stderr_tail[-3000:]}")
        started = json.loads(line)
        self.pid: int = started["pid"]
        self.endpoints: dict[str, str] = started["endpoints"]
        self.metrics: dict[str, Any] | None = None

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self.stderr_lines += 1
            self._stderr_tail.append(line)

    @property
    def stderr_tail(self) -> str:
        """The last lines the process wrote to stderr."""
        return "".join(self._stderr_tail)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def counters(self) -> dict[str, Any]:
        """The process's counters now (it prints them on SIGUSR1)."""
        self.process.send_signal(signal.SIGUSR1)
        return json.loads(self.process.stdout.readline())["metrics"]

    def stop(self) -> dict[str, Any]:
        """SIGTERM; the counters it printed on the way out (it must exit 0)."""
        if self.metrics is None and self.alive:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)  # its last words (one JSON line) fit in the pipe's buffer
            out = self.process.stdout.read()
            self._drain.join(timeout=5)
            assert self.process.returncode == 0, self.stderr_tail[-3000:]
            self.metrics = json.loads(out.strip().splitlines()[-1])["metrics"]
        return self.metrics or {}

    def kill(self) -> None:
        if self.alive:
            self.process.kill()
            self.process.wait()
        self._drain.join(timeout=5)
        for stream in (self.process.stdout, self.process.stderr):
            stream.close()


def start_replica(bind: str = "tcp://127.0.0.1:*", knobs: tuple[str, ...] = ("latency_ms=4",),
                  limits: tuple[str, ...] = ("max_batch=4",)) -> tuple[subprocess.Popen, str]:
    """A simulated text_search replica process (`python -m tool_servers serve`) and its endpoint."""
    command = [sys.executable, "-m", "tool_servers", "--log-level", "WARNING", "serve", "--tool", "text_search",
               "--backend", "simulated", "--bind", bind]
    for knob in knobs:
        command += ["--knob", knob]
    for limit in limits:
        command += ["--limit", limit]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = process.stdout.readline()
    if not line.startswith("serving text_search on "):
        process.kill()
        process.wait()
        process.stdout.close()
        raise RuntimeError(f"replica did not start: {line!r}")
    return process, line.split()[-1]


def end_processes(processes: list[subprocess.Popen], timeout_s: float = 10.0) -> None:
    """SIGCONT (in case a test stopped it), then terminate every process still running; kill what ignores that."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


# ------------------------------------------------------------------------------------------------ peers


def zmq_exchange(endpoint: str, frame: bytes, timeout_ms: int = 5000) -> bytes | None:
    """Send one frame from a fresh DEALER; the reply frame, or None when none came within the timeout."""
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, timeout_ms)
    socket.connect(endpoint)
    try:
        socket.send(frame)
        return socket.recv()
    except zmq.Again:
        return None
    finally:
        socket.close()
        context.term()


def http(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """POST `body` (GET without one); (status, response body), error statuses included."""
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


MCP_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
INITIALIZE = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {  # opens an MCP session
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "security-test", "version": "0"},
}}).encode()


def tool_request(token: str | None = None, **args: Any) -> bytes:
    return encode(ToolRequest(id="r", tool="text_search", args=args or {"query": "otter"}, deadline_ms=5000,
                              token=token))


def learner_frames(token: str | None = None) -> dict[str, bytes]:
    return {"trajectories": encode(AdmissionRequest(actor_id="a", request_id=f"r-{token}", token=token)),
            "weights": encode(WeightQuery(actor_id="a", have_version=5, token=token))}


def served(side: Listeners, token: str | None = None) -> None:
    """Every listener of the side still answers a well-formed request."""
    assert side.alive
    if "tool_server" in side.endpoints:
        reply = decode(zmq_exchange(side.endpoints["tool_server"], tool_request(token)), ToolOutbound)
        assert isinstance(reply, ToolReply) and reply.ok, reply
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        status, body = http(side.endpoints["http"] + "/v1/tools/text_search", b'{"query": "otter"}',
                            {"Content-Type": "application/json", **auth})
        assert status == 200 and json.loads(body)["ok"], body
        status, _ = http(side.endpoints["mcp"], INITIALIZE, {**MCP_HEADERS, **auth})
        assert status < 400
    else:
        frames = learner_frames(token)
        admission = decode(zmq_exchange(side.endpoints["trajectories"], frames["trajectories"]), LearnerOutbound)
        assert isinstance(admission, AdmissionReply), admission
        none = decode(zmq_exchange(side.endpoints["weights"], frames["weights"]), LearnerOutbound)
        assert isinstance(none, WeightNone), none


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """after - before, per listener and counter (a counter absent before counts from 0)."""
    return {side: {k: v - before.get(side, {}).get(k, 0.0) for k, v in values.items()}
            for side, values in after.items()}
