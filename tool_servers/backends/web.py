"""Web backends, MMSearch-R1's pipeline: Google Lens (SerpAPI) for image_search; Google web search (SerpAPI or
Serper), then a Jina-Reader-compatible page reader and a query-focused summariser on any OpenAI-compatible chat
endpoint, for text_search.

Each backend runs its own asyncio loop on a thread with one aiohttp session, so a micro-batch from the server's
executor fans out into concurrent HTTP calls. Every upstream service gets an `HttpClient`: a token bucket (rate
limit), a per-host concurrency cap, a per-request timeout, and retries with jittered backoff on 5xx and
timeouts only. API keys come from environment variables named in the config; they never appear in errors
or logs. Upstream failures map to ToolCallError codes: 429 -> overloaded, anything else -> backend_error.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from protocol import ToolItem
from protocol.images import decode_image, png_thumbnail
from protocol.metrics import Metrics
from tool_servers.backends.base import BatchResult
from tool_servers.backends.local_text import cut_text, tokenize
from tool_servers.errors import ToolCallError
from tool_servers.limits import ServerLimits, image_size

log = logging.getLogger(__name__)

SERPAPI_ENDPOINT = "https://serpapi.com/search.json"
SERPER_ENDPOINT = "https://google.serper.dev/search"
JINA_READER_ENDPOINT = "https://r.jina.ai/"
SEARCH_PROVIDERS = ("serpapi", "serper")
SUMMARY_PROMPT = (
    "You summarise a web page for a search agent. Keep only what helps answer the query: facts, names, "
    "numbers and dates, in at most {words} words. If the page says nothing relevant, say so in one sentence."
)


def env_key(name: str | None, what: str, required: bool = True) -> str | None:
    """The secret in environment variable `name`; ValueError names the variable (never the value)."""
    if name is None:
        if required:
            raise ValueError(f"{what}: api_key_env must name the environment variable that holds the API key")
        return None
    value = os.environ.get(name)
    if not value and required:
        raise ValueError(f"{what}: environment variable {name} (the API key) is unset or empty")
    return value or None


# ---------------------------------------------------------------------------------------------- HTTP plumbing


class TokenBucket:
    """`rate_per_s` tokens a second, at most `burst` saved up; `acquire` waits for one (FIFO by reservation).

    Single-loop use only: the arithmetic between awaits is atomic, so no lock is needed.
    """

    def __init__(self, rate_per_s: float, burst: int) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError(f"token bucket needs rate_per_s > 0 and burst >= 1, got {rate_per_s}, {burst}")
        self.rate = rate_per_s
        self.burst = burst
        self._tokens = float(burst)
        self._last = time.monotonic()

    def reserve(self) -> float:
        """Take a token (possibly one not yet earned) and return how long to wait before using it."""
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    async def acquire(self) -> None:
        wait = self.reserve()
        if wait > 0:
            await asyncio.sleep(wait)


@dataclass(frozen=True)
class HttpLimits:
    """Limits of one upstream service (knobs of a web backend, applied to each service it calls)."""

    rate_per_s: float = 5.0  # token bucket refill; 0 = unlimited
    burst: int = 5  # requests that may go at once after a quiet spell
    max_per_host: int = 4  # concurrent requests to one host
    timeout_s: float = 15.0  # per HTTP request, connect to last byte
    retries: int = 2  # extra tries on 5xx and timeouts (nothing else is retried)
    backoff_s: float = 0.25  # first retry waits about this long (jittered), doubling after
    max_body_bytes: int = 8 * 1024 * 1024  # bigger responses are refused

    def __post_init__(self) -> None:
        if self.rate_per_s < 0 or self.burst < 1 or self.max_per_host < 1 or self.timeout_s <= 0 \
                or self.retries < 0 or self.backoff_s < 0 or self.max_body_bytes < 1:
            raise ValueError(f"invalid HTTP limits {self}")


class HttpClient:
    """One upstream service: rate limit, per-host concurrency, timeouts, retries on 5xx/timeouts only."""

    def __init__(self, name: str, session: aiohttp.ClientSession, limits: HttpLimits, metrics: Metrics) -> None:
        self.name = name
        self.session = session
        self.limits = limits
        self.metrics = metrics
        self.bucket = TokenBucket(limits.rate_per_s, limits.burst) if limits.rate_per_s > 0 else None
        self._hosts: dict[str, asyncio.Semaphore] = {}

    async def fetch(self, method: str, url: str, *, params: Mapping[str, str] | None = None,
                    json_body: Any = None, data: bytes | None = None,
                    headers: Mapping[str, str] | None = None) -> bytes:
        """The response body of a 2xx answer; ToolCallError otherwise (after retries where allowed)."""
        host = URL(url).host or "?"
        where = f"{self.name} ({host})"  # never the full URL: SerpAPI keys travel in the query string
        semaphore = self._hosts.setdefault(host, asyncio.Semaphore(self.limits.max_per_host))
        timeout = aiohttp.ClientTimeout(total=self.limits.timeout_s)
        failure = ""
        for attempt in range(self.limits.retries + 1):
            if attempt:
                self.metrics.inc(f"{self.name}_retries")
                await asyncio.sleep(self.limits.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
            if self.bucket is not None:
                await self.bucket.acquire()
            self.metrics.inc(f"{self.name}_requests")
            started = time.monotonic()
            try:
                async with semaphore, self.session.request(method, url, params=params, json=json_body, data=data,
                                                           headers=headers, timeout=timeout) as response:
                    status = response.status
                    body = await response.content.read(self.limits.max_body_bytes + 1)
            except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
                self.metrics.inc(f"{self.name}_timeouts")
                failure = f"no answer within {self.limits.timeout_s} s"
                continue
            except aiohttp.ClientError as exc:  # refused, reset, DNS: not a 5xx or timeout, so not retried
                self.metrics.inc(f"{self.name}_unreachable")
                raise ToolCallError("backend_error", f"{where} unreachable: {type(exc).__name__}: {exc}") from exc
            finally:
                self.metrics.observe(f"{self.name}_ms", (time.monotonic() - started) * 1000.0)
            if len(body) > self.limits.max_body_bytes:
                raise ToolCallError("backend_error", f"{where} answered more than {self.limits.max_body_bytes} bytes")
            if status >= 500:
                self.metrics.inc(f"{self.name}_5xx")
                failure = f"HTTP {status}: {_snippet(body)}"
                continue
            if status == 429:
                self.metrics.inc(f"{self.name}_429")
                raise ToolCallError("overloaded", f"{where} is rate-limiting us (HTTP 429): {_snippet(body)}")
            if status >= 400:
                self.metrics.inc(f"{self.name}_4xx")
                raise ToolCallError("backend_error", f"{where} refused the request: HTTP {status}: {_snippet(body)}")
            return body
        raise ToolCallError("backend_error", f"{where} failed {self.limits.retries + 1} times; last: {failure}")

    async def fetch_json(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        body = await self.fetch(method, url, **kwargs)
        try:
            value = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self.metrics.inc(f"{self.name}_malformed")
            raise ToolCallError("backend_error", f"{self.name} ({URL(url).host}) sent malformed JSON: "
                                                 f"{exc}: {_snippet(body)}") from exc
        if not isinstance(value, dict):
            self.metrics.inc(f"{self.name}_malformed")
            raise ToolCallError("backend_error", f"{self.name} sent a JSON {type(value).__name__}, expected an object")
        return value


def _snippet(body: bytes, limit: int = 200) -> str:
    text = body[:limit].decode("utf-8", errors="replace").replace("\n", " ")
    return text + ("..." if len(body) > limit else "")


def _field(record: Any, key: str) -> str:
    value = record.get(key) if isinstance(record, dict) else None
    return value if isinstance(value, str) else ""


class _WebBackend:
    """Shared machinery: a private event loop on a daemon thread, one aiohttp session, metrics, close()."""

    name = "web"

    def __init__(self, limits: HttpLimits, trust_env: bool) -> None:
        self.limits = limits
        self.metrics = Metrics()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"web-{self.name}", daemon=True)
        self._thread.start()

        async def open_session() -> aiohttp.ClientSession:
            return aiohttp.ClientSession(trust_env=trust_env, raise_for_status=False,
                                         headers={"User-Agent": "forage-tool-servers"})

        self.session = self._run(open_session(), 10.0)
        self._clients: dict[str, HttpClient] = {}

    def http(self, service: str) -> HttpClient:
        if service not in self._clients:
            self._clients[service] = HttpClient(service, self.session, self.limits, self.metrics)
        return self._clients[service]

    def _run(self, coroutine: Any, timeout_s: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=timeout_s)

    def search_batch(self, batch: list[Mapping[str, Any]]) -> list[BatchResult]:
        async def all_of() -> list[Any]:
            return await asyncio.gather(*(self._one(args) for args in batch), return_exceptions=True)

        return self._run(all_of())

    async def _one(self, args: Mapping[str, Any]) -> list[ToolItem]:
        raise NotImplementedError

    def stats(self) -> dict[str, float]:
        return self.metrics.snapshot()

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self._run(self.session.close(), 10.0)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10.0)
            self._loop.close()


# ---------------------------------------------------------------------------------------------- image search


class WebImageSearch(_WebBackend):
    """Google Lens through SerpAPI: top_k visual matches as {title, url, text=source, image=PNG thumbnail}.

    Lens needs the query image at a public URL: pass `{"image_url": str}`, or `{"image": bytes}` with
    `upload_endpoint` set to an image host that accepts a POST of the bytes and answers `{"url": ...}`.
    """

    name = "image_search"

    def __init__(self, api_key_env: str = "SERPAPI_API_KEY", endpoint: str = SERPAPI_ENDPOINT, top_k: int = 5,
                 thumbnail_size: int = 256, fetch_thumbnails: bool = True, upload_endpoint: str | None = None,
                 upload_key_env: str | None = None, hl: str = "en",
                 max_pixels: int = ServerLimits.max_image_pixels, trust_env: bool = False,
                 **limits: Any) -> None:
        if top_k < 1 or thumbnail_size < 1:
            raise ValueError(f"top_k and thumbnail_size must be >= 1, got {top_k}, {thumbnail_size}")
        self.api_key = env_key(api_key_env, "web image_search (SerpAPI Google Lens)")
        self.upload_key = env_key(upload_key_env, "web image_search upload", required=upload_key_env is not None)
        self.endpoint = endpoint
        self.top_k = top_k
        self.thumbnail_size = thumbnail_size
        self.fetch_thumbnails = fetch_thumbnails
        self.upload_endpoint = upload_endpoint
        self.hl = hl
        self.max_pixels = max_pixels
        super().__init__(HttpLimits(**limits), trust_env)

    def validate(self, args: Mapping[str, Any]) -> None:
        if set(args) == {"image_url"}:
            url = args["image_url"]
            if not isinstance(url, str) or URL(url).scheme not in ("http", "https") or not URL(url).host:
                raise ToolCallError("bad_request", f"'image_url' must be an http(s) URL, got {url!r:.100}")
            return
        if set(args) != {"image"}:
            raise ToolCallError("bad_request", f"image_search takes 'image' (bytes) or 'image_url' (str), "
                                               f"got {sorted(args)}")
        if not isinstance(args["image"], bytes) or not args["image"]:
            raise ToolCallError("bad_request", "'image' must be non-empty encoded image bytes")
        if self.upload_endpoint is None:
            raise ToolCallError("bad_request", "this image_search (Google Lens) needs 'image_url': no "
                                               "upload_endpoint is configured to host image bytes")

    async def _upload(self, image: bytes) -> str:
        headers = {"Content-Type": "application/octet-stream"}
        if self.upload_key:
            headers["Authorization"] = f"Bearer {self.upload_key}"
        answer = await self.http("upload").fetch_json("POST", self.upload_endpoint, data=image, headers=headers)
        url = _field(answer, "url")
        if not url:
            raise ToolCallError("backend_error", f"image upload answered without a 'url': {str(answer)[:200]}")
        return url

    async def _one(self, args: Mapping[str, Any]) -> list[ToolItem]:
        self.validate(args)
        image_url = args.get("image_url") or await self._upload(args["image"])
        answer = await self.http("lens").fetch_json("GET", self.endpoint, params={
            "engine": "google_lens", "url": image_url, "hl": self.hl, "api_key": self.api_key})
        if _field(answer, "error"):
            raise ToolCallError("backend_error", f"SerpAPI Google Lens: {answer['error']}")
        matches = answer.get("visual_matches", [])
        if not isinstance(matches, list):
            raise ToolCallError("backend_error", f"SerpAPI Google Lens: visual_matches is a "
                                                 f"{type(matches).__name__}, expected a list")
        matches = [m for m in matches if isinstance(m, dict) and _field(m, "title")][: self.top_k]
        thumbnails = await asyncio.gather(*(self._thumbnail(_field(m, "thumbnail")) for m in matches))
        return [ToolItem(title=_field(m, "title"), url=_field(m, "link"), text=_field(m, "source"), image=thumb)
                for m, thumb in zip(matches, thumbnails)]

    async def _thumbnail(self, url: str) -> bytes | None:
        """A PNG no larger than thumbnail_size, or None when there is none or it cannot be had (counted)."""
        if not self.fetch_thumbnails or not url.startswith(("http://", "https://")):
            return None
        try:
            data = await self.http("thumbnails").fetch("GET", url)
            image_size(data, self.max_pixels)
            return png_thumbnail(decode_image(data), self.thumbnail_size)
        except Exception as exc:  # a missing thumbnail costs the item its picture, not the whole answer
            self.metrics.inc("thumbnail_failures")
            log.info("thumbnail %s dropped: %s", URL(url).host, exc)
            return None


# ---------------------------------------------------------------------------------------------- text search


class WebTextSearch(_WebBackend):
    """Web search (SerpAPI or Serper) -> page reader (Jina Reader) -> query-focused summary (OpenAI-compatible).

    Each of the top_k results becomes {title, url, text}: the summary of the page for the query; without a
    summariser the page text; without a reader (or when it fails) the search snippet. Reader and summariser
    failures degrade an item (counted as reader_failures / summariser_failures); search failures fail the call.
    """

    name = "text_search"

    def __init__(self, provider: str = "serpapi", api_key_env: str | None = None, endpoint: str | None = None,
                 top_k: int = 5, max_chars: int = 1500, gl: str = "us", hl: str = "en",
                 reader_endpoint: str | None = JINA_READER_ENDPOINT, reader_key_env: str | None = None,
                 page_chars: int = 20_000, summariser_endpoint: str | None = None, summariser_model: str = "",
                 summariser_key_env: str | None = None, summary_words: int = 150, trust_env: bool = False,
                 **limits: Any) -> None:
        if provider not in SEARCH_PROVIDERS:
            raise ValueError(f"unknown search provider {provider!r}; expected one of {SEARCH_PROVIDERS}")
        if top_k < 1 or max_chars < 1 or page_chars < 1 or summary_words < 1:
            raise ValueError(f"top_k, max_chars, page_chars and summary_words must be >= 1")
        if summariser_endpoint is not None and not summariser_model:
            raise ValueError("summariser_endpoint needs summariser_model (the served model's name)")
        self.provider = provider
        default_env = "SERPAPI_API_KEY" if provider == "serpapi" else "SERPER_API_KEY"
        self.api_key = env_key(api_key_env or default_env, f"web text_search ({provider})")
        self.endpoint = endpoint or (SERPAPI_ENDPOINT if provider == "serpapi" else SERPER_ENDPOINT)
        self.top_k, self.max_chars, self.page_chars = top_k, max_chars, page_chars
        self.gl, self.hl = gl, hl
        self.reader_endpoint = reader_endpoint
        self.reader_key = env_key(reader_key_env, "page reader", required=reader_key_env is not None)
        self.summariser_endpoint = summariser_endpoint.rstrip("/") if summariser_endpoint else None
        self.summariser_model = summariser_model
        self.summariser_key = env_key(summariser_key_env, "summariser", required=summariser_key_env is not None)
        self.summary_words = summary_words
        super().__init__(HttpLimits(**limits), trust_env)

    def validate(self, args: Mapping[str, Any]) -> None:
        if set(args) != {"query"}:
            raise ToolCallError("bad_request", f"text_search takes only 'query', got {sorted(args)}")
        if not isinstance(args["query"], str) or not tokenize(args["query"]):
            raise ToolCallError("bad_request", f"query {args['query']!r:.100} has no words")

    async def _one(self, args: Mapping[str, Any]) -> list[ToolItem]:
        self.validate(args)
        query = args["query"]
        hits = await self._search(query)
        texts = await asyncio.gather(*(self._page_text(query, hit) for hit in hits))
        return [ToolItem(title=hit["title"], url=hit["link"], text=cut_text(text, self.max_chars))
                for hit, text in zip(hits, texts)]

    async def _search(self, query: str) -> list[dict[str, str]]:
        if self.provider == "serpapi":
            answer = await self.http("search").fetch_json("GET", self.endpoint, params={
                "engine": "google", "q": query, "num": str(self.top_k), "gl": self.gl, "hl": self.hl,
                "api_key": self.api_key})
            results_key = "organic_results"
        else:
            answer = await self.http("search").fetch_json(
                "POST", self.endpoint, json_body={"q": query, "num": self.top_k, "gl": self.gl, "hl": self.hl},
                headers={"X-API-KEY": self.api_key})
            results_key = "organic"
        if _field(answer, "error") or _field(answer, "message") and results_key not in answer:
            raise ToolCallError("backend_error", f"{self.provider} search: "
                                                 f"{_field(answer, 'error') or _field(answer, 'message')}")
        results = answer.get(results_key, [])  # absent = no results (SerpAPI omits the key then)
        if not isinstance(results, list):
            raise ToolCallError("backend_error", f"{self.provider} search: {results_key} is a "
                                                 f"{type(results).__name__}, expected a list")
        hits = [{"title": _field(r, "title"), "link": _field(r, "link"), "snippet": _field(r, "snippet")}
                for r in results if isinstance(r, dict) and _field(r, "title")]
        return hits[: self.top_k]

    async def _page_text(self, query: str, hit: dict[str, str]) -> str:
        text = hit["snippet"]
        if self.reader_endpoint and hit["link"].startswith(("http://", "https://")):
            try:
                text = await self._read(hit["link"]) or text
            except ToolCallError as exc:
                self.metrics.inc("reader_failures")
                log.info("reader failed for %s: %s", URL(hit["link"]).host, exc.message)
                return text  # a snippet is not worth summarising
        if self.summariser_endpoint and text:
            try:
                return await self._summarise(query, hit["title"], text)
            except ToolCallError as exc:
                self.metrics.inc("summariser_failures")
                log.info("summariser failed: %s", exc.message)
        return text

    async def _read(self, link: str) -> str:
        headers = {"Accept": "application/json", "X-Return-Format": "markdown"}
        if self.reader_key:
            headers["Authorization"] = f"Bearer {self.reader_key}"
        answer = await self.http("reader").fetch_json("GET", self.reader_endpoint + link, headers=headers)
        data = answer.get("data")
        content = _field(data, "content")
        if not content and not isinstance(data, dict):
            raise ToolCallError("backend_error", f"reader answered without data.content: {str(answer)[:200]}")
        return content[: self.page_chars]

    async def _summarise(self, query: str, title: str, page: str) -> str:
        headers = {"Authorization": f"Bearer {self.summariser_key}"} if self.summariser_key else {}
        answer = await self.http("summariser").fetch_json(
            "POST", f"{self.summariser_endpoint}/chat/completions", headers=headers, json_body={
                "model": self.summariser_model, "temperature": 0.0, "max_tokens": 2 * self.summary_words,
                "messages": [
                    {"role": "system", "content": SUMMARY_PROMPT.format(words=self.summary_words)},
                    {"role": "user", "content": f"Query: {query}\n\nPage title: {title}\n\nPage:\n{page}"},
                ]})
        try:
            content = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise ToolCallError("backend_error", f"summariser answered without choices[0].message.content: "
                                                 f"{str(answer)[:200]}") from exc
        if not isinstance(content, str) or not content.strip():
            raise ToolCallError("backend_error", "summariser returned an empty summary")
        return content.strip()
