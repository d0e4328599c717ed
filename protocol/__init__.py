"""forage's shared vocabulary: message structs, the msgpack codec, wire arrays and ZMQ socket helpers.

Imports nothing else of forage; every other package imports it (the ground floor, docs/architecture.md).
"""
from protocol.arrays import check_ndarray, from_ndarray, to_ndarray
from protocol.codec import decode, encode
from protocol.errors import ProtocolError
from protocol.messages import (
    ERROR_CODES,
    PROTOCOL_VERSION,
    AdmissionRelease,
    AdmissionReply,
    AdmissionRequest,
    ErrorReply,
    GroupAck,
    LearnerInbound,
    LearnerOutbound,
    NamedArray,
    NDArray,
    StatsReply,
    StatsRequest,
    ToolError,
    ToolInbound,
    ToolItem,
    ToolOutbound,
    ToolReply,
    ToolRequest,
    Trajectory,
    TrajectoryGroup,
    WeightAnnounce,
    WeightBucket,
    WeightNone,
    WeightQuery,
)

__all__ = [
    "ERROR_CODES", "PROTOCOL_VERSION", "AdmissionRelease", "AdmissionReply", "AdmissionRequest", "ErrorReply", "GroupAck",
    "LearnerInbound", "LearnerOutbound", "NDArray", "NamedArray", "ProtocolError", "StatsReply", "StatsRequest",
    "ToolError", "ToolInbound", "ToolItem", "ToolOutbound", "ToolReply", "ToolRequest", "Trajectory",
    "TrajectoryGroup", "WeightAnnounce", "WeightBucket", "WeightNone", "WeightQuery", "check_ndarray", "decode",
    "encode", "from_ndarray", "to_ndarray",
]
