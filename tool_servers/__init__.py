"""Standalone search services for forage's tools (image_search, text_search) over ZeroMQ + msgpack.

Imports only `protocol/` of forage; runs alone with `python -m tool_servers serve ...`. Imports nothing on import, so
that a client (actors: `tool_servers.client`, `tool_servers.errors`, `tool_servers.discovery` — the client library)
does not load the servers, their backends or the HTTP/MCP gateway (`tool_servers.gateway`, aiohttp + the mcp SDK).
"""
