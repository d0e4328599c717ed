"""Hardening: a 100 MB frame, frames over the hard cap, a 50-megapixel image, and killing one of three replica
processes under load. The fuzz of 10,000 malformed requests lives with the other listeners' in the fault suite
(tests/faults/test_fuzz_listeners.py), and a replica that hangs with its socket open in
tests/faults/test_hung_replica.py."""
from __future__ import annotations

import asyncio
import io
import signal
import time

import pytest
from PIL import Image

from listenerkit import end_processes, start_replica
from protocol import ToolRequest, encode
from protocol.images import encode_png
from tool_servers.backends.local_image import LocalImageSearch
from tool_servers.backends.local_text import LocalTextSearch
from tool_servers.client import ToolClient
from tool_servers.limits import ServerLimits
from ts_helpers import code_of, draw_entity, exchange, raw_peer, request, run, serving

@pytest.fixture(scope="module")
def backends(image_corpus, text_corpus):
    return {"image_search": LocalImageSearch(image_corpus, top_k=1), "text_search": LocalTextSearch(text_corpus)}


# ---------------------------------------------------------------- oversized input


def test_a_100_mb_frame_gets_too_large_and_the_server_keeps_serving(backends):
    frame = encode(ToolRequest(id="huge", tool="image_search", args={"image": b"\x00" * 100_000_000}))

    async def main():
        async with serving(backends) as (server, endpoint), raw_peer(endpoint) as peer:  # default limits
            start = time.monotonic()
            reply = await exchange(peer, frame, timeout_s=20.0)
            assert code_of(reply) == "too_large" and reply.id == "huge" and "100000" in reply.message
            assert time.monotonic() - start < 10.0
            assert code_of(await exchange(peer, request(id="next"))) == "ok"
            assert server.stats()["error_too_large"] == 1
    run(main())


def test_a_frame_over_the_hard_cap_is_dropped_without_hurting_the_server(backends):
    limits = ServerLimits(max_frame_bytes=64 * 1024, hard_frame_bytes=1024 * 1024)

    async def main():
        async with serving(backends, limits=limits) as (server, endpoint):
            async with raw_peer(endpoint) as peer:
                await peer.send(b"\x00" * (2 * 1024 * 1024))  # ZMQ refuses it and closes that connection
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(peer.recv(), 0.3)
            async with raw_peer(endpoint) as peer:
                assert code_of(await exchange(peer, request(id="after"))) == "ok"
            assert server.stats()["requests"] == 1  # the dropped frame never reached the server's code
    run(main())


def test_a_50_megapixel_image_is_refused_from_its_header(backends):
    out = io.BytesIO()
    Image.new("L", (8000, 6250), 128).save(out, format="PNG")  # 50,000,000 pixels in a 48 KB file
    frame = encode(ToolRequest(id="bomb", tool="image_search", args={"image": out.getvalue()}))

    async def main():
        async with serving(backends) as (server, endpoint), raw_peer(endpoint) as peer:  # 16.7 MP default
            start = time.monotonic()
            reply = await exchange(peer, frame)
            assert code_of(reply) == "too_large" and "8000x6250" in reply.error.message
            assert time.monotonic() - start < 0.5  # refused from the header: never decoded
            good = request(tool="image_search", args={"image": encode_png(draw_entity(2))})
            assert code_of(await exchange(peer, good)) == "ok"
    run(main())


# ---------------------------------------------------------------- replica death under load


def test_killing_one_of_three_replicas_under_load_loses_no_call():
    replicas = [start_replica() for _ in range(3)]
    endpoints = [endpoint for _, endpoint in replicas]
    victim, victim_endpoint = replicas[0]
    calls_per_worker, workers = 30, 16

    async def main():
        client = ToolClient(endpoints, default_deadline_s=5.0, retries=2)
        try:
            assert await client.wait_connected(10.0)
            done = 0

            async def worker(w: int) -> None:
                nonlocal done
                for i in range(calls_per_worker):
                    reply = await client.call("text_search", {"query": f"w{w}-{i}"})
                    assert reply.items[0].title == f"w{w}-{i}"
                    done += 1

            load = asyncio.gather(*(worker(w) for w in range(workers)))
            while done < 120:
                await asyncio.sleep(0.005)
            in_flight = client.health()[victim_endpoint]["outstanding"]
            victim.send_signal(signal.SIGKILL)
            await load  # any lost call raises here
            assert done == workers * calls_per_worker
            health = client.health()
            assert health[victim_endpoint]["connected"] is False and health[victim_endpoint]["disconnects"] == 1
            assert all(health[e]["connected"] for e in endpoints[1:])
            assert client.metrics.counter("replica_disconnects") == 1
            assert client.metrics.snapshot()["replicas_connected"] == 2
            # the calls caught on the victim were failed over rather than waiting out their deadline
            assert in_flight == 0 or client.metrics.counter("disconnected_in_flight") >= 1
            assert set(await client.stats(timeout_s=1.0)) == set(endpoints[1:])  # the dead one cannot answer

            # Re-probing: a replica restarted on the same endpoint is used again.
            replicas.append(start_replica(bind=victim_endpoint))
            end = time.monotonic() + 10.0
            while not client.health()[victim_endpoint]["connected"] and time.monotonic() < end:
                await asyncio.sleep(0.02)
            assert client.health()[victim_endpoint]["connected"]
            before = client.health()[victim_endpoint]["replies_ok"]
            await asyncio.gather(*(client.call("text_search", {"query": f"again{k}"}) for k in range(30)))
            assert client.health()[victim_endpoint]["replies_ok"] > before
            assert client.metrics.counter("replica_reconnects") == 1
        finally:
            await client.close()

    try:
        run(main())
    finally:
        end_processes([process for process, _ in replicas])
