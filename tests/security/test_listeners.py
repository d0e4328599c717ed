"""Security of every socket forage listens on — the tool server's ROUTER, the gateway's HTTP and MCP faces, the
learner's trajectory and weights ROUTERs — each in its own process (tests/security/listeners.py), as the issue asks:

- every listener binds 127.0.0.1 by default (checked on the process's real listening sockets);
- binding beyond loopback without a token refuses to start (before anything is bound);
- a missing or wrong token is rejected and counted; the right one is served;
- no pickle is ever unpickled: a payload whose unpickling would create a marker file is sent to every listener
  (as a raw frame or body, and inside a valid message); the file never appears and each process keeps serving;
- every listener has a size limit: over it a frame is answered too_large / 413, or never read, and the process
  keeps serving.
"""
from __future__ import annotations

import asyncio
import json
import os
import pickle
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import psutil
import pytest
import zmq

from protocol import (
    AdmissionReply,
    AdmissionRequest,
    ErrorReply,
    GroupAck,
    LearnerOutbound,
    ToolOutbound,
    ToolReply,
    ToolRequest,
    Trajectory,
    TrajectoryGroup,
    WeightNone,
    WeightQuery,
    decode,
    encode,
    to_ndarray,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TOKEN = "s3cret-token-for-tests"


# ------------------------------------------------------------------------------------------------ processes


class Listeners:
    """One side's listener process; `stop()` returns the counters it printed on SIGTERM."""

    def __init__(self, side: str, token: str | None) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "SECURITY_TEST_TOKEN": token or ""}
        command = [sys.executable, str(HERE / "listeners.py"), side]
        if token:
            command += ["--token-env", "SECURITY_TEST_TOKEN"]
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        line = self.process.stdout.readline()
        if not line.startswith("{"):
            self.process.kill()
            raise RuntimeError(f"{side} listeners did not start: {line!r} {self.process.stderr.read()[-3000:]}")
        started = json.loads(line)
        self.pid: int = started["pid"]
        self.endpoints: dict[str, str] = started["endpoints"]
        self.metrics: dict[str, Any] | None = None

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def counters(self) -> dict[str, Any]:
        """The process's counters now (it prints them on SIGUSR1)."""
        self.process.send_signal(signal.SIGUSR1)
        return json.loads(self.process.stdout.readline())["metrics"]

    def stop(self) -> dict[str, Any]:
        if self.metrics is None and self.alive:
            self.process.send_signal(signal.SIGTERM)
            out, err = self.process.communicate(timeout=30)
            assert self.process.returncode == 0, err[-3000:]
            self.metrics = json.loads(out.strip().splitlines()[-1])["metrics"]
        return self.metrics or {}

    def kill(self) -> None:
        if self.alive:
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            stream.close()


@pytest.fixture(scope="module", params=["tools", "learner"])
def open_side(request) -> Iterator[Listeners]:
    """A side's listeners without a token (the default deployment)."""
    listeners = Listeners(request.param, None)
    yield listeners
    listeners.kill()


@pytest.fixture(scope="module", params=["tools", "learner"])
def guarded_side(request) -> Iterator[Listeners]:
    """A side's listeners with a token (still on 127.0.0.1: tests never listen beyond loopback)."""
    listeners = Listeners(request.param, TOKEN)
    yield listeners
    listeners.kill()


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


# ------------------------------------------------------------------------------------------------ loopback


def test_every_listener_binds_loopback_by_default(open_side):
    for name, endpoint in open_side.endpoints.items():
        assert "://127.0.0.1:" in endpoint, (name, endpoint)
    listening = [c.laddr for c in psutil.Process(open_side.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert len(listening) == len(open_side.endpoints), listening  # nothing listens that we did not name
    assert all(address.ip == "127.0.0.1" for address in listening), listening


def test_binding_beyond_loopback_without_a_token_refuses_to_start():
    from learner.admission import AdmissionController
    from learner.service import TrajectoryService
    from learner.weights import ZmqWeightPublisher
    from tool_servers.backends.simulated import SimulatedSearch
    from tool_servers.gateway import ToolGateway, start_gateway
    from tool_servers.server import ToolServer, ToolServerRole

    wide = "tcp://0.0.0.0:*"
    refusals = [
        lambda: ToolServer({"text_search": SimulatedSearch("text_search")}, bind=wide),
        lambda: ToolServerRole("text_search", {"backend": "simulated"}, wide).start(),
        lambda: TrajectoryService(AdmissionController(1, 0), endpoint=wide, allow_remote=True),
        lambda: ZmqWeightPublisher(wide, allow_remote=True),
        lambda: asyncio.run(start_gateway(ToolGateway({}), http=("0.0.0.0", 0))),
        lambda: asyncio.run(start_gateway(ToolGateway({}), http=None, mcp_http=("0.0.0.0", 0))),
        lambda: asyncio.run(start_gateway(ToolGateway({}), http=("", 0))),  # "" is every interface to aiohttp
    ]
    for refuse in refusals:
        with pytest.raises(ValueError, match="beyond loopback requires a token"):
            refuse()
    out = subprocess.run([sys.executable, "-m", "tool_servers", "serve", "--tool", "text_search", "--backend",
                          "simulated", "--bind", "tcp://0.0.0.0:*"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert out.returncode != 0 and "requires a token" in out.stderr


# ------------------------------------------------------------------------------------------------ tokens


def test_a_missing_or_wrong_token_is_rejected_and_counted(guarded_side):
    if "tool_server" in guarded_side.endpoints:
        for token in (None, "wrong"):
            reply = decode(zmq_exchange(guarded_side.endpoints["tool_server"], tool_request(token)), ToolOutbound)
            assert isinstance(reply, ErrorReply) and reply.code == "unauthorized", reply
            for url, body, headers in ((guarded_side.endpoints["http"] + "/v1/tools/text_search", b"{}",
                                        {"Content-Type": "application/json"}),
                                       (guarded_side.endpoints["mcp"], INITIALIZE, MCP_HEADERS)):
                if token:
                    headers = {**headers, "Authorization": f"Bearer {token}"}
                assert http(url, body, headers)[0] == 401
            status, body = http(guarded_side.endpoints["http"] + "/healthz", headers={"Authorization": str(token)})
            assert status == 200 and json.loads(body) == {"ok": True}  # a probe learns no replica address
    else:
        for token in (None, "wrong"):
            for name, frame in learner_frames(token).items():
                reply = decode(zmq_exchange(guarded_side.endpoints[name], frame), LearnerOutbound)
                assert isinstance(reply, ErrorReply) and reply.code == "unauthorized", (name, reply)
    served(guarded_side, TOKEN)
    metrics = guarded_side.counters()
    if "tool_server" in metrics:
        assert metrics["tool_server"]["error_unauthorized"] == 2 and metrics["tool_server"]["replies_ok"] >= 2
        assert metrics["gateway"]["http_unauthorized"] == 2 and metrics["gateway"]["mcp_unauthorized"] == 2
    else:
        assert metrics["learner"]["trajectories_unauthorized"] == 2
        assert metrics["learner"]["weights_unauthorized"] == 2
        assert metrics["learner"]["admissions_granted"] == 1  # only the request with the token got through


# ------------------------------------------------------------------------------------------------ no pickle


class _Marker:
    """Unpickling this creates the file at `path` (what an attacker's payload would do, harmlessly)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_no_listener_ever_unpickles_a_payload(open_side, tmp_path):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Marker(control)))  # the payload is live: unpickling it does create its file
    assert control.exists()
    marker = tmp_path / "unpickled"
    payloads = [pickle.dumps(_Marker(marker), protocol=p) for p in (0, 2, pickle.HIGHEST_PROTOCOL)]

    before = open_side.counters()
    if "tool_server" in open_side.endpoints:
        for payload in payloads:
            reply = decode(zmq_exchange(open_side.endpoints["tool_server"], payload), ToolOutbound)
            assert isinstance(reply, ErrorReply) and reply.code == "bad_request"
            # inside a valid request, where bytes belong: just bytes (not an image), never loaded
            reply = decode(zmq_exchange(open_side.endpoints["tool_server"], tool_request(image=payload)),
                           ToolOutbound)
            assert isinstance(reply, ToolReply) and reply.error.code == "bad_request", reply
            for content_type in ("application/octet-stream", "application/python-pickle", "application/json"):
                status, _ = http(open_side.endpoints["http"] + "/v1/tools/text_search", payload,
                                 {"Content-Type": content_type})
                assert status == 400
                status, _ = http(open_side.endpoints["mcp"], payload, {**MCP_HEADERS, "Content-Type": content_type})
                assert 400 <= status < 500
    else:
        for payload in payloads:
            for name in ("trajectories", "weights"):
                reply = decode(zmq_exchange(open_side.endpoints[name], payload), LearnerOutbound)
                assert isinstance(reply, ErrorReply) and reply.code == "bad_request", (name, reply)
        # inside a valid group, where bytes belong (a trajectory's images): accepted as opaque bytes, never loaded
        group = TrajectoryGroup(group_id="g-pickle", actor_id="a", prompt_id="p", trajectories=[Trajectory(
            token_ids=to_ndarray(np.array([1, 2], np.int32)), loss_mask=to_ndarray(np.array([0, 1], np.uint8)),
            behaviour_logprobs=to_ndarray(np.zeros(2, np.float32)), versions=to_ndarray(np.array([-1, 0], np.int32)),
            images=payloads)])
        reply = decode(zmq_exchange(open_side.endpoints["trajectories"], encode(group)), LearnerOutbound)
        assert isinstance(reply, GroupAck) and reply.accepted, reply
    assert not marker.exists(), "a listener unpickled the payload"
    served(open_side)  # every process is alive and still answering
    assert not marker.exists()
    counted = delta(before, open_side.counters())
    if "tool_server" in counted:  # each payload was refused and counted, on every listener
        assert counted["tool_server"]["undecodable_frames"] == 3
        assert counted["tool_server"]["error_bad_request"] == 6
        assert counted["gateway"]["http_bad_request"] == 9 and counted["gateway"]["mcp_rejected"] == 9
    else:
        assert counted["learner"]["bad_frames"] == 3 and counted["learner"]["weights_bad_frames"] == 3
        assert counted["learner"]["groups_received"] == 1


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """after - before, per listener and counter."""
    return {side: {k: v - before[side].get(k, 0.0) for k, v in values.items()} for side, values in after.items()}


# ------------------------------------------------------------------------------------------------ size limits


def test_every_listener_has_a_size_limit(open_side):
    before = open_side.counters()
    if "tool_server" in open_side.endpoints:
        over_soft = tool_request(query="x" * 10, pad="y" * (100 * 1024))  # over the 64 KiB frame limit: answered
        reply = decode(zmq_exchange(open_side.endpoints["tool_server"], over_soft), ToolOutbound)
        assert isinstance(reply, ErrorReply) and reply.code == "too_large", reply
        assert zmq_exchange(open_side.endpoints["tool_server"], b"\x00" * (2 << 20), timeout_ms=500) is None
        big = b'{"query": "' + b"x" * (100 * 1024) + b'"}'  # over the gateway's 64 KiB body limit
        assert http(open_side.endpoints["http"] + "/v1/tools/text_search", big,
                    {"Content-Type": "application/json"})[0] == 413
        assert http(open_side.endpoints["mcp"], big, MCP_HEADERS)[0] == 413
    else:
        # over the 1 MiB trajectory limit and the 64 KiB weight-query limit: never read, no reply
        assert zmq_exchange(open_side.endpoints["trajectories"], b"\x00" * (2 << 20), timeout_ms=500) is None
        assert zmq_exchange(open_side.endpoints["weights"], b"\x00" * (128 << 10), timeout_ms=500) is None
    served(open_side)
    counted = delta(before, open_side.counters())
    if "tool_server" in counted:  # answered refusals are counted; frames ZMQ never read reach no counter
        assert counted["tool_server"]["error_too_large"] == 1
        assert counted["tool_server"]["requests"] == 2  # only `served`'s two: neither big frame became a request
        assert counted["gateway"]["http_too_large"] == 1 and counted["gateway"]["mcp_too_large"] == 1
    else:
        assert counted["learner"]["bad_frames"] == 0 and counted["learner"]["weights_bad_frames"] == 0


# ------------------------------------------------------------------------------------------------ secrets at rest


def test_the_learners_token_never_reaches_its_journal_or_checkpoint_snapshot(tmp_path):
    from learner.admission import AdmissionController
    from learner.journal import GroupJournal
    from learner.service import TrajectoryService

    service = TrajectoryService(AdmissionController(1, 0), journal=GroupJournal(tmp_path / "journal"), token=TOKEN)
    try:
        group = TrajectoryGroup(group_id="g1", actor_id="a", prompt_id="p", token=TOKEN, trajectories=[Trajectory(
            token_ids=to_ndarray(np.array([1, 2], np.int32)), loss_mask=to_ndarray(np.array([0, 1], np.uint8)),
            behaviour_logprobs=to_ndarray(np.zeros(2, np.float32)), versions=to_ndarray(np.array([-1, 0], np.int32)))])
        reply = decode(zmq_exchange(service.endpoint, encode(group)), LearnerOutbound)
        assert isinstance(reply, GroupAck) and reply.accepted, reply
        buffered, *_ = service.snapshot()  # what a checkpoint stores
    finally:
        service.close()
    assert [g.group_id for g in buffered] == ["g1"] and buffered[0].token is None
    entries = list((tmp_path / "journal").iterdir())
    assert len(entries) == 1 and TOKEN.encode() not in entries[0].read_bytes()
    assert decode(entries[0].read_bytes(), TrajectoryGroup).group_id == "g1"
