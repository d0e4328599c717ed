"""The gateway: JSON over HTTP (aiohttp) and MCP (official SDK as the client, Streamable HTTP and stdio) in front
of real tool servers on 127.0.0.1."""
from __future__ import annotations

import base64
import contextlib
import io
import os
import sys
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from protocol.images import encode_png
from tool_servers.backends.local_image import LocalImageSearch
from tool_servers.backends.local_text import LocalTextSearch
from tool_servers.errors import ToolCallError
from tool_servers.gateway import ToolGateway, start_gateway, wire_args
from tool_servers.server import ToolServer
from ts_helpers import FakeBackend, draw_entity, perturb, run

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def backends(image_corpus, text_corpus):
    return {"image_search": LocalImageSearch(image_corpus, top_k=2), "text_search": LocalTextSearch(text_corpus)}


@contextlib.asynccontextmanager
async def gateway_up(backends, *, token=None, mcp=False):
    server = ToolServer(backends)
    endpoint = await server.start()
    gateway = ToolGateway.from_endpoints({tool: [endpoint] for tool in backends}, deadline_s=5.0)
    servers = await start_gateway(gateway, mcp_http=("127.0.0.1", 0) if mcp else None, token=token)
    try:
        yield servers, server
    finally:
        await servers.stop()
        await gateway.close()
        await server.stop()


def b64_png(index: int) -> str:
    return base64.b64encode(encode_png(perturb(draw_entity(index), seed=index))).decode()


# ---------------------------------------------------------------- JSON over HTTP


def test_http_lists_and_calls_tools(backends):
    async def main():
        async with gateway_up(backends) as (servers, _), aiohttp.ClientSession(servers.http_url) as http:
            tools = (await (await http.get("/v1/tools")).json())["tools"]
            assert [t["name"] for t in tools] == ["image_search", "text_search"]
            assert tools[1]["input_schema"]["required"] == ["query"]
            response = await http.post("/v1/tools/text_search", json={"query": "who built the clock tower"})
            body = await response.json()
            assert response.status == 200 and body["ok"] and body["items"][0]["title"] == "Harrow"
            response = await http.post("/v1/tools/image_search", json={"image": "data:image/png;base64,"
                                                                                + b64_png(6)})
            body = await response.json()
            first = body["items"][0]
            assert first["title"] == "Entity 6" and first["mime_type"] == "image/png"
            with Image.open(io.BytesIO(base64.b64decode(first["image"]))) as thumb:
                assert thumb.format == "PNG"
            health = await (await http.get("/healthz")).json()
            assert health["ok"] and all(h["connected"] for h in health["tools"]["text_search"].values())
            stats = await (await http.get("/v1/stats")).json()
            assert stats["text_search"]["client"]["replies_ok"] == 1
            assert next(iter(stats["image_search"]["replicas"].values()))["replies_ok"] == 2  # one server, 2 tools
    run(main())


@pytest.mark.parametrize("path, body, status, code", [
    ("/v1/tools/text_search", {"query": ""}, 400, "bad_request"),
    ("/v1/tools/text_search", {"query": ["a"]}, 400, "bad_request"),
    ("/v1/tools/text_search", [1, 2], 400, "bad_request"),
    ("/v1/tools/image_search", {"image": "not base64!"}, 400, "bad_request"),
    ("/v1/tools/image_search", {"image": base64.b64encode(b"GIF89a junk").decode()}, 400, "bad_request"),
    ("/v1/tools/maps", {"query": "x"}, 404, "unknown_tool"),
    ("/v1/tools/text_search", b"{not json", 400, "bad_request"),
    # each of these was a bare, uncounted 500 until tests/faults/test_fuzz_listeners.py found it
    ("/v1/tools/text_search", b"[" * 50_000 + b"]" * 50_000, 400, "bad_request"),  # deeper than json recurses
    ("/v1/tools/text_search", b'{"query": ' + b"9" * 5000 + b"}", 400, "bad_request"),  # over 4,300 digits
    ("/v1/tools/text_search", {"query": 2**70}, 400, "bad_request"),  # no msgpack int holds it
    ("/v1/tools/text_search", b'{"query": "\\ud800"}', 400, "bad_request"),  # a lone surrogate: not UTF-8
])
def test_http_errors_keep_their_code(backends, path, body, status, code):
    async def main():
        async with gateway_up(backends) as (servers, _), aiohttp.ClientSession(servers.http_url) as http:
            kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
            response = await http.post(path, **kwargs)
            answer = await response.json()
            assert response.status == status and answer["ok"] is False and answer["error"]["code"] == code
            assert (await http.post("/v1/tools/text_search", json={"query": "otter"})).status == 200
            stats = await (await http.get("/v1/stats")).json()
            counted = {k: v for k, v in stats["gateway"].items() if k.startswith("http_status_") and v}
            assert counted == {f"http_status_{status}": 1, "http_status_200": 1}, counted  # /v1/stats: counted after
            assert stats["gateway"]["http_internal_errors"] == 0
    run(main())


def test_a_handler_bug_is_answered_500_and_counted(backends):
    class Broken(ToolGateway):
        async def call(self, tool, arguments):
            raise RuntimeError("a gateway bug")

    async def main():
        server = ToolServer(backends)
        endpoint = await server.start()
        gateway = Broken.from_endpoints({"text_search": [endpoint]}, deadline_s=5.0)
        servers = await start_gateway(gateway)
        try:
            async with aiohttp.ClientSession(servers.http_url) as http:
                response = await http.post("/v1/tools/text_search", json={"query": "otter"})
                answer = await response.json()
                assert response.status == 500 and answer["error"]["code"] == "backend_error"
                assert (await http.get("/v1/nothing")).status == 404
            snapshot = gateway.metrics.snapshot()
            assert snapshot["http_internal_errors"] == 1 and snapshot["http_status_500"] == 1
            assert snapshot["http_status_404"] == 1 and snapshot["http_requests"] == 2
        finally:
            await servers.stop()
            await gateway.close()
            await server.stop()
    run(main())


def test_http_token(backends):
    async def main():
        async with gateway_up(backends, token="gw-secret") as (servers, _), \
                aiohttp.ClientSession(servers.http_url) as http:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "gw-secret"}):
                response = await http.post("/v1/tools/text_search", json={"query": "otter"}, headers=headers)
                assert response.status == 401 and (await response.json())["error"]["code"] == "unauthorized"
            assert (await http.get("/healthz")).status == 200  # probes need no token
            ok = await http.post("/v1/tools/text_search", json={"query": "otter"},
                                 headers={"Authorization": "Bearer gw-secret"})
            assert ok.status == 200
    run(main())
    gateway = ToolGateway({})
    with pytest.raises(ValueError, match="requires a token"):
        run(start_gateway(gateway, http=("0.0.0.0", 0)))


def test_wire_args_decode_images_and_reject_structures():
    assert wire_args("image_search", {"image": base64.b64encode(b"abc").decode()}) == {"image": b"abc"}
    assert wire_args("text_search", {"query": "x", "k": 3}) == {"query": "x", "k": 3}
    for bad in ({"query": None}, {"query": {"a": 1}}, "text"):
        with pytest.raises(ToolCallError):
            wire_args("text_search", bad)


# ---------------------------------------------------------------- MCP


def test_mcp_over_streamable_http_with_the_sdk_client(backends):
    from mcp import Client
    from mcp.shared.exceptions import MCPError

    async def main():
        async with gateway_up(backends, mcp=True) as (servers, _):
            async with Client(servers.mcp_url) as client:
                tools = (await client.list_tools()).tools
                assert sorted(t.name for t in tools) == ["image_search", "text_search"]
                assert next(t for t in tools if t.name == "image_search").input_schema["properties"]["image"]
                text = await client.call_tool("text_search", {"query": "glassblower born 1742"})
                assert not text.is_error and text.content[0].type == "text"
                assert text.content[0].text.startswith("[1] Mirelle Tann")
                assert text.structured_content["items"][0]["title"] == "Mirelle Tann"
                image = await client.call_tool("image_search", {"image": b64_png(9)})
                kinds = [block.type for block in image.content]
                assert kinds == ["text", "image", "text", "image"] and "Entity 9" in image.content[0].text
                assert image.content[1].mime_type == "image/png" and base64.b64decode(image.content[1].data)
                bad = await client.call_tool("text_search", {"query": "   "})
                assert bad.is_error and bad.content[0].text.startswith("bad_request:")
                with pytest.raises(MCPError, match="unknown tool"):
                    await client.call_tool("maps", {"query": "x"})
            async with Client(servers.mcp_url, mode="legacy") as client:  # the initialize-handshake era
                result = await client.call_tool("text_search", {"query": "otter"})
                assert not result.is_error and "Pondle" in result.content[0].text
    run(main())


def test_mcp_tool_failures_are_is_error_results():
    from mcp import Client

    async def main():
        server = ToolServer({"fake": FakeBackend(fail="batch")})
        endpoint = await server.start()
        gateway = ToolGateway.from_endpoints({"fake": [endpoint]}, deadline_s=2.0)
        servers = await start_gateway(gateway, http=None, mcp_http=("127.0.0.1", 0))
        try:
            async with Client(servers.mcp_url) as client:
                tools = (await client.list_tools()).tools
                assert tools[0].name == "fake" and tools[0].input_schema == {"type": "object"}
                result = await client.call_tool("fake", {"query": "x"})
                assert result.is_error and "backend_error" in result.content[0].text
                assert "index file vanished" in result.content[0].text
        finally:
            await servers.stop()
            await gateway.close()
            await server.stop()
    run(main())


def test_mcp_over_stdio_from_the_cli(backends):
    from mcp import Client, StdioServerParameters

    async def main():
        server = ToolServer(backends)
        endpoint = await server.start()
        try:
            params = StdioServerParameters(
                command=sys.executable, cwd=str(REPO),
                args=["-m", "tool_servers", "--log-level", "WARNING", "mcp", "--endpoint", f"text_search={endpoint}"],
                env={**os.environ, "PYTHONPATH": str(REPO)})
            async with Client(params) as client:
                assert [t.name for t in (await client.list_tools()).tools] == ["text_search"]
                result = await client.call_tool("text_search", {"query": "otter"})
                assert not result.is_error and "Pondle" in result.content[0].text
        finally:
            await server.stop()
    run(main())
