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
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import psutil
import pytest

from listenerkit import (
    INITIALIZE,
    MCP_HEADERS,
    REPO,
    Listeners,
    delta,
    http,
    learner_frames,
    served,
    tool_request,
    zmq_exchange,
)
from protocol import (
    ErrorReply,
    GroupAck,
    LearnerOutbound,
    ToolOutbound,
    ToolReply,
    Trajectory,
    TrajectoryGroup,
    decode,
    encode,
    to_ndarray,
)

TOKEN = "s3cret-token-for-tests"


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
