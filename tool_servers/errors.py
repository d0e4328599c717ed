"""The one exception of tool calls: a closed-set error code (protocol.ERROR_CODES) plus a human message.

Backends raise it to reject one request with a specific code; the client raises it for error replies and
for calls that got no reply by their deadline.
"""
from __future__ import annotations

from protocol import ERROR_CODES


class ToolCallError(Exception):
    """A tool call failed with `code` (one of protocol.ERROR_CODES)."""

    def __init__(self, code: str, message: str) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown tool error code {code!r}; expected one of {ERROR_CODES}")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def __reduce__(self):  # keep (code, message) through pickling, e.g. across Ray
        return (type(self), (self.code, self.message))
