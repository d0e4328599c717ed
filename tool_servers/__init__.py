"""Standalone search services for forage's tools (image_search, text_search) over ZeroMQ + msgpack.

Imports only `protocol/` of forage; runs alone with `python -m tool_servers serve ...`. The HTTP/MCP gateway
lives in `tool_servers.gateway` (imported on demand: it pulls in aiohttp and the mcp SDK).
"""
from tool_servers.backends import Backend, build_backend
from tool_servers.cache import CacheConfig, ResultCache
from tool_servers.client import SyncToolClient, ToolClient
from tool_servers.errors import ToolCallError
from tool_servers.limits import ServerLimits
from tool_servers.server import ToolServer, ToolServerRole

__all__ = [
    "Backend", "CacheConfig", "ResultCache", "ServerLimits", "SyncToolClient", "ToolCallError", "ToolClient",
    "ToolServer", "ToolServerRole", "build_backend",
]
