"""A simulated, latency-bound backend for benchmarks and fault tests: it sleeps, then echoes the query.

It stands in for a backend whose cost is waiting (a remote API, a busy accelerator), so replica scaling and
failover can be measured without a real one. Requests in a batch are served one after another (`latency_ms`
each), so one replica answers at most 1000 / latency_ms requests per second.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from protocol import ToolItem
from tool_servers.backends.base import BatchResult
from tool_servers.cache import content_hash
from tool_servers.errors import ToolCallError


class SimulatedSearch:
    """Echo backend: `{"query": str}` or `{"image": bytes}` -> `top_k` items titled after the argument."""

    def __init__(self, tool: str, latency_ms: float = 50.0, top_k: int = 1, text_chars: int = 64) -> None:
        if latency_ms < 0 or top_k < 1 or text_chars < 0:
            raise ValueError(f"need latency_ms >= 0, top_k >= 1, text_chars >= 0; got {latency_ms}, {top_k}, "
                             f"{text_chars}")
        self.name = tool
        self.latency_s = latency_ms / 1000.0
        self.top_k = top_k
        self.text = "x" * text_chars

    def validate(self, args: Mapping[str, Any]) -> None:
        if set(args) not in ({"query"}, {"image"}):
            raise ToolCallError("bad_request", f"simulated {self.name} takes 'query' or 'image', got {sorted(args)}")
        value = next(iter(args.values()))
        if not isinstance(value, (str, bytes)) or not value:
            raise ToolCallError("bad_request", f"simulated {self.name}: empty or non-str/bytes argument")

    def search_batch(self, batch: list[Mapping[str, Any]]) -> list[BatchResult]:
        results: list[BatchResult] = []
        for args in batch:
            if self.latency_s:  # sleep(0) is not free: it hands the GIL away
                time.sleep(self.latency_s)
            try:
                self.validate(args)
            except ToolCallError as exc:
                results.append(exc)
                continue
            value = next(iter(args.values()))
            title = value if isinstance(value, str) else f"image {content_hash(value)[:12]}"
            results.append([ToolItem(title=title, url=f"sim://{self.name}/{k}", text=self.text)
                            for k in range(self.top_k)])
        return results

    def close(self) -> None:
        pass
