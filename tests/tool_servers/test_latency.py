"""The latency model (tool_servers/latency.py): seeded log-normal draws, and a server that holds each reply back by
its draw while many requests wait at once, within their deadlines, counted in its stats."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from tool_servers.backends import build_backend
from tool_servers.cache import CacheConfig, ResultCache
from tool_servers.errors import ToolCallError
from tool_servers.latency import DEFAULT_MEDIAN_S, LatencyConfig, LatencyModel, latency_model, lognormal_delays
from tool_servers.server import ToolServerRole, cache_namespace
from ts_helpers import FakeBackend, client_of, run, serving


def _model(tool: str = "fake", **knobs) -> LatencyModel:
    return LatencyModel(LatencyConfig(enabled=True, **knobs), tool)


# ---------------------------------------------------------------- the sampler (no sleeping)


def test_the_draws_have_median_s_as_their_median_and_sigma_as_their_log_spread():
    delays = lognormal_delays(np.random.default_rng(7), median_s=0.5, sigma=0.5, n=40_000)
    assert np.median(delays) == pytest.approx(0.5, rel=0.02)
    assert np.std(np.log(delays)) == pytest.approx(0.5, rel=0.02)
    assert np.mean(delays) == pytest.approx(0.5 * np.exp(0.5 ** 2 / 2), rel=0.02)  # the long tail lifts the mean
    model = _model(median_s=1.0, sigma=0.8)
    assert np.median([model.draw() for _ in range(20_000)]) == pytest.approx(1.0, rel=0.03)
    constant = _model(sigma=0.0, median_s=0.2)
    assert [constant.draw() for _ in range(3)] == pytest.approx([0.2] * 3)  # sigma 0: no spread


def test_the_draws_are_seeded_and_reproducible_and_differ_by_seed_tool_and_replica():
    def draws(seed: int = 3, tool: str = "text_search", replica: int = 0) -> list[float]:
        model = LatencyModel(LatencyConfig(enabled=True, seed=seed), tool, replica)
        return [model.draw() for _ in range(8)]

    assert draws() == draws()
    assert draws(seed=4) != draws()
    assert draws(tool="image_search") != draws()
    assert draws(replica=1) != draws()


def test_each_tool_has_its_default_median_and_the_section_configures_the_rest():
    assert _model("image_search").median_s == DEFAULT_MEDIAN_S["image_search"] == 1.0
    assert _model("text_search").median_s == DEFAULT_MEDIAN_S["text_search"] == 0.5
    assert _model("text_search", median_s=2.0).median_s == 2.0
    assert latency_model("text_search", {"backend": "local"}) is None  # absent: off
    assert latency_model("text_search", {"latency": {"enabled": False, "median_s": 3.0}}) is None
    on = latency_model("text_search", {"latency": {"enabled": True, "sigma": 0.1, "seed": 5}}, replica=2)
    assert on is not None and on.config.sigma == 0.1 and on.median_s == 0.5
    with pytest.raises(ValueError, match="unknown latency knobs"):
        LatencyConfig.from_mapping({"enabled": True, "mean_s": 1.0})
    for bad in ({"median_s": 0.0}, {"sigma": -0.1}, {"seed": -1}):
        with pytest.raises(ValueError, match="latency"):
            LatencyConfig.from_mapping(bad)


def test_the_latency_section_is_the_servers_not_the_backends_and_leaves_the_cache_namespace_alone():
    section = {"backend": "simulated", "latency_ms": 0, "latency": {"enabled": True, "median_s": 0.1}}
    build_backend("text_search", section).close()  # the backend is not handed a `latency` knob
    assert cache_namespace("text_search", section) == cache_namespace("text_search", {**section, "latency": None})


# ---------------------------------------------------------------- the server, over ZeroMQ on 127.0.0.1


def test_concurrent_requests_wait_side_by_side_not_one_after_another():
    """The point of the model: N requests in flight finish in about one delay, not N delays."""
    n = 16

    async def one(client, k: int) -> float:
        return (await client.call("fake", {"query": f"q{k}"}, deadline_s=10.0)).server_ms

    async def main():
        async with serving({"fake": FakeBackend()}, latency={"fake": _model(median_s=0.2, sigma=0.5, seed=1)}) \
                as (server, endpoint), client_of(endpoint, retries=0) as client:
            await client.call("fake", {"query": "warm-up"})  # connect first: only the burst is timed
            started = time.monotonic()
            server_ms = await asyncio.gather(*(one(client, k) for k in range(n)))
            return time.monotonic() - started, server_ms, server.stats()

    wall_s, server_ms, stats = run(main())
    expected = _model(median_s=0.2, sigma=0.5, seed=1)
    stream = [expected.draw() for _ in range(n + 1)]  # the server drew the same stream: the warm-up's first
    burst_draws = sorted(stream[1:])
    assert stats["latency_injected_count"] == n + 1 and stats["replies_ok"] == n + 1
    assert 0 < stats["latency_injected_s"] <= sum(stream) + 1e-6  # the draws less the backend's time
    assert wall_s < 0.5 * sum(burst_draws), (wall_s, sum(burst_draws))  # overlap: far below the sum of the delays
    assert wall_s >= burst_draws[-1] - 0.01  # and no shorter than the longest one
    # each reply waited at least its own draw, so the sorted server times dominate the sorted draws
    for got_ms, draw in zip(sorted(server_ms), burst_draws):
        assert got_ms / 1000.0 >= draw - 1e-3, (got_ms, draw)


def test_sequential_replies_take_the_seeded_draws():
    config = {"median_s": 0.3, "sigma": 0.5, "seed": 11}

    async def main():
        async with serving({"fake": FakeBackend()}, latency={"fake": _model(**config)}) as (_, endpoint), \
                client_of(endpoint, retries=0) as client:
            return [(await client.call("fake", {"query": f"q{k}"})).server_ms / 1000.0 for k in range(6)]

    expected = _model(**config)
    for got, draw in zip(run(main()), [expected.draw() for _ in range(6)]):
        assert draw - 1e-3 <= got <= draw + 0.5, (got, draw)  # at least its own draw; the slack is for a busy box


def test_a_reply_that_would_land_after_the_deadline_is_answered_timeout_at_the_deadline():
    async def main():
        async with serving({"fake": FakeBackend()}, latency={"fake": _model(median_s=3.0, sigma=0.0)}) \
                as (server, endpoint), client_of(endpoint, retries=0) as client:
            started = time.monotonic()
            with pytest.raises(ToolCallError) as caught:
                await client.call("fake", {"query": "slow"}, deadline_s=0.3)
            return caught.value.code, time.monotonic() - started, server.stats()

    code, elapsed, stats = run(main())
    assert code == "timeout" and elapsed < 2.0  # at the deadline, not after the 3 s draw
    assert stats["latency_past_deadline"] == 1 and stats["latency_injected_count"] == 0
    assert stats["error_timeout"] == 1 and stats["late_results_dropped"] == 1 and stats["replies_ok"] == 0


def test_cached_replies_are_delayed_unless_the_model_says_backend_only():
    async def ask_twice(cached: bool) -> list[float]:
        cache = ResultCache(CacheConfig(max_entries=8), namespace="t")
        model = _model(median_s=0.3, sigma=0.0, cached=cached)
        async with serving({"fake": FakeBackend()}, cache=cache, latency={"fake": model}) as (_, endpoint), \
                client_of(endpoint, retries=0) as client:
            replies = [await client.call("fake", {"query": "same"}) for _ in range(2)]
            assert [r.cached for r in replies] == [False, True]
            return [r.server_ms / 1000.0 for r in replies]

    live, hit = run(ask_twice(cached=True))
    assert live >= 0.3 - 1e-3 and hit >= 0.3 - 1e-3
    live, hit = run(ask_twice(cached=False))
    assert live >= 0.3 - 1e-3 and hit < 0.1


def test_the_role_reads_the_latency_section_and_counts_what_it_injected():
    section = {"backend": "simulated", "latency_ms": 0, "latency": {"enabled": True, "median_s": 0.3, "sigma": 0.0}}
    role = ToolServerRole("text_search", section, replica=1)
    role.start()
    try:
        async def main():
            async with client_of(role.endpoint, retries=0) as client:
                return [(await client.call("text_search", {"query": "otter"})).server_ms for _ in range(3)]

        assert all(ms >= 300.0 - 1.0 for ms in run(main()))
        stats = role.stats()  # each reply held for the 0.3 s draw less the backend's own time
        assert 1 <= stats["latency_injected_count"] <= 3 and 0 < stats["latency_injected_s"] <= 0.9 + 1e-6
    finally:
        role.stop()
    with pytest.raises(ValueError, match="unknown latency knobs"):
        ToolServerRole("text_search", {**section, "latency": {"enabled": True, "median": 1.0}})
