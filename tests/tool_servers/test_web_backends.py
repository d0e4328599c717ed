"""Web backends against local fake APIs on 127.0.0.1: the pipeline, retries (5xx and timeouts only), errors,
malformed answers, rate limiting and per-host concurrency. Nothing here reaches the internet."""
from __future__ import annotations

import asyncio
import io
import time

import pytest
from PIL import Image

from fake_web import API_KEY, FakeWeb
from protocol.sockets import free_port
from testkit import solid_png
from tool_servers.backends.web import HttpClient, HttpLimits, TokenBucket, WebImageSearch, WebTextSearch
from tool_servers.client import ToolClient
from tool_servers.errors import ToolCallError
from tool_servers.server import ToolServer
from ts_helpers import run

FAST = {"timeout_s": 0.3, "retries": 2, "backoff_s": 0.01, "rate_per_s": 0}  # quick faults, no throttling


@pytest.fixture(scope="module")
def fake():
    server = FakeWeb().start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def keys(monkeypatch, fake):
    for name in ("SERPAPI_API_KEY", "SERPER_API_KEY", "UPLOAD_KEY"):
        monkeypatch.setenv(name, API_KEY)
    fake.reset()


@pytest.fixture
def text_search(fake):
    backend = WebTextSearch(endpoint=f"{fake.base}/serpapi/search.json", top_k=3,
                            reader_endpoint=f"{fake.base}/reader/", summariser_endpoint=f"{fake.base}/v1",
                            summariser_model="qwen-summariser", max_chars=200, **FAST)
    yield backend
    backend.close()


def one(backend, args):
    (result,) = backend.search_batch([args])
    return result


# ---------------------------------------------------------------- text: the MMSearch-R1 pipeline


def test_search_read_summarise(text_search, fake):
    items = one(text_search, {"query": "clock tower of Harrow"})
    assert [i.title for i in items] == [f"clock tower of Harrow result {k}" for k in range(3)]
    assert items[0].url == f"{fake.base}/page/0"
    assert items[0].text.startswith("Summary for 'clock tower of Harrow'")
    search = next(c for c in fake.calls if c["path"] == "/serpapi/search.json")
    assert search["params"]["api_key"] == API_KEY and search["params"]["num"] == "3"
    assert fake.count("/reader/") == 2 + 3  # page 2's reader answers 500: retried twice
    assert fake.count("/v1/chat/completions") == 2
    assert items[2].text == "snippet 2 about clock tower of Harrow"  # its reader fails: the snippet stays
    chat = [c for c in fake.calls if c["path"] == "/v1/chat/completions"][0]
    assert "Full text of" in chat["query"]  # the reader's page went to the summariser


def test_reader_and_summariser_failures_degrade_items(fake):
    backend = WebTextSearch(endpoint=f"{fake.base}/serpapi/search.json", top_k=3,
                            reader_endpoint=f"{fake.base}/reader/", summariser_endpoint=f"{fake.base}/v1",
                            summariser_model="broken-model", **{**FAST, "retries": 0})
    try:
        items = one(backend, {"query": "otters"})
        # page 2's reader fails: its snippet stays; the summariser answers without choices: page text stays
        assert items[2].text == "snippet 2 about otters"
        assert items[0].text.startswith(f"Full text of {fake.base}/page/0")
        stats = backend.stats()
        assert stats["reader_failures"] == 1 and stats["summariser_failures"] == 2
    finally:
        backend.close()


def test_serper_provider_and_no_reader(fake):
    backend = WebTextSearch(provider="serper", endpoint=f"{fake.base}/serper/search", top_k=2,
                            reader_endpoint=None, **FAST)
    try:
        items = one(backend, {"query": "brass bells"})
        assert [i.text for i in items] == ["snippet 0 about brass bells", "snippet 1 about brass bells"]
        call = fake.calls[0]
        assert call["headers"]["X-API-KEY"] == API_KEY and "api_key" not in call["params"]
    finally:
        backend.close()


def test_no_results_is_an_empty_ok_answer(text_search):
    assert one(text_search, {"query": "empty query"}) == []


# ---------------------------------------------------------------- retries: 5xx and timeouts only


def test_5xx_is_retried_until_it_succeeds(text_search, fake):
    items = one(text_search, {"query": "flaky lighthouse"})
    assert len(items) == 3 and fake.attempts["flaky lighthouse"] == 3
    stats = text_search.stats()
    assert stats["search_5xx"] == 2 and stats["search_retries"] == 2


def test_persistent_5xx_gives_backend_error_after_the_retries(text_search, fake):
    error = one(text_search, {"query": "broken index"})
    assert isinstance(error, ToolCallError) and error.code == "backend_error"
    assert "failed 3 times" in error.message and "HTTP 503" in error.message
    assert fake.attempts["broken index"] == 3


def test_slow_answers_time_out_and_are_retried(fake):
    backend = WebTextSearch(endpoint=f"{fake.base}/serpapi/search.json", reader_endpoint=None,
                            **{**FAST, "timeout_s": 0.15, "retries": 1})
    try:
        start = time.monotonic()
        error = one(backend, {"query": "slow search"})
        assert isinstance(error, ToolCallError) and error.code == "backend_error" and "no answer" in error.message
        assert fake.attempts["slow search"] == 2 and backend.stats()["search_timeouts"] == 2
        assert time.monotonic() - start < 1.0  # two 0.15 s attempts, not the fake's 5 s sleep
    finally:
        backend.close()


@pytest.mark.parametrize("query, code, text", [
    ("malformed answer", "backend_error", "malformed JSON"),
    ("denied please", "backend_error", "HTTP 401"),
    ("ratelimit me", "overloaded", "HTTP 429"),
    ("wrongshape", "backend_error", "expected a list"),
])
def test_other_failures_are_not_retried(text_search, fake, query, code, text):
    error = one(text_search, {"query": query})
    assert isinstance(error, ToolCallError) and error.code == code and text in error.message
    assert fake.attempts[query] == 1
    assert API_KEY not in error.message  # keys travel in SerpAPI's query string: never echo a URL


def test_unreachable_host_is_a_backend_error_without_retries():
    port = free_port()  # a port nothing listens on
    backend = WebTextSearch(endpoint=f"http://127.0.0.1:{port}/search.json", reader_endpoint=None, **FAST)
    try:
        error = one(backend, {"query": "anyone"})
        assert error.code == "backend_error" and "unreachable" in error.message
        assert backend.stats()["search_requests"] == 1
    finally:
        backend.close()


def test_bad_arguments_and_missing_keys(text_search, monkeypatch):
    results = text_search.search_batch([{"query": "?!"}, {"q": "x"}, {"query": "fine"}])
    assert [getattr(r, "code", "ok") for r in results] == ["bad_request", "bad_request", "ok"]
    monkeypatch.delenv("SERPER_API_KEY")
    with pytest.raises(ValueError, match="SERPER_API_KEY"):
        WebTextSearch(provider="serper")
    with pytest.raises(ValueError, match="summariser_model"):
        WebTextSearch(summariser_endpoint="http://127.0.0.1:1/v1")
    with pytest.raises(ValueError, match="unknown search provider"):
        WebTextSearch(provider="bing")


# ---------------------------------------------------------------- image: Google Lens


def test_lens_by_url_returns_thumbnails(fake):
    backend = WebImageSearch(endpoint=f"{fake.base}/serpapi/search.json", top_k=3, thumbnail_size=64, **FAST)
    try:
        items = one(backend, {"image_url": "https://example.org/photo.jpg"})
        assert [i.title for i in items] == ["Lens match 0", "Lens match 1", "Lens match 2"]
        lens = fake.calls[0]["params"]
        assert lens["engine"] == "google_lens" and lens["url"] == "https://example.org/photo.jpg"
        with Image.open(io.BytesIO(items[0].image)) as thumb:
            assert thumb.format == "PNG" and max(thumb.size) <= 64
        assert items[1].image is None and backend.stats()["thumbnail_failures"] == 1  # its thumbnail 404s
        assert items[0].text == "example.org" and items[0].url == "https://example.org/m0"
    finally:
        backend.close()


def test_lens_with_image_bytes_uploads_them_first(fake):
    backend = WebImageSearch(endpoint=f"{fake.base}/serpapi/search.json", upload_endpoint=f"{fake.base}/upload",
                             upload_key_env="UPLOAD_KEY", top_k=1, **FAST)
    try:
        photo = solid_png((200, 10, 10), 40)
        items = one(backend, {"image": photo})
        assert len(items) == 1 and fake.uploads["u0"] == photo
        assert fake.calls[1]["params"]["url"] == f"{fake.base}/img/u0"
    finally:
        backend.close()
    no_host = WebImageSearch(endpoint=f"{fake.base}/serpapi/search.json", **FAST)
    try:
        with pytest.raises(ToolCallError, match="needs 'image_url'"):
            no_host.validate({"image": b"\x89PNG"})
        with pytest.raises(ToolCallError, match="http"):
            no_host.validate({"image_url": "file:///etc/passwd"})
    finally:
        no_host.close()


# ---------------------------------------------------------------- rate limit and per-host concurrency


def test_token_bucket_spaces_requests(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("tool_servers.backends.web.time.monotonic", lambda: now[0])
    bucket = TokenBucket(rate_per_s=10, burst=2)
    assert [round(bucket.reserve(), 3) for _ in range(4)] == [0.0, 0.0, 0.1, 0.2]
    now[0] += 1.0  # a quiet second refills to the burst, not beyond
    assert [round(bucket.reserve(), 3) for _ in range(3)] == [0.0, 0.0, 0.1]
    with pytest.raises(ValueError):
        TokenBucket(0, 1)


def test_http_client_caps_rate_and_per_host_concurrency(fake):
    import aiohttp
    from protocol.metrics import Metrics

    async def main(limits):
        async with aiohttp.ClientSession() as session:
            client = HttpClient("probe", session, limits, Metrics())
            start = time.monotonic()
            await asyncio.gather(*(client.fetch("GET", f"{fake.base}/slow") for _ in range(6)))
            return time.monotonic() - start

    elapsed = run(main(HttpLimits(rate_per_s=0, max_per_host=2)))
    assert fake.max_in_flight == 2 and elapsed >= 0.3  # 6 requests of 0.1 s, two at a time
    fake.reset()
    elapsed = run(main(HttpLimits(rate_per_s=20, burst=1, max_per_host=6)))
    assert fake.max_in_flight < 6 and elapsed >= 0.25  # tokens every 50 ms: the 6th starts after 250 ms


# ---------------------------------------------------------------- behind a tool server


def test_web_backend_behind_a_tool_server(fake):
    backend = WebTextSearch(endpoint=f"{fake.base}/serpapi/search.json", reader_endpoint=None, top_k=2, **FAST)

    async def main():
        server = ToolServer({"text_search": backend})
        endpoint = await server.start()
        client = ToolClient(endpoint, retries=0)  # `overloaded` would otherwise be retried
        try:
            replies = await asyncio.gather(*(client.call("text_search", {"query": f"q{k}"}) for k in range(8)))
            assert [r.items[0].title for r in replies] == [f"q{k} result 0" for k in range(8)]
            with pytest.raises(ToolCallError) as info:
                await client.call("text_search", {"query": "ratelimit again"})
            assert info.value.code == "overloaded"
            stats = server.stats()
            assert stats["text_search_search_requests"] == 9 and stats["error_overloaded"] == 1
        finally:
            await client.close()
            await server.stop()

    run(main())
