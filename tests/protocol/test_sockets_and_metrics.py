"""Loopback-only binding, the shared-token rule and check, and the metrics registry's summaries."""
from __future__ import annotations

import pytest
import zmq

from protocol.metrics import Metrics, summarize
from protocol.sockets import bind, configure, is_loopback_endpoint, require_token_beyond_loopback, token_matches


@pytest.mark.parametrize("endpoint, expected", [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.3.2.1:1", True), ("tcp://localhost:9", True),
    ("tcp://[::1]:9", True), ("ipc:///tmp/x", True), ("tcp://0.0.0.0:5555", False),
    ("tcp://10.0.0.5:5555", False), ("tcp://*:5555", False),
])
def test_loopback_detection(endpoint, expected):
    assert is_loopback_endpoint(endpoint) is expected


def test_bind_returns_concrete_loopback_port_and_refuses_wildcard():
    ctx = zmq.Context.instance()
    sock = configure(ctx.socket(zmq.ROUTER))
    try:
        endpoint = bind(sock)
        assert endpoint.startswith("tcp://127.0.0.1:") and not endpoint.endswith(":*")
        with pytest.raises(ValueError, match="beyond loopback"):
            bind(ctx.socket(zmq.ROUTER), "tcp://0.0.0.0:*")
    finally:
        sock.close()


def test_a_token_is_required_beyond_loopback_and_compared_exactly():
    require_token_beyond_loopback("tcp://127.0.0.1:*", None, "x")  # loopback: no token needed
    require_token_beyond_loopback("tcp://0.0.0.0:*", "tok", "x")
    for wide in ("tcp://0.0.0.0:*", "tcp://*:5", "tcp://10.1.2.3:5", "tcp://:0"):
        for token in (None, ""):
            with pytest.raises(ValueError, match=r"refusing to start the thing on .*requires a token"):
                require_token_beyond_loopback(wide, token, "the thing")
    assert token_matches(None, None) and token_matches("anything", None)  # no token expected
    assert token_matches("tok", "tok")
    assert not any(token_matches(given, "tok") for given in (None, "", "to", "tok ", "TOK", "tokk"))


def test_metrics_counts_gauges_and_percentiles():
    metrics = Metrics(prefix="tool/")
    metrics.inc("requests")
    metrics.inc("requests", 2)
    metrics.set("queue", 4)
    for value in range(1, 101):
        metrics.observe("latency_ms", value)
    snap = metrics.snapshot(reset_samples=True)
    assert snap["tool/requests"] == 3 and snap["tool/queue"] == 4
    assert snap["tool/latency_ms_count"] == 100 and snap["tool/latency_ms_max"] == 100
    assert snap["tool/latency_ms_p50"] == pytest.approx(50.5)
    assert metrics.snapshot()["tool/latency_ms_count"] == 0


def test_summarize_empty_window():
    assert summarize("x", []) == {"x_count": 0.0}
