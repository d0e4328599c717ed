"""What a tool server accepts: the `ServerLimits` knobs and the cheap argument checks run before queueing.

The checks here read at most an image header, so they run on the event loop; anything heavier belongs to the
backend's `search_batch`, which runs in an executor.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from protocol import images
from tool_servers.errors import ToolCallError

ARG_TYPES = (str, bytes, int, float, bool)


@dataclass(frozen=True)
class ServerLimits:
    """Per-server limits; every field is a knob of conf/tool_servers/*.yaml `limits:`."""

    max_frame_bytes: int = 8 * 1024 * 1024  # bigger frames are read, then answered `too_large`
    hard_frame_bytes: int = 256 * 1024 * 1024  # bigger frames are never read: ZMQ drops the connection, no reply
    max_image_pixels: int = 4096 * 4096  # width x height of an `image` argument, read from its header
    max_query_chars: int = 1024  # longest string argument
    max_queue: int = 256  # requests waiting per tool before new ones get `overloaded`
    max_batch: int = 32  # most requests handed to one `search_batch` call
    max_concurrent_batches: int = 1  # executor threads per tool (raise for I/O-bound backends)
    max_deadline_ms: int = 600_000  # a request's deadline_ms above this is a `bad_request`
    reply_margin_ms: float = 5.0  # send `timeout` this long before the deadline so it arrives in time

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ServerLimits.{field.name} must be a non-negative number, got {value!r}")
        for name in ("max_frame_bytes", "hard_frame_bytes", "max_image_pixels", "max_query_chars", "max_queue",
                     "max_batch", "max_concurrent_batches", "max_deadline_ms"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServerLimits.{name} must be >= 1, got {getattr(self, name)!r}")

    @property
    def socket_max_frame_bytes(self) -> int:
        """The cap given to ZMQ (never below max_frame_bytes): frames above it close the connection, no reply."""
        return max(self.hard_frame_bytes, self.max_frame_bytes)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "ServerLimits":
        """Build from a config mapping, rejecting unknown keys (typos) by name."""
        values = dict(values or {})
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown tool server limits {unknown}; known: {sorted(known)}")
        return cls(**values)


def image_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) of encoded image bytes from the header alone; bad_request/too_large ToolCallError."""
    try:
        width, height = images.image_size(data)
    except images.ImageError as exc:
        raise ToolCallError("too_large" if exc.too_large else "bad_request", str(exc)) from exc
    if width * height > max_pixels:
        raise ToolCallError(
            "too_large", f"image of {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
        )
    return width, height


def check_args(args: Mapping[str, Any], limits: ServerLimits) -> None:
    """Reject arguments of the wrong type or over the limits (raises ToolCallError)."""
    for name, value in args.items():
        # msgspec does not enforce ToolRequest.args' value union, so None, lists and maps arrive here.
        if not isinstance(value, ARG_TYPES):
            raise ToolCallError(
                "bad_request", f"argument {name!r} has type {type(value).__name__}; expected str, bytes or a number"
            )
        if isinstance(value, str) and len(value) > limits.max_query_chars:
            raise ToolCallError(
                "too_large", f"argument {name!r} has {len(value)} characters; the limit is {limits.max_query_chars}"
            )
    image = args.get("image")
    if isinstance(image, bytes):
        image_size(image, limits.max_image_pixels)
