"""A tool server replica that stops answering but keeps its socket open (issue 13 item 5b): two real replica
processes of text_search (`python -m tool_servers serve`, simulated backend, 4 ms a request), one of them paused with
SIGSTOP. The kernel keeps its socket open and even accepts TCP for it, so to a client it is a replica that went
silent, not one that went away.

- One hung, one live: every call is answered, by the live replica. A call whose attempt went to the hung one waits
  out that attempt's budget (ATTEMPT_S: the client's deadline fires, counted `unanswered` and `error_timeout`) and
  is retried on the live one (`retries`), within its deadline. (Latencies are printed, not asserted: on the shared
  box a timer can fire a second late.) Once ZMQ's heartbeat gives up on the hung
  replica (~5 s) it is disconnected and skipped: calls go straight to the live one. After SIGCONT it reconnects
  (`replica_reconnects`) and serves again. (Resumed, it first answers the requests that reached it while it was
  stopped, whose callers gave up long ago: a server counts a deadline from its own receipt. The test prints how many.)
- Both hung: every call ends with `timeout` by its deadline (give or take LATE_S of scheduling: not a hang), before and after the heartbeat drops the
  replicas; `timeout` is an infrastructure code (`ToolCallError.infrastructure`), which is what actors/episode.py's
  `_search` tests to end an episode as tool_failed. Resumed, they serve again.

Every stopped process gets SIGCONT in a finally block; every process started here is terminated at the end.
Measured on 2 shared cores: 15-35 s for the file, as busy as the box is (most of it the heartbeat's 5 s, twice, and
the replicas' start).
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from typing import Iterator

import pytest

from listenerkit import end_processes, start_replica
from tool_servers.client import ToolClient
from tool_servers.errors import ToolCallError

TOOL = "text_search"
DEADLINE_S = 5.0  # per call: room for a retry or two even when the box is busy
ATTEMPT_S = 0.5  # per attempt: how long a call gives the hung replica before it tries another
LATE_S = 1.5  # how late a timer may fire on a busy, shared 2-core box: a call past its deadline by more is a hang
HEARTBEAT_LIMIT_S = 12.0  # the client's ZMQ heartbeat drops a silent peer after 5 s; allow for a busy box


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[tuple[subprocess.Popen, str]]]:
    started: list[tuple[subprocess.Popen, str]] = []
    try:
        for _ in range(2):
            started.append(start_replica())
        yield started
    finally:
        end_processes([process for process, _ in started])  # SIGCONT first, then SIGTERM


def pause(process: subprocess.Popen, paused: list[subprocess.Popen]) -> None:
    assert process.poll() is None
    os.kill(process.pid, signal.SIGSTOP)
    paused.append(process)


def resume(paused: list[subprocess.Popen]) -> None:
    while paused:
        process = paused.pop()
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)


async def until(condition, timeout_s: float) -> float:
    """Wait for `condition()` (polled every 20 ms); the seconds it took. Fails after timeout_s."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"still not so after {timeout_s} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def timed_call(client: ToolClient, query: str) -> float:
    """One call that must be answered correctly; its latency in seconds."""
    start = time.monotonic()
    reply = await client.call(TOOL, {"query": query})
    assert reply.ok and reply.items[0].title == query, reply
    return time.monotonic() - start


def test_calls_to_a_hung_replica_time_out_and_go_to_the_live_one_and_it_serves_again_once_resumed(replicas):
    (hung, hung_endpoint), (_, live_endpoint) = replicas
    paused: list[subprocess.Popen] = []

    async def main() -> None:
        client = ToolClient([hung_endpoint, live_endpoint], default_deadline_s=DEADLINE_S, retries=3,
                            attempt_timeout_s=ATTEMPT_S)
        try:
            assert await client.wait_connected(10.0)
            await asyncio.gather(*(timed_call(client, f"warm{k}") for k in range(8)))
            before = client.health()
            assert before[hung_endpoint]["replies_ok"] > 0 and before[live_endpoint]["replies_ok"] > 0

            pause(hung, paused)
            # A burst while the hung replica still looks connected: every call answered.
            burst = await asyncio.gather(*(timed_call(client, f"burst{k}") for k in range(12)))
            # Then one call after another until the heartbeat gives up on it.
            latencies, k = [], 0
            start = time.monotonic()
            while client.health()[hung_endpoint]["connected"]:
                assert time.monotonic() - start < HEARTBEAT_LIMIT_S, "the hung replica was never disconnected"
                latencies.append(await timed_call(client, f"seq{k}"))
                k += 1
            heartbeat_s = time.monotonic() - start
            metrics = client.metrics
            unanswered = metrics.counter("unanswered")
            health = client.health()
            slowed = sum(latency >= ATTEMPT_S for latency in burst + latencies)
            print(f"hung replica: {len(burst)} burst calls (slowest {max(burst):.2f} s), {k} sequential calls "
                  f"before the heartbeat dropped it after {heartbeat_s:.1f} s (slowest {max(latencies):.2f} s); "
                  f"{slowed} calls took over {ATTEMPT_S} s; unanswered attempts {unanswered:.0f} (on the hung replica "
                  f"{health[hung_endpoint]['errors']}), retries {metrics.counter('retries'):.0f}")

            # The attempt timeout fired on the hung replica, each time counted and retried on the live one; the
            # hung one answered nothing, the live one every call. (On a starved box an attempt on the live one may
            # time out too: it is counted and retried the same way.)
            assert health[hung_endpoint]["errors"] >= 1 and health[hung_endpoint]["last_error"] == "timeout"
            assert unanswered == health[hung_endpoint]["errors"] + health[live_endpoint]["errors"]
            assert metrics.counter("error_timeout") == unanswered and metrics.counter("retries") == unanswered
            assert metrics.counter("replica_disconnects") == 1
            assert health[hung_endpoint]["replies_ok"] == before[hung_endpoint]["replies_ok"]  # it answered none
            assert health[live_endpoint]["replies_ok"] == before[live_endpoint]["replies_ok"] + len(burst) + k

            # Disconnected, the hung replica is skipped: calls go straight to the live one, none times out.
            hung_errors = health[hung_endpoint]["errors"]
            for k in range(20):
                await timed_call(client, f"after{k}")
            assert client.health()[hung_endpoint]["errors"] == hung_errors  # not tried while disconnected

            resume(paused)
            back_s = await until(lambda: client.health()[hung_endpoint]["connected"], 15.0)
            assert metrics.counter("replica_reconnects") == 1
            # It serves again. Its first answers may come late: resumed, it first works through the requests that
            # reached it while it was stopped (their deadlines count from its receipt; their callers are gone), and
            # a call stuck behind them is retried on the live replica; so call until it has answered some.
            served_before, rounds = client.health()[hung_endpoint]["replies_ok"], 0
            while client.health()[hung_endpoint]["replies_ok"] <= served_before:
                assert rounds < 50, "the resumed replica never answered"
                await asyncio.gather(*(timed_call(client, f"again{rounds}-{j}") for j in range(4)))
                rounds += 1
            stats = (await client.stats(timeout_s=5.0))[hung_endpoint]
            print(f"resumed replica reconnected after {back_s:.1f} s and answered again within {rounds} rounds of "
                  f"4 calls; requests it received in all: {stats['requests']:.0f} (its own replies_ok "
                  f"{stats['replies_ok']:.0f}, the client saw {client.health()[hung_endpoint]['replies_ok']})")
        finally:
            resume(paused)
            await client.close()

    try:
        asyncio.run(main())
    finally:
        resume(paused)
    assert all(process.poll() is None for process, _ in replicas)


def test_with_every_replica_hung_calls_fail_as_an_outage_by_their_deadline(replicas):
    processes = [process for process, _ in replicas]
    endpoints = [endpoint for _, endpoint in replicas]
    deadline_s = 1.0
    paused: list[subprocess.Popen] = []

    async def failures(client: ToolClient, calls: int) -> list[tuple[ToolCallError, float]]:
        async def one(k: int) -> tuple[ToolCallError, float]:
            start = time.monotonic()
            with pytest.raises(ToolCallError) as info:
                await client.call(TOOL, {"query": f"doomed{k}"}, deadline_s=deadline_s)
            return info.value, time.monotonic() - start
        return list(await asyncio.gather(*(one(k) for k in range(calls))))

    async def main() -> None:
        client = ToolClient(endpoints, default_deadline_s=deadline_s, retries=2)  # the budget split over replicas
        try:
            assert await client.wait_connected(10.0)
            await timed_call(client, "warm")
            for process in processes:
                pause(process, paused)
            # Still connected as far as the client knows: the attempts go out and are never answered.
            hung = await failures(client, 6)
            assert client.metrics.counter("unanswered") >= 6
            await until(lambda: not any(h["connected"] for h in client.health().values()), HEARTBEAT_LIMIT_S)
            # Disconnected: no send finds a live replica; the calls still end by their deadline.
            gone = await failures(client, 6)
            assert client.metrics.counter("unreachable") > 0
            for error, seconds in hung + gone:
                assert error.code == "timeout" and error.infrastructure, error  # an actor's tool_failed
                assert seconds < deadline_s + LATE_S, seconds  # by the deadline, not a hang
            print(f"every replica hung: calls failed after {max(s for _, s in hung):.2f} s (connected) and "
                  f"{max(s for _, s in gone):.2f} s (disconnected); deadline {deadline_s} s")

            resume(paused)
            assert await client.wait_connected(15.0)
            await timed_call(client, "back")
        finally:
            resume(paused)
            await client.close()

    try:
        asyncio.run(main())
    finally:
        resume(paused)
    assert all(process.poll() is None for process in processes)
