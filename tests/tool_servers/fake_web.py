"""Local aiohttp stand-ins (127.0.0.1 only) for SerpAPI (google, google_lens), Serper, Jina Reader, an
OpenAI-compatible chat endpoint, an image host and thumbnail URLs, with scripted faults.

Faults are chosen by the query text: "flaky" answers 503 twice then succeeds, "broken" always 500, "slow"
sleeps past any sane timeout, "malformed" sends invalid JSON, "denied" 401, "ratelimit" 429, "empty" no results,
"wrongshape" a list where results belong. Every request is recorded in `calls` (path, query, headers).
"""
from __future__ import annotations

import asyncio
import collections
import threading
from typing import Any

from aiohttp import web
from testkit import solid_png

API_KEY = "test-key-123"


class FakeWeb:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.attempts: collections.Counter[str] = collections.Counter()
        self.uploads: dict[str, bytes] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.base = ""
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="fake-web")

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "FakeWeb":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/serpapi/search.json", self.serpapi)
        app.router.add_post("/serper/search", self.serper)
        app.router.add_get("/reader/{target:.*}", self.reader)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/img/{name}", self.image)
        app.router.add_post("/upload", self.upload)
        app.router.add_get("/slow", self.slow)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.base = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def reset(self) -> None:
        self.calls.clear()
        self.attempts.clear()
        self.max_in_flight = 0

    def count(self, path: str) -> int:
        return sum(call["path"].startswith(path) for call in self.calls)

    # ------------------------------------------------------------------ shared fault script

    async def _record(self, request: web.Request, query: str) -> web.Response | None:
        """Record the call; a fault response for scripted queries, else None."""
        self.calls.append({"path": request.path, "query": query, "params": dict(request.query),
                           "headers": dict(request.headers)})
        self.attempts[query] += 1
        if "slow" in query:
            await asyncio.sleep(1.0)  # far past the tests' timeouts; short enough not to hold up teardown
        if "malformed" in query:
            return web.Response(text='{"organic_results": [', content_type="application/json")
        if "denied" in query:
            return web.json_response({"error": "Invalid API key. Your API key should be here"}, status=401)
        if "ratelimit" in query:
            return web.json_response({"error": "Too many requests"}, status=429)
        if "broken" in query or ("flaky" in query and self.attempts[query] <= 2):
            return web.json_response({"error": "upstream exploded"}, status=503)
        return None

    def _organic(self, query: str, n: int) -> list[dict[str, Any]]:
        return [{"position": k + 1, "title": f"{query} result {k}", "link": f"{self.base}/page/{k}",
                 "snippet": f"snippet {k} about {query}"} for k in range(n)]

    # ------------------------------------------------------------------ routes

    async def serpapi(self, request: web.Request) -> web.Response:
        params = request.query
        query = params.get("q") or params.get("url", "")
        fault = await self._record(request, query)
        if fault is not None:
            return fault
        if params.get("api_key") != API_KEY:
            return web.json_response({"error": "Invalid API key."}, status=401)
        if params.get("engine") == "google_lens":
            matches = [{"position": k + 1, "title": f"Lens match {k}", "link": f"https://example.org/m{k}",
                        "source": "example.org", "thumbnail": f"{self.base}/img/{'missing' if k == 1 else k}"}
                       for k in range(7)]
            return web.json_response({"search_metadata": {"status": "Success"}, "visual_matches": matches})
        if "wrongshape" in query:
            return web.json_response({"organic_results": {"title": "not a list"}})
        if "empty" in query:
            return web.json_response({"search_metadata": {"status": "Success"},
                                      "search_information": {"organic_results_state": "Fully empty"}})
        return web.json_response({"search_metadata": {"status": "Success"},
                                  "organic_results": self._organic(query, int(params.get("num", 10)))})

    async def serper(self, request: web.Request) -> web.Response:
        body = await request.json()
        fault = await self._record(request, body.get("q", ""))
        if fault is not None:
            return fault
        if request.headers.get("X-API-KEY") != API_KEY:
            return web.json_response({"message": "Unauthorized.", "statusCode": 403}, status=403)
        return web.json_response({"searchParameters": body, "organic": self._organic(body["q"], body["num"])})

    async def reader(self, request: web.Request) -> web.Response:
        target = request.match_info["target"]
        fault = await self._record(request, target)
        if fault is not None:
            return fault
        if target.endswith("/page/2"):
            return web.json_response({"code": 500, "message": "could not render"}, status=500)
        return web.json_response({"code": 200, "status": 20000,
                                  "data": {"title": "Page", "url": target, "content": f"Full text of {target}. " * 5}})

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        user = body["messages"][-1]["content"]
        fault = await self._record(request, user)
        if fault is not None:
            return fault
        if body.get("model") == "broken-model":
            return web.json_response({"choices": []})
        query = user.split("\n", 1)[0].removeprefix("Query: ")
        return web.json_response({"id": "c1", "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": f"Summary for '{query}': {len(user)} chars"},
             "finish_reason": "stop"}]})

    async def image(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        await self._record(request, name)
        if name == "missing":
            return web.Response(status=404, text="gone")
        if name in self.uploads:
            return web.Response(body=self.uploads[name], content_type="image/png")
        return web.Response(body=solid_png((40 * int(name) % 255, 90, 160), 300), content_type="image/png")

    async def upload(self, request: web.Request) -> web.Response:
        data = await request.read()
        await self._record(request, "upload")
        if request.headers.get("Authorization") != f"Bearer {API_KEY}":
            return web.json_response({"error": "who are you"}, status=401)
        name = f"u{len(self.uploads)}"
        self.uploads[name] = data
        return web.json_response({"url": f"{self.base}/img/{name}"})

    async def slow(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.1)
            return web.json_response({"ok": True})
        finally:
            self.in_flight -= 1
