"""The one exception of tool calls: a closed-set error code (protocol.ERROR_CODES) plus a human message.

Backends raise it to reject one request with a specific code; the client raises it for error replies and
for calls that got no reply by their deadline. `infrastructure` tells an outage from a rejected request.
"""
from __future__ import annotations

from protocol import ERROR_CODES

# The call failed for reasons outside the request: no reply by the deadline (every replica down or hung), a full
# queue, a failing backend (a snapshot miss included), a token or tool the deployment lacks. The same request may
# succeed once the service is back, so an episode cut by one says nothing about the model (actors mark it
# tool_failed). The other codes (bad_request, too_large) reject the request itself: the model's call was malformed.
INFRASTRUCTURE_CODES = frozenset({"timeout", "overloaded", "backend_error", "unauthorized", "unknown_tool"})
REQUEST_CODES = frozenset(ERROR_CODES) - INFRASTRUCTURE_CODES


class ToolCallError(Exception):
    """A tool call failed with `code` (one of protocol.ERROR_CODES)."""

    def __init__(self, code: str, message: str) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown tool error code {code!r}; expected one of {ERROR_CODES}")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def infrastructure(self) -> bool:
        """True when the tool's service failed (INFRASTRUCTURE_CODES), False when the request was rejected."""
        return self.code in INFRASTRUCTURE_CODES

    def __reduce__(self):  # keep (code, message) through pickling, e.g. across Ray
        return (type(self), (self.code, self.message))
