"""msgpack encoding and validated decoding of forage messages.

`decode(frame, Union[...])` is the only way bytes from a socket become a message: it enforces the frame-size
limit, msgspec's type validation, the protocol version and per-message invariants (array sizes, matching
per-token lengths) and turns every failure into one `ProtocolError` naming what was wrong.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, TypeVar

import msgspec

from protocol.arrays import DEFAULT_MAX_ELEMENTS, check_ndarray
from protocol.errors import ProtocolError
from protocol.messages import PROTOCOL_VERSION, Message, TrajectoryGroup, WeightBucket

DEFAULT_MAX_FRAME_BYTES = 256 * 1024 * 1024

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()


def encode(message: Message) -> bytes:
    """Serialise a message to msgpack bytes."""
    return _encoder.encode(message)


@lru_cache(maxsize=None)
def _decoder(kind: Any) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(kind)


def decode(
    frame: bytes | memoryview,
    kind: type[T] | Any,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    max_array_elements: int = DEFAULT_MAX_ELEMENTS,
) -> T:
    """Decode one frame as `kind` (a Message subclass or a Union of them) or raise ProtocolError."""
    if len(frame) > max_frame_bytes:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the limit of {max_frame_bytes}")
    try:
        message = _decoder(kind).decode(frame)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid message: {exc}") from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"undecodable frame ({len(frame)} bytes): {exc}") from exc
    if message.v != PROTOCOL_VERSION:
        raise ProtocolError(
            f"{type(message).__name__} has protocol version {message.v}; this peer speaks {PROTOCOL_VERSION}"
        )
    _validate(message, max_array_elements)
    return message


def _validate(message: Message, max_elements: int) -> None:
    if isinstance(message, TrajectoryGroup):
        for i, traj in enumerate(message.trajectories):
            where = f"group {message.group_id} trajectory {i}"
            lengths = set()
            for name in ("token_ids", "loss_mask", "behaviour_logprobs", "versions"):
                array = getattr(traj, name)
                lengths.add(check_ndarray(array, max_elements, f"{where} {name}"))
                if len(array.shape) != 1:
                    raise ProtocolError(f"{where} {name}: expected a 1-D array, got shape {array.shape}")
            if len(lengths) != 1:
                raise ProtocolError(f"{where}: per-token arrays differ in length {sorted(lengths)}")
    elif isinstance(message, WeightBucket):
        if not 0 <= message.index < message.num_buckets:
            raise ProtocolError(f"weight bucket index {message.index} outside 0..{message.num_buckets - 1}")
        for named in message.tensors:
            check_ndarray(named.array, max_elements, f"weight {named.name}")
            if named.total_rows or named.row_offset:
                rows = named.array.shape[0] if named.array.shape else -1
                if named.row_offset < 0 or rows < 1 or named.row_offset + rows > named.total_rows:
                    raise ProtocolError(
                        f"weight {named.name}: chunk rows [{named.row_offset}, {named.row_offset + rows}) outside "
                        f"[0, {named.total_rows})"
                    )
