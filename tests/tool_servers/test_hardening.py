"""Hardening: a 100 MB frame, frames over the hard cap, a 50-megapixel image, a fuzz run of 10,000 malformed
requests, and killing one of three replica processes under load."""
from __future__ import annotations

import asyncio
import io
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
from PIL import Image

from protocol import ToolOutbound, ToolRequest, decode, encode
from protocol.images import encode_png
from tool_servers.backends.local_image import LocalImageSearch
from tool_servers.backends.local_text import LocalTextSearch
from tool_servers.client import ToolClient
from tool_servers.limits import ServerLimits
from ts_helpers import code_of, draw_entity, exchange, raw_peer, request, run, serving

REPO = Path(__file__).resolve().parents[2]


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


# ---------------------------------------------------------------- fuzz


def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 2 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.randint(-2**63, 2**63 - 1)
    if kind == 3:
        return rng.uniform(-1e9, 1e9)
    if kind == 4:
        return "".join(rng.choice("ab cé\u00ff\u4e2d\n") for _ in range(rng.randrange(12)))
    if kind == 5:
        return rng.randbytes(rng.randrange(24))
    if kind == 6:
        return rng.choice(["tool_request", "stats_request", "text_search", "image_search", "", "id"])
    if kind == 7:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {str(_random_value(rng, depth + 1)): _random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def malformed_frames(count: int, seed: int = 7) -> list[list[bytes]]:
    """Seeded, so a failure reproduces: garbage, truncations, bit flips, wrong types, missing fields, bad args."""
    rng = random.Random(seed)
    valid = {"type": "tool_request", "v": 1, "id": "f", "tool": "text_search", "args": {"query": "otter"},
             "deadline_ms": 2000}
    image_request = encode(ToolRequest(id="img", tool="image_search", args={"image": encode_png(draw_entity(3))}))
    frames = []
    for n in range(count):
        kind = n % 8
        if kind == 0:  # garbage bytes
            frame = rng.randbytes(rng.randrange(64))
        elif kind == 1:  # a valid request cut short
            full = msgspec.msgpack.encode({**valid, "id": f"t{n}"})
            frame = full[: rng.randrange(len(full))]
        elif kind == 2:  # a valid request (text or image) with a few bytes flipped
            frame = bytearray(rng.choice([msgspec.msgpack.encode({**valid, "id": f"b{n}"}), image_request]))
            for _ in range(rng.randint(1, 4)):
                frame[rng.randrange(len(frame))] = rng.randrange(256)
            frame = bytes(frame)
        elif kind == 3:  # random msgpack structures
            frame = msgspec.msgpack.encode(_random_value(rng))
        elif kind == 4:  # one field of a request replaced by a random value
            message = {**valid, "id": f"w{n}"}
            message[rng.choice(sorted(message))] = _random_value(rng)
            frame = msgspec.msgpack.encode(message)
        elif kind == 5:  # a required field missing
            message = {**valid, "id": f"m{n}"}
            del message[rng.choice(["id", "tool", "args", "type"])]
            frame = msgspec.msgpack.encode(message)
        elif kind == 6:  # well-formed, but bad arguments, tools, deadlines, versions, tokens
            message = {**valid, "id": f"a{n}"}
            field, value = rng.choice([
                ("args", {"query": _random_value(rng)}), ("args", {"image": rng.randbytes(40)}),
                ("args", {"image": "not bytes"}), ("args", {"query": ""}), ("args", {}),
                ("args", {"query": "x", "extra": 1}), ("tool", "unknown_tool_" + str(n)),
                ("deadline_ms", rng.choice([0, -5, 10**12])), ("v", rng.choice([0, 2, 99])),
                ("token", "unexpected"), ("args", {"query": "q" * 5000}),
            ])
            message[field] = value
            frame = msgspec.msgpack.encode(message)
        else:  # several payload frames in one message
            frames.append([rng.randbytes(8) for _ in range(rng.randint(2, 4))])
            continue
        frames.append([frame])
    return frames


def test_fuzz_10000_malformed_requests_then_a_valid_one_works(backends):
    frames = malformed_frames(10_000)
    limits = ServerLimits(max_query_chars=2000, max_frame_bytes=1024 * 1024)

    async def main():
        async with serving(backends, limits=limits) as (server, endpoint), raw_peer(endpoint) as peer:
            start = time.monotonic()
            codes: dict[str, int] = {}
            window = 500  # stay under ZMQ's high-water marks: send a window, read all its replies
            for begin in range(0, len(frames), window):
                chunk = frames[begin:begin + window]
                for parts in chunk:
                    await peer.send_multipart(parts)
                for _ in chunk:  # exactly one reply per message, whatever it held
                    reply = decode(await asyncio.wait_for(peer.recv(), 10.0), ToolOutbound)
                    code = code_of(reply) if hasattr(reply, "ok") or hasattr(reply, "code") else "stats"
                    codes[code] = codes.get(code, 0) + 1
            with pytest.raises(asyncio.TimeoutError):  # and nothing more
                await asyncio.wait_for(peer.recv(), 0.2)
            elapsed = time.monotonic() - start
            good = await exchange(peer, request(id="valid-after-fuzz"))
            assert code_of(good) == "ok" and good.id == "valid-after-fuzz" and good.items[0].title == "Pondle"
            stats = server.stats()
            return codes, elapsed, stats

    codes, elapsed, stats = run(main())
    assert sum(codes.values()) == 10_000
    errors = sum(n for code, n in codes.items() if code not in ("ok", "stats"))
    assert errors >= 9_000, codes  # a few flips land in harmless places and stay valid
    assert codes["bad_request"] > 5_000 and codes.get("unknown_tool", 0) > 0 and codes.get("too_large", 0) > 0
    assert stats["undecodable_frames"] > 3_000 and stats["replies_ok"] == codes.get("ok", 0) + 1
    assert elapsed < 30.0, elapsed


def test_fuzz_frames_are_reproducible():
    assert malformed_frames(50, seed=3) == malformed_frames(50, seed=3)
    assert malformed_frames(50, seed=3) != malformed_frames(50, seed=4)


# ---------------------------------------------------------------- replica death under load


def _start_replica(bind: str = "tcp://127.0.0.1:*") -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "tool_servers", "--log-level", "WARNING", "serve", "--tool", "text_search",
               "--backend", "simulated", "--knob", "latency_ms=4", "--limit", "max_batch=4", "--bind", bind]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = process.stdout.readline()
    if not line.startswith("serving text_search on "):
        process.kill()
        raise RuntimeError(f"replica did not start: {line!r}")
    return process, line.split()[-1]


def test_killing_one_of_three_replicas_under_load_loses_no_call():
    replicas = [_start_replica() for _ in range(3)]
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
            replicas.append(_start_replica(bind=victim_endpoint))
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
        for process, _ in replicas:
            if process.poll() is None:
                process.terminate()
        for process, _ in replicas:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            process.stdout.close()
