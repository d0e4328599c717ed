"""Search backends and the factory that builds one from a conf/tool_servers section."""
from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Mapping
from typing import Any

from tool_servers.backends.base import Backend, BatchResult

log = logging.getLogger(__name__)

# Tool name on the wire -> its section in conf/tool_servers/*.yaml.
TOOL_SECTIONS: dict[str, str] = {"image_search": "image", "text_search": "text"}
# Keys of a tool section that describe the deployment, not the backend's constructor.
DEPLOYMENT_KEYS = frozenset({"backend", "replicas", "cache", "latency"})
# backend kind -> what it is; every kind serves both tools.
BACKEND_KINDS: dict[str, str] = {
    "local": "offline indexes: faiss over image embeddings; BM25 (bm25s) or dense text over a JSONL corpus",
    "web": "SerpAPI Google Lens for images; SerpAPI/Serper search + page reader + summariser for text",
    "simulated": "sleeps latency_ms per request and echoes the query (benchmarks, fault tests)",
}


def _backend_class(tool: str, kind: str) -> type:
    if kind == "local":
        if tool == "image_search":
            from tool_servers.backends.local_image import LocalImageSearch
            return LocalImageSearch
        from tool_servers.backends.local_text import LocalTextSearch
        return LocalTextSearch
    if kind == "web":
        from tool_servers.backends.web import WebImageSearch, WebTextSearch
        return WebImageSearch if tool == "image_search" else WebTextSearch
    from tool_servers.backends.simulated import SimulatedSearch
    return SimulatedSearch


def build_backend(tool: str, cfg: Mapping[str, Any]) -> Backend:
    """Build the backend for `tool` ("image_search" | "text_search") from its config section.

    `cfg` holds `backend` (one of BACKEND_KINDS; default "local") and the backend's knobs; `replicas`, `cache`
    and `latency` are for the server (see ToolServerRole). Local backends need `corpus` (a path); the others ignore
    a `corpus` key, since launch.py fills it in for every kind. Unknown knobs raise ValueError naming them.
    """
    cfg = dict(cfg)
    kind = cfg.get("backend", "local")
    if tool not in TOOL_SECTIONS:
        raise ValueError(f"unknown tool {tool!r}; expected one of {sorted(TOOL_SECTIONS)}")
    if kind not in BACKEND_KINDS:
        raise ValueError(f"unknown backend {kind!r} for {tool}; available: {sorted(BACKEND_KINDS)}")
    cls = _backend_class(tool, kind)
    knobs = {key: value for key, value in cfg.items() if key not in DEPLOYMENT_KEYS}
    if kind == "local" and knobs.get("corpus") is None:
        raise ValueError(
            f"{tool}: corpus is null; launch.py fills it from the data world, or pass a path when running alone"
        )
    if kind != "local":
        knobs.pop("corpus", None)
    parameters = inspect.signature(cls).parameters
    accepted = {name for name, p in parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):  # web: HTTP limit knobs
        from tool_servers.backends.web import HttpLimits
        accepted |= {field.name for field in dataclasses.fields(HttpLimits)}
    accepted.discard("tool")
    accepted.discard("image_embedder")  # an object, for code that builds backends itself
    unknown = sorted(set(knobs) - accepted)
    if unknown:
        raise ValueError(f"unknown knobs {unknown} for {tool} backend {kind!r}; accepted: {sorted(accepted)}")
    if kind == "simulated":
        return cls(tool, **knobs)
    return cls(**knobs)


__all__ = ["BACKEND_KINDS", "Backend", "BatchResult", "DEPLOYMENT_KEYS", "TOOL_SECTIONS", "build_backend"]
