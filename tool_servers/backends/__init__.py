"""Search backends and the factory that builds one from a conf/tool_servers section."""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from tool_servers.backends.base import Backend, BatchResult

# Tool name on the wire -> its section in conf/tool_servers/*.yaml.
TOOL_SECTIONS: dict[str, str] = {"image_search": "image", "text_search": "text"}
# Keys of a tool section that describe the deployment, not the backend's constructor.
DEPLOYMENT_KEYS = frozenset({"backend", "replicas"})


def build_backend(tool: str, cfg: Mapping[str, Any]) -> Backend:
    """Build the backend for `tool` ("image_search" | "text_search") from its config section.

    `cfg` holds `backend` (only "local" so far), `corpus` (a path) and the backend's knobs; `replicas` is
    ignored here. Unknown knobs and a null corpus raise ValueError naming them.
    """
    cfg = dict(cfg)
    kind = cfg.get("backend", "local")
    if tool not in TOOL_SECTIONS:
        raise ValueError(f"unknown tool {tool!r}; expected one of {sorted(TOOL_SECTIONS)}")
    if kind != "local":
        raise ValueError(f"unknown backend {kind!r} for {tool}; available: ['local']")
    if tool == "image_search":
        from tool_servers.backends.local_image import LocalImageSearch as cls
    else:
        from tool_servers.backends.local_text import LocalTextSearch as cls
    knobs = {key: value for key, value in cfg.items() if key not in DEPLOYMENT_KEYS}
    if knobs.get("corpus") is None:
        raise ValueError(
            f"{tool}: corpus is null; launch.py fills it from the data world, or pass a path when running alone"
        )
    accepted = set(inspect.signature(cls).parameters)
    unknown = sorted(set(knobs) - accepted)
    if unknown:
        raise ValueError(f"unknown knobs {unknown} for {tool} backend {kind!r}; accepted: {sorted(accepted)}")
    return cls(**knobs)


__all__ = ["Backend", "BatchResult", "DEPLOYMENT_KEYS", "TOOL_SECTIONS", "build_backend"]
