"""Standalone search services for forage's tools (image_search, text_search) over ZeroMQ + msgpack.

Imports only `protocol/` of forage; runs alone with `python -m tool_servers serve ...`.
"""
from tool_servers.backends import Backend, build_backend
from tool_servers.client import SyncToolClient, ToolClient
from tool_servers.errors import ToolCallError
from tool_servers.limits import ServerLimits
from tool_servers.server import ToolServer, ToolServerRole

__all__ = [
    "Backend", "ServerLimits", "SyncToolClient", "ToolCallError", "ToolClient", "ToolServer", "ToolServerRole",
    "build_backend",
]
