"""Gateway for reuse outside forage: a JSON-over-HTTP endpoint (aiohttp) and a Model Context Protocol server
(official `mcp` SDK; stdio or Streamable HTTP) in front of the tool servers' replicas.

Both faces turn JSON arguments into wire arguments (a base64 string becomes image bytes), call the tool through
a `ToolClient` (so they inherit its replica routing, retries and deadlines), and turn the reply back into JSON
or MCP content (text blocks plus image blocks). Tool failures keep their error code: an HTTP status plus
`{ok: false, error: {code, message}}`, or an MCP result with `isError: true`. Both HTTP faces bind loopback unless a
bearer token is given, bound request bodies (`max_body_bytes`), and count what they refuse in `ToolGateway.metrics`.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from protocol import ToolItem, ToolReply
from protocol.metrics import Metrics
from protocol.sockets import require_token_beyond_loopback, token_matches
from tool_servers.client import ToolClient
from tool_servers.errors import ToolCallError

log = logging.getLogger(__name__)

IMAGE_ARG_SCHEMA = {"type": "string", "contentEncoding": "base64",
                    "description": "the query image: base64 of PNG/JPEG/WebP bytes (a data: URL also works)"}
TOOL_SPECS: dict[str, dict[str, Any]] = {
    "image_search": {
        "description": "Reverse image search: find pages about what this image shows. Returns up to top_k "
                       "matches, each a title, a URL and a thumbnail image.",
        "input_schema": {"type": "object", "properties": {
            "image": IMAGE_ARG_SCHEMA,
            "image_url": {"type": "string", "description": "instead of image: a public http(s) URL of the image "
                                                           "(web backend only)"},
        }, "additionalProperties": False},
    },
    "text_search": {
        "description": "Search text pages. Returns up to top_k pages, each a title, a URL and a text excerpt "
                       "(or a query-focused summary with the web backend).",
        "input_schema": {"type": "object", "properties": {"query": {"type": "string", "minLength": 1}},
                         "required": ["query"], "additionalProperties": False},
    },
}
GENERIC_SPEC = {"description": "a forage tool server tool", "input_schema": {"type": "object"}}
# Error code -> HTTP status of the JSON endpoint.
HTTP_STATUS = {"bad_request": 400, "unauthorized": 401, "unknown_tool": 404, "too_large": 413,
               "backend_error": 502, "overloaded": 503, "timeout": 504}
MAX_BODY_BYTES = 32 * 1024 * 1024  # request bodies of both HTTP faces (a base64 image grows by a third)


def sniff_mime(data: bytes) -> str:
    """MIME type of encoded image bytes from their magic number (application/octet-stream when unknown)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    return "application/octet-stream"


def wire_args(tool: str, arguments: Any) -> dict[str, Any]:
    """JSON arguments -> ToolRequest args: `image` is base64 (or a data: URL) and becomes bytes."""
    if not isinstance(arguments, dict):
        raise ToolCallError("bad_request", f"arguments must be a JSON object, got {type(arguments).__name__}")
    args: dict[str, Any] = {}
    for name, value in arguments.items():
        if name == "image" and isinstance(value, str):
            encoded = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
            try:
                args[name] = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ToolCallError("bad_request", f"{tool}: 'image' is not valid base64: {exc}") from exc
        elif isinstance(value, (str, int, float, bool)):
            args[name] = value
        else:
            raise ToolCallError("bad_request", f"{tool}: argument {name!r} must be a string or a number, "
                                               f"got {type(value).__name__}")
    return args


def item_json(item: ToolItem) -> dict[str, Any]:
    out: dict[str, Any] = {"title": item.title, "url": item.url, "text": item.text}
    if item.image is not None:
        out["image"] = base64.b64encode(item.image).decode("ascii")
        out["mime_type"] = sniff_mime(item.image)
    return out


@dataclass
class ToolGateway:
    """The tools behind the gateway: one ToolClient per tool name, and the gateway's own counters (`metrics`:
    http_requests, http_unauthorized, http_too_large, http_bad_request (a body that is not JSON), http_internal_errors
    (a handler bug, answered 500), http_status_<status> (every answer of the JSON face, by HTTP status);
    mcp_requests, mcp_unauthorized, mcp_too_large, mcp_rejected (any other 4xx answer of the MCP app, e.g. a body
    that is not JSON-RPC), mcp_internal_errors, mcp_status_<status> (every answer of the MCP face, by status))."""

    clients: Mapping[str, ToolClient]
    deadline_s: float | None = None  # per call; None = each client's default
    specs: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(TOOL_SPECS))
    metrics: Metrics = field(default_factory=Metrics)

    def __post_init__(self) -> None:
        for name in ("http_requests", "http_unauthorized", "http_too_large", "http_bad_request", "http_internal_errors",
                     "mcp_requests", "mcp_unauthorized", "mcp_too_large", "mcp_rejected", "mcp_internal_errors"):
            self.metrics.inc(name, 0.0)

    @classmethod
    def from_endpoints(cls, endpoints: Mapping[str, Sequence[str]], *, deadline_s: float | None = None,
                       **client_kwargs: Any) -> "ToolGateway":
        """A gateway with a ToolClient for each {tool: [endpoint, ...]}."""
        if not endpoints:
            raise ValueError("ToolGateway needs at least one tool")
        return cls({tool: ToolClient(list(eps), **client_kwargs) for tool, eps in endpoints.items()}, deadline_s)

    def tool_list(self) -> list[dict[str, Any]]:
        """[{name, description, input_schema}] of the tools this gateway serves."""
        return [{"name": tool, **self.specs.get(tool, GENERIC_SPEC)} for tool in sorted(self.clients)]

    async def call(self, tool: str, arguments: Any) -> ToolReply:
        """Call `tool` with JSON arguments; the ok reply or ToolCallError (unknown_tool for tools it lacks)."""
        client = self.clients.get(tool)
        if client is None:
            raise ToolCallError("unknown_tool", f"{tool!r}; this gateway serves {sorted(self.clients)}")
        return await client.call(tool, wire_args(tool, arguments), self.deadline_s)

    async def stats(self) -> dict[str, Any]:
        """Per tool: the client's counters, its replicas' health, and each live replica's server stats; under
        "gateway": the gateway's own counters."""
        out: dict[str, Any] = {"gateway": self.metrics.snapshot()}
        for tool, client in self.clients.items():
            try:
                replicas = await client.stats(timeout_s=1.0)
            except ToolCallError as exc:
                replicas = {"error": f"{exc.code}: {exc.message}"}
            out[tool] = {"client": client.metrics.snapshot(), "health": client.health(), "replicas": replicas}
        return out

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()


# ------------------------------------------------------------------------------------------------ HTTP (JSON)


def _authorised(header: str | None, token: str | None) -> bool:
    return token_matches(header, f"Bearer {token}" if token is not None else None)


def _error_response(code: str, message: str) -> web.Response:
    return web.json_response({"ok": False, "error": {"code": code, "message": message}},
                             status=HTTP_STATUS.get(code, 500))


def http_app(gateway: ToolGateway, token: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> web.Application:
    """The JSON endpoint: GET /healthz, GET /v1/tools, POST /v1/tools/{tool}, GET /v1/stats.

    With a token, every route but /healthz needs `Authorization: Bearer <token>` (compared in constant time).
    Bodies over `max_body_bytes` get 413; refusals are counted in `gateway.metrics`, and every answer by its status
    (`http_status_<status>`). A handler that raises is answered 500 (`backend_error`) and counted.
    """
    metrics = gateway.metrics

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        metrics.inc("http_requests")
        try:
            if request.path != "/healthz" and not _authorised(request.headers.get("Authorization"), token):
                metrics.inc("http_unauthorized")
                response = _error_response("unauthorized", "missing or wrong bearer token")
            else:
                response = await handler(request)
        except web.HTTPException as exc:  # aiohttp's own answers: no such route (404), wrong method (405), ...
            metrics.inc(f"http_status_{exc.status}")
            raise
        except Exception as exc:  # a bug: answered and counted rather than left to aiohttp's bare 500
            metrics.inc("http_internal_errors")
            log.exception("gateway: %s %s failed", request.method, request.path)
            response = web.json_response({"ok": False, "error": {"code": "backend_error", "message":
                                                                 f"gateway error: {type(exc).__name__}"}}, status=500)
        metrics.inc(f"http_status_{response.status}")
        return response

    async def healthz(request: web.Request) -> web.Response:
        if not _authorised(request.headers.get("Authorization"), token):  # a probe: alive, but no replica addresses
            return web.json_response({"ok": True})
        health = {tool: client.health() for tool, client in gateway.clients.items()}
        return web.json_response({"ok": True, "tools": health})

    async def tools(request: web.Request) -> web.Response:
        return web.json_response({"tools": gateway.tool_list()})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(await gateway.stats())

    async def call(request: web.Request) -> web.Response:
        tool = request.match_info["tool"]
        try:
            arguments = json.loads(await request.read() or b"{}")
        except web.HTTPRequestEntityTooLarge:
            metrics.inc("http_too_large")
            return _error_response("too_large", f"request body over {max_body_bytes} bytes")
        # JSON only (a pickle is just bad JSON). ValueError: not JSON, not UTF-8, or an integer of more digits than
        # Python converts; RecursionError: arrays or objects nested deeper than the parser recurses.
        except (ValueError, RecursionError) as exc:
            metrics.inc("http_bad_request")
            return _error_response("bad_request", f"body is not JSON: {type(exc).__name__}: {str(exc)[:200]}")
        try:
            reply = await gateway.call(tool, arguments)
        except ToolCallError as exc:
            return _error_response(exc.code, exc.message)
        return web.json_response({"ok": True, "items": [item_json(i) for i in reply.items], "cached": reply.cached,
                                  "server_ms": reply.server_ms})

    app = web.Application(middlewares=[guard], client_max_size=max_body_bytes)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/tools", tools)
    app.router.add_get("/v1/stats", stats)
    app.router.add_post("/v1/tools/{tool}", call)
    return app


# ------------------------------------------------------------------------------------------------ MCP


def mcp_content(reply: ToolReply) -> list[Any]:
    """MCP content blocks of an ok reply: per item a text block (title, url, text) and its image block."""
    import mcp_types as types

    blocks: list[Any] = []
    for rank, item in enumerate(reply.items, 1):
        lines = [f"[{rank}] {item.title}"] + [line for line in (item.url, item.text) if line]
        blocks.append(types.TextContent(type="text", text="\n".join(lines)))
        if item.image is not None:
            blocks.append(types.ImageContent(type="image", data=base64.b64encode(item.image).decode("ascii"),
                                             mime_type=sniff_mime(item.image)))
    return blocks or [types.TextContent(type="text", text="No results.")]


def mcp_server(gateway: ToolGateway, name: str = "forage-tools") -> Any:
    """An `mcp.server.Server` with tools/list and tools/call over the gateway's tools.

    Tool failures (bad input, timeouts, backend errors) are results with isError and "code: message" text;
    an unknown tool name is a protocol error (INVALID_PARAMS), as the MCP specification asks.
    """
    import mcp_types as types
    from mcp.server import Server
    from mcp.shared.exceptions import MCPError

    async def list_tools(ctx: Any, params: Any) -> Any:
        return types.ListToolsResult(tools=[types.Tool(**spec) for spec in gateway.tool_list()])

    async def call_tool(ctx: Any, params: Any) -> Any:
        if params.name not in gateway.clients:
            raise MCPError(types.INVALID_PARAMS, f"unknown tool {params.name!r}; tools: {sorted(gateway.clients)}")
        try:
            reply = await gateway.call(params.name, params.arguments or {})
        except ToolCallError as exc:
            return types.CallToolResult(content=[types.TextContent(type="text", text=f"{exc.code}: {exc.message}")],
                                        is_error=True)
        structured = {"items": [{"title": i.title, "url": i.url, "text": i.text, "has_image": i.image is not None}
                                for i in reply.items], "cached": reply.cached}
        return types.CallToolResult(content=mcp_content(reply), structured_content=structured, is_error=False)

    return Server(name, on_list_tools=list_tools, on_call_tool=call_tool)


async def _refuse(send: Any, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


class _GuardASGI:
    """ASGI wrapper of the MCP app: HTTP requests need `Authorization: Bearer <token>` when there is a token (401),
    and bodies are bounded by `max_body_bytes` (413 from Content-Length; a chunked body that grows past it is cut
    off as a client disconnect). Lifespan events pass through; refusals are counted on `metrics`, every answer by its
    status (`mcp_status_<status>`), and an app that raises before answering is answered 500 and counted."""

    def __init__(self, app: Any, token: str | None, max_body_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.metrics.inc("mcp_requests")
        started = False

        async def counted_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.inc(f"mcp_status_{message['status']}")
            await send(message)

        headers = dict(scope.get("headers") or [])
        if not _authorised(headers.get(b"authorization", b"").decode("latin-1") or None, self.token):
            self.metrics.inc("mcp_unauthorized")
            await _refuse(counted_send, 401, "missing or wrong bearer token")
            return
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            self.metrics.inc("mcp_too_large")
            await _refuse(counted_send, 413, f"request body of {int(length)} bytes is over {self.max_body_bytes}")
            return
        received = 0

        async def bounded_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    self.metrics.inc("mcp_too_large")
                    return {"type": "http.disconnect"}
            return message

        async def watched_send(message: dict) -> None:
            if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
                self.metrics.inc("mcp_rejected")
            await counted_send(message)

        try:
            await self.app(scope, bounded_receive, watched_send)
        except Exception:
            self.metrics.inc("mcp_internal_errors")
            log.exception("MCP gateway: %s %s failed", scope.get("method"), scope.get("path"))
            if started:  # too late for a status: the server closes the connection
                raise
            await _refuse(counted_send, 500, "gateway error")


async def serve_mcp_stdio(gateway: ToolGateway) -> None:
    """Serve MCP on this process' stdin/stdout until the client closes them."""
    from mcp.server.stdio import stdio_server

    server = mcp_server(gateway)
    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


@dataclass
class GatewayServers:
    """What `start_gateway` started; `stop()` ends all of it (not the gateway's clients)."""

    http_url: str | None = None
    mcp_url: str | None = None
    _runner: web.AppRunner | None = None
    _uvicorn: Any = None
    _uvicorn_task: asyncio.Task | None = None

    async def stop(self) -> None:
        if self._uvicorn is not None and self._uvicorn_task is not None:
            self._uvicorn.should_exit = True
            await self._uvicorn_task
        if self._runner is not None:
            await self._runner.cleanup()


async def start_gateway(gateway: ToolGateway, *, http: tuple[str, int] | None = ("127.0.0.1", 0),
                        mcp_http: tuple[str, int] | None = None, token: str | None = None,
                        max_body_bytes: int = MAX_BODY_BYTES) -> GatewayServers:
    """Start the JSON endpoint and/or MCP over Streamable HTTP (at /mcp) on this loop; port 0 picks one. Beyond
    loopback a bearer `token` is required."""
    servers = GatewayServers()
    if http is not None:
        require_token_beyond_loopback(f"tcp://{http[0]}:{http[1]}", token, "the HTTP gateway")
        servers._runner = web.AppRunner(http_app(gateway, token, max_body_bytes), access_log=None)
        await servers._runner.setup()
        await web.TCPSite(servers._runner, http[0], http[1]).start()
        host, port = servers._runner.addresses[0][:2]  # the chosen port when 0 was asked for
        servers.http_url = f"http://{host}:{port}"
    if mcp_http is not None:
        import uvicorn

        require_token_beyond_loopback(f"tcp://{mcp_http[0]}:{mcp_http[1]}", token, "the MCP gateway")
        app = _GuardASGI(mcp_server(gateway).streamable_http_app(host=mcp_http[0]), token or None, max_body_bytes,
                         gateway.metrics)
        config = uvicorn.Config(app, host=mcp_http[0], port=mcp_http[1], log_level="warning", lifespan="on")
        servers._uvicorn = uvicorn.Server(config)
        servers._uvicorn_task = asyncio.create_task(servers._uvicorn.serve(), name="mcp-http")
        while not servers._uvicorn.started:
            if servers._uvicorn_task.done():  # failed to bind: raise its error here
                await servers._uvicorn_task
                raise RuntimeError(f"MCP server on {mcp_http} stopped during start-up")
            await asyncio.sleep(0.01)
        host, port = servers._uvicorn.servers[0].sockets[0].getsockname()[:2]
        servers.mcp_url = f"http://{host}:{port}/mcp"
    return servers
