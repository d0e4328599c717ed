"""ToolServer + ToolClient over real sockets on 127.0.0.1: normal path, bad input, faults, overload, stats."""
from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
import zmq
import zmq.asyncio

from protocol import StatsRequest, ToolOutbound, ToolReply, decode, encode
from tool_servers.backends.local_image import LocalImageSearch
from tool_servers.backends.local_text import LocalTextSearch
from tool_servers.client import ToolClient
from tool_servers.discovery import read_discovery, register, unregister
from tool_servers.errors import ToolCallError
from tool_servers.limits import ServerLimits
from tool_servers.server import ToolServer
from ts_helpers import (
    NUM_IMAGES,
    PAGES,
    FakeBackend,
    client_of,
    code_of,
    draw_entity,
    exchange,
    perturb,
    raw_peer,
    request,
    run,
    serving,
)
from PIL import Image
from protocol.images import encode_png

SLACK_S = 0.05  # scheduling noise allowed on a shared 2-core machine


@pytest.fixture(scope="module")
def backends(image_corpus, text_corpus):
    return {"image_search": LocalImageSearch(image_corpus, top_k=3), "text_search": LocalTextSearch(text_corpus)}


# ---------------------------------------------------------------- normal path


def test_both_tools_answer_with_the_right_hit_first(backends):
    async def main():
        async with serving(backends) as (_, endpoint), client_of(endpoint) as client:
            text = await client.call("text_search", {"query": "who built the clock tower"})
            assert text.ok and text.items[0].title == "Harrow" and text.server_ms > 0
            for i in (0, 7, NUM_IMAGES - 1):
                image = await client.call("image_search", {"image": encode_png(perturb(draw_entity(i), seed=100 + i))})
                assert image.items[0].title == f"Entity {i}" and image.items[0].image
    run(main())


def test_many_coroutines_get_their_own_replies(backends):
    async def one(client, k):
        if k % 3 == 0:
            reply = await client.call("image_search", {"image": encode_png(draw_entity(k % NUM_IMAGES))})
            return reply.items[0].title == f"Entity {k % NUM_IMAGES}"
        title, text = PAGES[k % len(PAGES)]
        reply = await client.call("text_search", {"query": text})
        return reply.items[0].title == title

    async def main():
        async with serving(backends) as (server, endpoint), client_of(endpoint) as client:
            assert all(await asyncio.gather(*(one(client, k) for k in range(200))))
            stats = server.stats()
            assert stats["replies_ok"] >= 200 and stats["batch_size_max"] > 1  # concurrent requests were batched
    run(main())


def test_worker_batches_what_is_queued_without_waiting():
    backend = FakeBackend(delay_s=0.03)

    async def main():
        async with serving({"fake": backend}, limits=ServerLimits(max_batch=8)) as (_, endpoint), \
                client_of(endpoint) as client:
            start = time.monotonic()
            await client.call("fake", {"query": "alone"})
            assert time.monotonic() - start < 0.03 + 0.1  # a lone request is not held back for company
            replies = await asyncio.gather(*(client.call("fake", {"query": f"q{k}"}) for k in range(20)))
            assert [r.items[0].title for r in replies] == [f"q{k}" for k in range(20)]
    run(main())
    assert backend.batches[0] == 1 and sum(backend.batches) == 21
    assert max(backend.batches) > 1 and max(backend.batches) <= 8


# ---------------------------------------------------------------- bad input


def _big_png(side: int) -> bytes:
    return encode_png(Image.new("RGB", (side, side), (10, 20, 30)))


BAD_FRAMES = {
    "garbage bytes": ([b"\x00\xff garbage \xc1"], "bad_request", ""),
    "empty frame": ([b""], "bad_request", ""),
    "not a map": ([msgspec.msgpack.encode([1, 2, 3])], "bad_request", ""),
    "args is a list": ([msgspec.msgpack.encode({"type": "tool_request", "id": "r-list", "tool": "text_search",
                                                "args": ["otter"]})], "bad_request", "r-list"),
    "arg is null": ([msgspec.msgpack.encode({"type": "tool_request", "id": "r-null", "tool": "text_search",
                                             "args": {"query": None}})], "bad_request", "r-null"),
    "missing tool": ([msgspec.msgpack.encode({"type": "tool_request", "id": "r-missing", "args": {}})],
                     "bad_request", "r-missing"),
    "unknown message type": ([msgspec.msgpack.encode({"type": "launch_missiles", "id": "r-type"})],
                             "bad_request", "r-type"),
    "wrong protocol version": ([request(id="r-v", v=99)], "bad_request", "r-v"),
    "non-UTF-8 query": ([request(id="r-utf", args={"query": "QQQQ"}).replace(b"QQQQ", b"\xff\xfe\xfd\xfc")],
                        "bad_request", "r-utf"),
    "two payload frames": ([request(id="r-2"), b"extra"], "bad_request", ""),
    "frame over the limit": ([request(id="r-big", args={"query": "x" * 70_000})], "too_large", "r-big"),
    "query over the limit": ([request(id="r-long", args={"query": "otter " * 400})], "too_large", "r-long"),
    "image over max pixels": ([request(id="r-px", tool="image_search", args={"image": _big_png(1100)})],
                              "too_large", "r-px"),
    "undecodable image": ([request(id="r-img", tool="image_search", args={"image": b"GIF89a nope"})],
                          "bad_request", "r-img"),
    "image as text": ([request(id="r-imgstr", tool="image_search", args={"image": "cat.png"})],
                      "bad_request", "r-imgstr"),
    "empty query": ([request(id="r-empty", args={"query": "  "})], "bad_request", "r-empty"),
    "unknown tool": ([request(id="r-tool", tool="video_search")], "unknown_tool", "r-tool"),
    "zero deadline": ([request(id="r-dl", deadline_ms=0)], "bad_request", "r-dl"),
}


@pytest.mark.parametrize("case", list(BAD_FRAMES))
def test_bad_input_gets_its_code_and_the_server_keeps_serving(backends, case):
    frames, code, recovered_id = BAD_FRAMES[case]
    limits = ServerLimits(max_frame_bytes=64 * 1024, max_image_pixels=1000 * 1000, max_query_chars=2000)

    async def main():
        async with serving(backends, limits=limits) as (server, endpoint), raw_peer(endpoint) as peer:
            reply = await exchange(peer, *frames)
            assert code_of(reply) == code, reply
            assert reply.id == recovered_id
            assert server.stats()[f"error_{code}"] == 1
            good = await exchange(peer, request(id="after"))
            assert code_of(good) == "ok" and good.id == "after" and good.items[0].title == "Pondle"
    run(main())


def test_client_raises_the_servers_code_without_retrying(backends):
    async def main():
        async with serving(backends) as (_, endpoint), client_of(endpoint, retries=2) as client:
            for tool, args, code in [("text_search", {"query": ""}, "bad_request"),
                                     ("maps", {"query": "x"}, "unknown_tool"),
                                     ("image_search", {"image": b"junk"}, "bad_request")]:
                with pytest.raises(ToolCallError) as info:
                    await client.call(tool, args)
                assert info.value.code == code
            assert client.metrics.counter("retries") == 0
    run(main())


def test_token_is_required_when_set(backends):
    async def main():
        async with serving(backends, token="s3cret") as (server, endpoint):
            for token in (None, "wrong", "s3cre"):
                async with client_of(endpoint, token=token) as client:
                    with pytest.raises(ToolCallError) as info:
                        await client.call("text_search", {"query": "otter"})
                    assert info.value.code == "unauthorized"
                    with pytest.raises(ToolCallError):
                        await client.stats()
            async with client_of(endpoint, token="s3cret") as client:
                assert (await client.call("text_search", {"query": "otter"})).items[0].title == "Pondle"
                assert (await client.stats())[endpoint]["error_unauthorized"] == 6
    run(main())


def test_binding_beyond_loopback_needs_a_token(backends):
    with pytest.raises(ValueError, match="requires a token"):
        ToolServer(backends, bind="tcp://0.0.0.0:*")


# ---------------------------------------------------------------- faults


def test_backend_exceptions_become_backend_error():
    async def main():
        async with serving({"fake": FakeBackend(fail="batch")}) as (_, endpoint), client_of(endpoint) as client:
            with pytest.raises(ToolCallError) as info:
                await client.call("fake", {"query": "x"})
            assert info.value.code == "backend_error" and "index file vanished" in info.value.message
        # A per-request exception fails only its own request, even inside a batch.
        async with serving({"fake": FakeBackend(delay_s=0.02)}) as (server, endpoint), client_of(endpoint) as client:
            results = await asyncio.gather(*(client.call("fake", {"query": q}) for q in ["a", "boom", "b"]),
                                           return_exceptions=True)
            assert results[0].items[0].title == "a" and results[2].items[0].title == "b"
            assert results[1].code == "backend_error" and "boom requested" in results[1].message
            assert server.stats()["error_backend_error"] == 1
    run(main())


def test_slow_backend_times_out_by_the_deadline_and_late_work_is_dropped():
    backend = FakeBackend(delay_s=0.4)

    async def main():
        async with serving({"fake": backend}, limits=ServerLimits(max_batch=1)) as (server, endpoint), \
                raw_peer(endpoint) as peer:
            # Raw: the server's own timeout reply arrives by the deadline, never later.
            start = time.monotonic()
            for k in range(3):
                await peer.send(request(id=f"s{k}", tool="fake", deadline_ms=150))
            replies = [decode(await asyncio.wait_for(peer.recv(), 2.0), ToolOutbound) for _ in range(3)]
            elapsed = time.monotonic() - start
            assert sorted(r.id for r in replies) == ["s0", "s1", "s2"]
            assert all(code_of(r) == "timeout" for r in replies)
            assert 0.1 <= elapsed <= 0.15 + SLACK_S, elapsed
            # The first request was running when it expired (its result is dropped when it comes);
            # the other two never reach the backend.
            await asyncio.sleep(0.4)
            stats = server.stats()
            assert stats["late_results_dropped"] == 1 and stats["expired_in_queue"] == 2
            assert stats["error_timeout"] == 3 and backend.batches == [1]
            # Nothing else arrives later.
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(peer.recv(), 0.1)
            # Through the client: ToolCallError("timeout") by the deadline.
            async with client_of(endpoint, retries=2) as client:
                start = time.monotonic()
                with pytest.raises(ToolCallError) as info:
                    await client.call("fake", {"query": "slow"}, deadline_s=0.2)
                assert info.value.code == "timeout"
                assert time.monotonic() - start <= 0.2 + SLACK_S
    run(main())


def test_client_fails_over_from_a_stopped_replica(text_corpus):
    backends = {"text_search": LocalTextSearch(text_corpus)}

    async def main():
        async with serving(backends) as (server_a, endpoint_a), serving(backends) as (server_b, endpoint_b), \
                client_of(endpoint_a, endpoint_b, default_deadline_s=2.0) as client:
            for _ in range(20):  # until both connections are up and have carried traffic
                await asyncio.gather(*(client.call("text_search", {"query": "otter"}) for _ in range(4)))
                if server_a.stats()["replies_ok"] > 0 and server_b.stats()["replies_ok"] > 0:
                    break
            assert server_a.stats()["replies_ok"] > 0 and server_b.stats()["replies_ok"] > 0  # load is spread
            await server_a.stop()
            before = server_b.stats()["replies_ok"]
            start = time.monotonic()
            for _ in range(10):
                assert (await client.call("text_search", {"query": "otter"})).items[0].title == "Pondle"
            assert time.monotonic() - start < 1.0  # no call sat out a whole deadline on the dead replica
            assert server_b.stats()["replies_ok"] == before + 10
    run(main())


def test_client_skips_a_replica_that_never_came_up(text_corpus):
    async def main():
        socket = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        dead = socket.bind_to_random_port("tcp://127.0.0.1")
        socket.close(linger=0)  # a port nobody listens on any more
        async with serving({"text_search": LocalTextSearch(text_corpus)}) as (_, live), \
                client_of(f"tcp://127.0.0.1:{dead}", live, default_deadline_s=2.0) as client:
            start = time.monotonic()
            for _ in range(5):
                assert (await client.call("text_search", {"query": "otter"})).ok
            assert time.monotonic() - start < 1.0
            assert client.metrics.counter("error_timeout") == 0
    run(main())


def test_timeout_on_a_hung_replica_is_retried_on_another_within_the_deadline():
    async def main():
        async with serving({"fake": FakeBackend(delay_s=2.0)}) as (_, slow), \
                serving({"fake": FakeBackend()}) as (_, fast), \
                client_of(slow, fast, retries=1) as client:
            # Least-outstanding ties take turns, so within a few calls one starts on `slow`; it must time out
            # after its share (half) of the deadline and then succeed on `fast`.
            for _ in range(10):
                start = time.monotonic()
                reply = await client.call("fake", {"query": "q"}, deadline_s=1.0)
                assert reply.items[0].title == "q" and time.monotonic() - start <= 0.5 + 2 * SLACK_S
                if client.metrics.counter("retries"):
                    break
            assert client.metrics.counter("retries") == 1 and client.metrics.counter("error_timeout") == 1
    run(main())


def test_tiny_queue_answers_overloaded():
    async def main():
        limits = ServerLimits(max_queue=1, max_batch=1)
        async with serving({"fake": FakeBackend(delay_s=0.1)}, limits=limits) as (server, endpoint), \
                raw_peer(endpoint) as peer:
            for k in range(6):
                await peer.send(request(id=f"o{k}", tool="fake"))
            codes = [code_of(decode(await asyncio.wait_for(peer.recv(), 2.0), ToolOutbound)) for _ in range(6)]
            assert codes.count("overloaded") >= 4 and codes.count("ok") + codes.count("overloaded") == 6
            assert server.stats()["error_overloaded"] == codes.count("overloaded")
            async with client_of(endpoint, retries=0) as client:
                results = await asyncio.gather(*(client.call("fake", {"query": "x"}) for _ in range(6)),
                                               return_exceptions=True)
                assert any(isinstance(r, ToolCallError) and r.code == "overloaded" for r in results)
                assert all(isinstance(r, ToolReply) or r.code == "overloaded" for r in results)
    run(main())


def test_stop_finishes_in_flight_requests_and_refuses_new_ones():
    async def main():
        server = ToolServer({"fake": FakeBackend(delay_s=0.2)})
        endpoint = await server.start()
        async with client_of(endpoint, retries=0) as client, raw_peer(endpoint) as peer:
            calls = [asyncio.create_task(client.call("fake", {"query": f"q{k}"})) for k in range(3)]
            await asyncio.sleep(0.05)
            stopping = asyncio.create_task(server.stop())
            await asyncio.sleep(0.01)
            late = await exchange(peer, request(id="late", tool="fake"))
            assert code_of(late) == "overloaded"
            assert [r.items[0].title for r in await asyncio.gather(*calls)] == ["q0", "q1", "q2"]
            await stopping
    run(main())


def test_stats_count_requests_errors_and_latency(backends):
    async def main():
        async with serving(backends) as (_, endpoint), client_of(endpoint) as client, raw_peer(endpoint) as peer:
            await client.call("text_search", {"query": "otter"})
            await client.call("image_search", {"image": encode_png(draw_entity(1))})
            for args, tool in [({"query": ""}, "text_search"), ({"query": "x"}, "maps")]:
                with pytest.raises(ToolCallError):
                    await client.call(tool, args)
            assert code_of(await exchange(peer, b"junk")) == "bad_request"
            stats = await exchange(peer, encode(StatsRequest(id="st")))
            assert stats.id == "st"
            s = stats.stats
            assert s["requests"] == 4 and s["replies_ok"] == 2
            assert s["error_bad_request"] == 2 and s["error_unknown_tool"] == 1 and s["error_timeout"] == 0
            assert s["requests_text_search"] == 2 and s["requests_image_search"] == 1
            assert s["latency_ms_count"] == 4 and 0 < s["latency_ms_p50"] <= s["latency_ms_p99"] < 1000
            assert (await client.stats())[endpoint]["requests"] == 4
    run(main())


def test_a_frame_whose_handling_fails_is_answered_backend_error_and_counted():
    """A bug handling one frame (here: a backend whose stats() raises) neither stops the server nor leaves the peer
    waiting: it gets backend_error with its id, counted in frame_handler_errors; stats replies are counted too."""
    class BrokenStats(FakeBackend):
        broken = True

        def stats(self) -> dict[str, float]:
            if self.broken:
                raise RuntimeError("stats bug")
            return {}

    backend = BrokenStats()

    async def main():
        async with serving({"fake": backend}) as (server, endpoint), raw_peer(endpoint) as peer:
            reply = await exchange(peer, encode(StatsRequest(id="s1")))
            assert code_of(reply) == "backend_error" and reply.id == "s1" and "stats bug" in reply.message
            backend.broken = False
            assert (await exchange(peer, encode(StatsRequest(id="s2")))).id == "s2"
            assert code_of(await exchange(peer, request(id="after", tool="fake"))) == "ok"
            stats = server.stats()
            assert stats["frame_handler_errors"] == 1 and stats["error_backend_error"] == 1
            assert stats["stats_replies"] == 1 and stats["replies_ok"] == 1
    run(main())


# ---------------------------------------------------------------- other peers, discovery, health


def test_a_req_socket_peer_is_answered(backends):
    """REQ sockets (any ZMQ binding's simplest client) add an empty delimiter frame; replies keep it."""
    async def main():
        async with serving(backends) as (_, endpoint):
            socket = zmq.asyncio.Context.instance().socket(zmq.REQ)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(endpoint)
            try:
                for k in range(2):  # REQ enforces send/recv turns: a second round proves the envelope was right
                    await socket.send(request(id=f"req{k}"))
                    reply = decode(await asyncio.wait_for(socket.recv(), 2.0), ToolOutbound)
                    assert reply.id == f"req{k}" and reply.items[0].title == "Pondle"
            finally:
                socket.close()
    run(main())


def test_discovery_file_lists_replicas_and_is_followed(tmp_path, text_corpus):
    path = tmp_path / "replicas.json"
    backends = {"text_search": LocalTextSearch(text_corpus)}

    async def main():
        async with serving(backends) as (_, a), serving(backends) as (server_b, b):
            register(path, "text_search", a)
            register(path, "image_search", "tcp://127.0.0.1:1")
            client = ToolClient.from_discovery(path, "text_search", refresh_s=0.0)
            try:
                assert (await client.call("text_search", {"query": "otter"})).ok
                assert list(client.health()) == [a]
                register(path, "text_search", b)
                for _ in range(40):  # the file changed: b joins; least-outstanding routing soon uses it
                    await asyncio.gather(*(client.call("text_search", {"query": "otter"}) for _ in range(4)))
                    if server_b.stats()["replies_ok"]:
                        break
                assert set(client.health()) == {a, b} and server_b.stats()["replies_ok"] > 0
                unregister(path, "text_search", a)
                await client.call("text_search", {"query": "otter"})
                assert list(client.health()) == [b]
            finally:
                await client.close()
    run(main())
    assert read_discovery(path)["image_search"] == ["tcp://127.0.0.1:1"] and len(read_discovery(path)) == 2
    with pytest.raises(ValueError, match="lists no replicas"):
        ToolClient.from_discovery(path, "maps")
    path.write_text('{"text_search": "tcp://not-a-list"}')
    with pytest.raises(ValueError, match="expected"):
        read_discovery(path)


def test_health_reports_connections_and_errors(backends):
    async def main():
        async with serving(backends) as (server, endpoint), client_of(endpoint) as client:
            assert await client.wait_connected(2.0)
            await client.call("text_search", {"query": "otter"})
            with pytest.raises(ToolCallError):
                await client.call("text_search", {"query": ""})
            health = client.health()[endpoint]
            assert health["connected"] and health["replies_ok"] == 1 and health["errors"] == 1
            assert health["last_error"] == "bad_request" and health["outstanding"] == 0
            await server.stop()  # a graceful stop also closes the connection
            for _ in range(100):
                if not client.health()[endpoint]["connected"]:
                    break
                await asyncio.sleep(0.01)
            assert client.health()[endpoint]["disconnects"] == 1
            assert client.metrics.snapshot()["replicas_connected"] == 0
    run(main())


def test_a_client_written_from_the_readme_alone(backends):
    """Plain msgpack (not msgspec) and a bare DEALER, as a client in another language would do it."""
    import msgpack

    async def main():
        async with serving(backends, token="t0k") as (_, endpoint), raw_peer(endpoint) as peer:
            await peer.send(msgpack.packb({"type": "tool_request", "id": "x1", "tool": "image_search",
                                           "args": {"image": encode_png(draw_entity(4))}, "deadline_ms": 3000,
                                           "token": "t0k"}, use_bin_type=True))
            reply = msgpack.unpackb(await asyncio.wait_for(peer.recv(), 2.0), raw=False)
            assert reply["type"] == "tool_reply" and reply["id"] == "x1" and reply["ok"] is True
            assert reply["items"][0]["title"] == "Entity 4" and isinstance(reply["items"][0]["image"], bytes)
            assert set(reply) == {"type", "v", "id", "ok", "items", "error", "cached", "server_ms"}
            # minimal request: defaults for v and deadline_ms; no token -> an `error` message
            await peer.send(msgpack.packb({"type": "tool_request", "id": "x2", "tool": "text_search",
                                           "args": {"query": "otter"}}))
            reply = msgpack.unpackb(await asyncio.wait_for(peer.recv(), 2.0), raw=False)
            assert reply == {"type": "error", "v": 1, "id": "x2", "code": "unauthorized",
                             "message": "missing or wrong token"}
            await peer.send(msgpack.packb({"type": "stats_request", "id": "s1", "token": "t0k"}))
            reply = msgpack.unpackb(await asyncio.wait_for(peer.recv(), 2.0), raw=False)
            assert reply["type"] == "stats_reply" and reply["stats"]["replies_ok"] == 1.0
    run(main())
