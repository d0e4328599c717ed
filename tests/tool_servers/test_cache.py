"""Result cache: key normalisation, LRU bounds, TTL, the on-disk store, and the server's use of it."""
from __future__ import annotations

import asyncio
import contextlib

import pytest

from protocol import ToolItem
from protocol.images import encode_png
from tool_servers.cache import CacheConfig, ResultCache, cache_key, normalise_query
from tool_servers.client import ToolClient
from tool_servers.errors import ToolCallError
from tool_servers.server import ToolServer, ToolServerRole, cache_namespace
from ts_helpers import FakeBackend, draw_entity, run


def items(*titles: str) -> list[ToolItem]:
    return [ToolItem(title=t, url=f"u/{t}", text="x" * 10) for t in titles]


# ---------------------------------------------------------------- keys


def test_queries_that_differ_in_case_spacing_or_width_share_a_key():
    assert normalise_query("  Who built\tHARROW's  tower? ") == "who built harrow's tower?"
    assert normalise_query("ｗｈｏ") == "who"  # NFKC folds full-width letters
    base = cache_key("ns", "text_search", {"query": "Who built Harrow?"})
    assert cache_key("ns", "text_search", {"query": "who  built harrow?"}) == base
    assert cache_key("ns", "text_search", {"query": "who built quell?"}) != base
    assert cache_key("other", "text_search", {"query": "Who built Harrow?"}) != base  # namespace = backend config
    assert cache_key("ns", "image_search", {"query": "Who built Harrow?"}) != base


def test_images_are_keyed_by_content_and_numbers_by_type():
    a, b = encode_png(draw_entity(1)), encode_png(draw_entity(2))
    assert cache_key("", "image_search", {"image": a}) == cache_key("", "image_search", {"image": bytes(a)})
    assert cache_key("", "image_search", {"image": a}) != cache_key("", "image_search", {"image": b})
    assert cache_key("", "t", {"k": 1}) != cache_key("", "t", {"k": 1.0})
    assert cache_key("", "t", {"a": "x", "b": "y"}) == cache_key("", "t", {"b": "y", "a": "x"})


# ---------------------------------------------------------------- memory LRU


def test_lru_evicts_the_least_recently_used_entry():
    cache = ResultCache(CacheConfig(max_entries=2))
    cache.put("a", items("A"))
    cache.put("b", items("B"))
    assert cache.get_memory("a")[0].title == "A"  # touch a: b is now the oldest
    cache.put("c", items("C"))
    assert cache.get_memory("b") is None
    assert [cache.get_memory(k)[0].title for k in ("a", "c")] == ["A", "C"]
    assert cache.sizes()[0] == 2


def test_byte_bound_and_oversized_values():
    one = len(__import__("msgspec").msgpack.encode(items("A")))
    cache = ResultCache(CacheConfig(max_bytes=2 * one + 1))
    for key in "abc":
        cache.put(key, items(key.upper()))
    entries, size = cache.sizes()
    assert entries == 2 and size <= 2 * one + 1 and cache.get_memory("a") is None
    cache.put("huge", items("H" * 10_000))  # bigger than the whole bound: not stored, nothing flushed
    assert cache.get_memory("huge") is None and cache.sizes()[0] == 2


def test_hits_are_fresh_objects():
    cache = ResultCache()
    cache.put("k", items("A"))
    first = cache.get_memory("k")
    first[0].title = "mutated"
    assert cache.get_memory("k")[0].title == "A"


def test_entries_expire_after_ttl(monkeypatch, tmp_path):
    clock = [1000.0]
    monkeypatch.setattr("tool_servers.cache.time.time", lambda: clock[0])
    cache = ResultCache(CacheConfig(ttl_s=60, directory=str(tmp_path)))
    cache.put("k", items("A"))
    clock[0] += 59
    assert cache.get_memory("k") is not None and cache.get_disk("k") is not None
    clock[0] += 2
    assert cache.get_memory("k") is None and cache.get_disk("k") is None
    cache.close()


def test_config_rejects_typos_and_nonsense():
    with pytest.raises(ValueError, match="max_entrys"):
        CacheConfig.from_mapping({"max_entrys": 3})
    with pytest.raises(ValueError, match="ttl_s"):
        CacheConfig(ttl_s=0)
    with pytest.raises(ValueError, match="sizes"):
        CacheConfig(max_entries=0)


# ---------------------------------------------------------------- disk


def test_disk_store_survives_a_restart_and_promotes_to_memory(tmp_path):
    first = ResultCache(CacheConfig(directory=str(tmp_path / "c")))
    first.put("k", items("A", "B"))
    first.close()
    second = ResultCache(CacheConfig(directory=str(tmp_path / "c")))
    assert second.get_memory("k") is None
    assert [i.title for i in second.get_disk("k")] == ["A", "B"]
    assert second.get_memory("k") is not None  # promoted
    assert second.get_disk("missing") is None
    second.close()


def test_disk_store_prunes_the_oldest_beyond_its_bound(tmp_path):
    cache = ResultCache(CacheConfig(directory=str(tmp_path), max_disk_entries=500, max_entries=1))
    for k in range(1000):  # pruning runs every 1000 puts
        cache.put(f"k{k}", items("x"))
    assert cache.get_disk("k0") is None and cache.get_disk("k999") is not None
    cache.close()


# ---------------------------------------------------------------- in the server


@contextlib.asynccontextmanager
async def cached_server(backend, cache):
    server = ToolServer({"fake": backend}, cache=cache)
    endpoint = await server.start()
    client = ToolClient(endpoint)
    try:
        yield server, client
    finally:
        await client.close()
        await server.stop(timeout_s=5.0)


def test_server_answers_repeats_from_the_cache_and_counts_hits():
    backend = FakeBackend()

    async def main():
        async with cached_server(backend, ResultCache()) as (server, client):
            first = await client.call("fake", {"query": "Otter  river"})
            second = await client.call("fake", {"query": "otter river"})
            assert not first.cached and second.cached
            assert second.items[0].title == first.items[0].title == "Otter  river"  # the stored answer
            for _ in range(2):  # errors are not cached, so the backend sees the second one too
                with pytest.raises(ToolCallError, match="boom requested"):
                    await client.call("fake", {"query": "boom"})
            stats = server.stats()
            assert stats["cache_hits"] == 1 and stats["cache_misses"] == 3
            assert stats["cache_hit_rate"] == pytest.approx(0.25) and stats["cache_entries"] == 1
            assert client.metrics.counter("cached_replies") == 1
    run(main())
    assert sum(backend.batches) == 3


def test_identical_requests_in_flight_together_reach_the_backend_once():
    backend = FakeBackend(delay_s=0.1)

    async def main():
        async with cached_server(backend, ResultCache()) as (_, client):
            replies = await asyncio.gather(*(client.call("fake", {"query": "same"}) for _ in range(6)))
            assert all(r.items[0].title == "same" for r in replies)
    run(main())
    assert sum(backend.batches) == 1  # queued duplicates were searched once or answered from memory


def test_a_restarted_server_answers_from_the_disk_store(tmp_path):
    config = CacheConfig(directory=str(tmp_path))

    async def main():
        async with cached_server(FakeBackend(), ResultCache(config, namespace="v1")) as (_, client):
            assert not (await client.call("fake", {"query": "pondle"})).cached
        fresh = FakeBackend()
        async with cached_server(fresh, ResultCache(config, namespace="v1")) as (server, client):
            reply = await client.call("fake", {"query": "PONDLE"})
            assert reply.cached and reply.items[0].title == "pondle" and fresh.batches == []
            assert server.stats()["cache_hits_disk"] == 1
        async with cached_server(FakeBackend(), ResultCache(config, namespace="v2")) as (_, client):
            assert not (await client.call("fake", {"query": "pondle"})).cached  # new config: new namespace
    run(main())


def test_role_builds_its_cache_from_the_section(text_corpus):
    section = {"backend": "local", "corpus": str(text_corpus), "cache": {"max_entries": 8}}
    role = ToolServerRole("text_search", section)
    endpoint = role.start()
    try:
        async def main():
            client = ToolClient(endpoint)
            try:
                return [(await client.call("text_search", {"query": "otter"})).cached for _ in range(2)]
            finally:
                await client.close()
        assert run(main()) == [False, True]
        assert role.stats()["cache_hit_rate"] == 0.5
    finally:
        role.stop()
    with pytest.raises(ValueError, match="unknown cache knobs"):
        ToolServerRole("text_search", {**section, "cache": {"size": 3}})
    assert cache_namespace("text_search", section) != cache_namespace("text_search", {**section, "top_k": 5})
    assert cache_namespace("text_search", section) == cache_namespace("text_search", {**section, "replicas": 4})
