"""The codec round-trips every message and turns hostile frames into one clear ProtocolError."""
from __future__ import annotations

import msgspec
import numpy as np
import pytest

from protocol import (
    AdmissionReply,
    AdmissionRequest,
    GroupAck,
    LearnerInbound,
    LearnerOutbound,
    NamedArray,
    NDArray,
    ProtocolError,
    ToolInbound,
    ToolItem,
    ToolOutbound,
    ToolReply,
    ToolRequest,
    Trajectory,
    TrajectoryGroup,
    WeightBucket,
    WeightQuery,
    decode,
    encode,
    from_ndarray,
    to_ndarray,
)


def _trajectory(length: int = 6) -> Trajectory:
    return Trajectory(
        token_ids=to_ndarray(np.arange(length, dtype=np.int32)),
        loss_mask=to_ndarray(np.array([0, 0, 1, 1, 0, 1][:length], dtype=np.uint8)),
        behaviour_logprobs=to_ndarray(np.linspace(-1, 0, length, dtype=np.float32)),
        versions=to_ndarray(np.array([-1, -1, 0, 0, -1, 1][:length], dtype=np.int32)),
        images=[b"\x89PNG fake"],
        reward=0.91,
        reward_parts={"accuracy": 1.0, "format": 1.0},
        image_searches=1,
        finish_reason="answer",
    )


def test_trajectory_group_round_trips_with_exact_arrays():
    group = TrajectoryGroup(group_id="g1", actor_id="a0", prompt_id="q7", trajectories=[_trajectory()])
    back = decode(encode(group), LearnerInbound)
    assert isinstance(back, TrajectoryGroup)
    traj = back.trajectories[0]
    np.testing.assert_array_equal(from_ndarray(traj.token_ids), np.arange(6, dtype=np.int32))
    np.testing.assert_array_equal(from_ndarray(traj.versions), [-1, -1, 0, 0, -1, 1])
    assert from_ndarray(traj.behaviour_logprobs).dtype == np.float32
    assert traj.images == [b"\x89PNG fake"] and traj.reward == pytest.approx(0.91)


class OldTrajectory(msgspec.Struct, kw_only=True):
    """Trajectory as a reader from before `tool_failed` declared it (fields abridged)."""

    token_ids: NDArray
    loss_mask: NDArray
    behaviour_logprobs: NDArray
    versions: NDArray
    reward: float = 0.0


class OldGroup(msgspec.Struct, tag_field="type", tag="group", kw_only=True):
    v: int
    group_id: str
    actor_id: str
    prompt_id: str
    trajectories: list[OldTrajectory] = []


def test_the_tool_failed_flag_round_trips_and_old_groups_decode_without_it():
    """Trajectory.tool_failed is optional: a group sent before the field existed (a journal, a spool, an older
    actor) decodes with it False, and an older reader ignores it (unknown fields are allowed)."""
    flagged = msgspec.structs.replace(_trajectory(), tool_failed=True, finish_reason="tool_failed")
    group = TrajectoryGroup(group_id="g1", actor_id="a0", prompt_id="q7", trajectories=[_trajectory(), flagged])
    back = decode(encode(group), LearnerInbound)
    assert [t.tool_failed for t in back.trajectories] == [False, True]

    old = msgspec.msgpack.decode(encode(group))
    for traj in old["trajectories"]:
        del traj["tool_failed"]  # what an actor of the previous release sends
    back = decode(msgspec.msgpack.encode(old), LearnerInbound)
    assert [t.tool_failed for t in back.trajectories] == [False, False]
    assert back.trajectories[1].finish_reason == "tool_failed"  # everything else as sent

    read_by_old = msgspec.msgpack.decode(encode(group), type=OldGroup)
    assert [t.reward for t in read_by_old.trajectories] == [pytest.approx(0.91)] * 2


@pytest.mark.parametrize(
    "message, union",
    [
        (AdmissionRequest(actor_id="a", request_id="r"), LearnerInbound),
        (WeightQuery(actor_id="a", have_version=3), LearnerInbound),
        (GroupAck(group_id="g", accepted=True), LearnerOutbound),
        (AdmissionReply(request_id="r", granted=False, version=2, retry_after_ms=50), LearnerOutbound),
        (ToolRequest(id="1", tool="text_search", args={"query": "q"}), ToolInbound),
        (ToolReply(id="1", ok=True, items=[ToolItem(title="t", image=b"x")]), ToolOutbound),
    ],
)
def test_every_message_round_trips_through_its_union(message, union):
    assert decode(encode(message), union) == message


def test_weight_bucket_keeps_values_and_bf16_bits():
    weights = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    bits = np.array([0x3F80, 0xC000], dtype=np.uint16)
    bucket = WeightBucket(version=2, index=0, num_buckets=1, tensors=[
        NamedArray(name="w", array=to_ndarray(weights)),
        NamedArray(name="b", array=to_ndarray(bits, dtype="bfloat16")),
    ])
    back = decode(encode(bucket), LearnerOutbound)
    np.testing.assert_array_equal(from_ndarray(back.tensors[0].array), weights)
    np.testing.assert_array_equal(from_ndarray(back.tensors[1].array), bits)


HOSTILE = {
    "garbage": b"\xc1\xff\x00garbage",
    "empty": b"",
    "not a map": msgspec.msgpack.encode([1, 2, 3]),
    "unknown type tag": msgspec.msgpack.encode({"type": "launch_missiles", "v": 1}),
    "missing field": msgspec.msgpack.encode({"type": "admission_request", "v": 1, "actor_id": "a"}),
    "wrong field type": msgspec.msgpack.encode({"type": "weight_query", "v": 1, "actor_id": "a", "have_version": "3"}),
    "non-utf8 string": b"\x83\xa4type\xb1admission_request\xa8actor_id\xa2\xff\xfe\xaarequest_id\xa1r",
    "unknown version": encode(AdmissionRequest(actor_id="a", request_id="r", v=99)),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_frames_raise_protocol_error(name):
    with pytest.raises(ProtocolError):
        decode(HOSTILE[name], LearnerInbound)


def test_truncated_frame_raises_protocol_error():
    frame = encode(TrajectoryGroup(group_id="g", actor_id="a", prompt_id="p", trajectories=[_trajectory()]))
    for cut in (1, len(frame) // 2, len(frame) - 1):
        with pytest.raises(ProtocolError, match="truncated|invalid|undecodable"):
            decode(frame[:cut], LearnerInbound)


def test_oversized_frame_is_rejected_before_decoding():
    frame = encode(ToolRequest(id="1", tool="text_search", args={"query": "x" * 2000}))
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode(frame, ToolInbound, max_frame_bytes=1024)


def test_array_whose_bytes_do_not_match_its_shape_is_rejected():
    traj = _trajectory()
    traj.token_ids = NDArray(dtype="int32", shape=[1000], data=b"\x00" * 8)
    frame = encode(TrajectoryGroup(group_id="g", actor_id="a", prompt_id="p", trajectories=[traj]))
    with pytest.raises(ProtocolError, match="token_ids: 8 bytes for shape"):
        decode(frame, LearnerInbound)


def test_oversized_array_is_rejected_by_element_count():
    bucket = WeightBucket(version=1, index=0, num_buckets=1,
                          tensors=[NamedArray(name="w", array=to_ndarray(np.zeros(100, np.float32)))])
    with pytest.raises(ProtocolError, match="exceeds the limit of 10"):
        decode(encode(bucket), LearnerOutbound, max_array_elements=10)


def test_per_token_arrays_of_different_lengths_are_rejected():
    traj = _trajectory()
    traj.loss_mask = to_ndarray(np.ones(5, dtype=np.uint8))
    frame = encode(TrajectoryGroup(group_id="g", actor_id="a", prompt_id="p", trajectories=[traj]))
    with pytest.raises(ProtocolError, match="differ in length"):
        decode(frame, LearnerInbound)


def test_unknown_dtype_and_bucket_index_are_rejected():
    bad_dtype = WeightBucket(version=1, index=0, num_buckets=1,
                             tensors=[NamedArray(name="w", array=NDArray(dtype="object", shape=[1], data=b"x"))])
    with pytest.raises(ProtocolError, match="unknown dtype"):
        decode(encode(bad_dtype), LearnerOutbound)
    bad_index = WeightBucket(version=1, index=3, num_buckets=2, tensors=[])
    with pytest.raises(ProtocolError, match="bucket index 3"):
        decode(encode(bad_index), LearnerOutbound)


def test_to_ndarray_refuses_dtypes_that_cannot_cross():
    with pytest.raises(ProtocolError, match="cannot cross the wire"):
        to_ndarray(np.array(["a", "b"]))
