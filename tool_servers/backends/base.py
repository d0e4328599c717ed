"""The `Backend` interface every search engine behind a tool server implements (local, web, simulated)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, Union, runtime_checkable

from protocol import ToolItem

# What one request's search_batch slot holds: its hits, or the exception that failed it alone
# (a ToolCallError keeps its code; anything else is reported as `backend_error`).
BatchResult = Union[list[ToolItem], BaseException]


@runtime_checkable
class Backend(Protocol):
    """A search engine for one tool.

    `validate` runs on the server's event loop before a request is queued, so it must be cheap (types,
    emptiness); `search_batch` runs in an executor thread with a micro-batch of already-validated args and
    returns one entry per request, in order.
    """

    name: str

    def validate(self, args: Mapping[str, Any]) -> None:
        """Raise ToolCallError (usually bad_request) when `args` cannot be a request for this tool."""
        ...

    def search_batch(self, batch: list[Mapping[str, Any]]) -> list[BatchResult]:
        """Hits per request, or a per-request exception; raising fails the whole batch with backend_error."""
        ...

    def close(self) -> None:
        """Release files, sessions or threads; the server calls it once after its last batch."""
        ...


# Optional: a backend may also define `stats() -> dict[str, float]` (its own counters, e.g. HTTP retries);
# the server merges them into its stats as `<tool>_<name>`.
