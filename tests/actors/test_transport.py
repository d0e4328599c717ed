"""The actor's learner link against a small fake learner ROUTER: admissions, acks, resends, weight buckets."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from actors.config import TransportConfig
from actors.transport import LearnerLink, TransportClosed
from actors_helpers import FakeLearner, weight_buckets
from protocol import (AdmissionRelease, AdmissionReply, AdmissionRequest, ErrorReply, GroupAck, ProtocolError,
                      TrajectoryGroup, WeightAnnounce, WeightBucket, WeightNone, WeightQuery)

FAST = TransportConfig(reply_timeout_s=0.2, max_backoff_s=0.4, weight_timeout_s=1.0)


def _group(gid: str = "g1") -> TrajectoryGroup:
    return TrajectoryGroup(group_id=gid, actor_id="a0", prompt_id="q1")


def _link(traj: str, weights: str | None = None, cfg: TransportConfig = FAST) -> LearnerLink:
    return LearnerLink("a0", {"trajectories": traj, "weights": weights or traj}, cfg)


def test_admission_is_answered_and_resent_when_unanswered():
    async def main():
        seen = []

        def policy(m):
            seen.append(m)
            if len(seen) == 1:
                return []  # the first request gets lost
            return [b"\x00garbage", AdmissionReply(request_id="someone-else", granted=True, version=9),
                    AdmissionReply(request_id=m.request_id, granted=True, version=5)]

        learner = FakeLearner(policy)
        link = _link(learner.endpoint)
        reply = await asyncio.wait_for(link.request_admission(), 5)
        assert reply.granted and reply.version == 5
        assert len(seen) == 2 and all(isinstance(m, AdmissionRequest) for m in seen)
        assert seen[0].request_id == seen[1].request_id  # a resend, not a second request
        await asyncio.sleep(0.05)
        m = link.metrics.snapshot()
        assert m["admission_timeouts"] == 1 and m["bad_frames"] == 1 and m["late_replies"] == 1
        await link.close()
        await learner.close()

    asyncio.run(main())


def test_denied_admission_is_returned_with_its_retry_hint():
    async def main():
        learner = FakeLearner(lambda m: [AdmissionReply(request_id=m.request_id, granted=False, version=2,
                                                        retry_after_ms=250, stopping=False)])
        link = _link(learner.endpoint)
        reply = await asyncio.wait_for(link.request_admission(), 5)
        assert not reply.granted and reply.retry_after_ms == 250
        await link.close()
        await learner.close()

    asyncio.run(main())


def test_group_is_resent_until_acked():
    async def main():
        sends = []

        def policy(m):
            sends.append(m)
            return [] if len(sends) < 3 else [GroupAck(group_id="other", accepted=True),
                                               GroupAck(group_id=m.group_id, accepted=True)]

        learner = FakeLearner(policy)
        link = _link(learner.endpoint)
        ack = await asyncio.wait_for(link.send_group(_group("g7")), 10)
        assert ack.accepted and ack.group_id == "g7"
        assert [m.group_id for m in sends] == ["g7"] * 3
        assert link.metrics.counter("group_resends") == 2 and link.unacked == 0
        await link.close()
        await learner.close()

    asyncio.run(main())


def test_unacked_group_is_resent_right_after_the_learner_comes_back():
    async def main():
        first = FakeLearner(lambda m: [])  # receives the group, never acks, then dies
        endpoint = first.endpoint
        link = _link(endpoint, cfg=TransportConfig(reply_timeout_s=30.0, max_backoff_s=30.0))
        sending = asyncio.create_task(link.send_group(_group("g9")))
        for _ in range(100):
            if first.received:
                break
            await asyncio.sleep(0.02)
        assert [m.group_id for m in first.received] == ["g9"]
        await first.close()
        await asyncio.sleep(0.3)
        second = FakeLearner(lambda m: [GroupAck(group_id=m.group_id, accepted=True, duplicate=True)], endpoint)
        ack = await asyncio.wait_for(sending, 10)  # far sooner than the 30 s reply timeout
        assert ack.duplicate and [m.group_id for m in second.received] == ["g9"]
        assert link.metrics.counter("reconnects") >= 1
        await link.close()
        await second.close()

    asyncio.run(main())


def test_close_wakes_waiters():
    async def main():
        learner = FakeLearner(lambda m: [])
        link = _link(learner.endpoint)
        waiting = asyncio.create_task(link.send_group(_group()))
        await asyncio.sleep(0.1)
        await link.close()
        with pytest.raises(TransportClosed):
            await waiting
        with pytest.raises(TransportClosed):
            await link.request_admission()
        await learner.close()

    asyncio.run(main())


def test_weights_none_and_bucket_reassembly():
    tensors = {"model.a.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
               "model.b.bias": np.array([0.5, -1.25], dtype=np.float64),
               "model.c.bf16": np.array([1.0, -2.0, 0.15625], dtype=np.float32)}

    async def main():
        def policy(m: WeightQuery):
            if m.have_version >= 4:
                return [WeightNone(version=4)]
            buckets = weight_buckets(4, tensors)
            return [*weight_buckets(3, tensors)[:1], buckets[2], buckets[0], buckets[1]]  # stale + out of order

        learner = FakeLearner(policy)
        link = _link(learner.endpoint)
        assert await link.poll_weights(4) is None
        update = await link.poll_weights(1)
        assert update.version == 4 and update.transport == "zmq" and set(update.state) == set(tensors)
        state = update.state
        assert torch.equal(state["model.a.weight"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
        assert state["model.b.bias"].dtype == torch.float64 and state["model.b.bias"].tolist() == [0.5, -1.25]
        assert state["model.c.bf16"].dtype == torch.bfloat16  # bf16 stays bf16 (the engine casts on staging)
        assert state["model.c.bf16"].float().tolist() == [1.0, -2.0, 0.15625]
        await link.close()
        await learner.close()

    asyncio.run(main())


def test_tensors_larger_than_a_bucket_arrive_as_row_chunks():
    big = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    tensors = {"model.embed.weight": big, "model.norm.bf16": np.linspace(-1, 1, 5).astype(np.float32)}
    buckets = weight_buckets(2, tensors, chunk_rows=3)  # 7 rows -> 3 + 3 + 1, 5 rows (bf16) -> 3 + 2: 5 buckets
    assert [t.total_rows for b in buckets for t in b.tensors] == [7, 7, 7, 5, 5]

    async def main():
        learner = FakeLearner(lambda m: list(reversed(buckets)))
        link = _link(learner.endpoint)
        update = await link.poll_weights(0)
        assert torch.equal(update.state["model.embed.weight"], torch.from_numpy(big))
        norm = update.state["model.norm.bf16"]
        assert norm.dtype == torch.bfloat16
        assert torch.equal(norm, torch.from_numpy(tensors["model.norm.bf16"]).to(torch.bfloat16))
        await link.close()
        await learner.close()

        gap = [b for b in buckets if not any(t.row_offset == 3 for t in b.tensors)]  # the middle chunk is lost
        gap = [WeightBucket(version=2, index=i, num_buckets=len(gap), tensors=b.tensors) for i, b in enumerate(gap)]
        learner = FakeLearner(lambda m: gap)
        link = _link(learner.endpoint)
        with pytest.raises(ProtocolError, match="does not continue"):
            await link.poll_weights(0)
        await link.close()
        await learner.close()

    asyncio.run(main())


def test_out_of_band_versions_come_back_as_their_announcement():
    async def main():
        announce = WeightAnnounce(version=5, transport="fs", location="/shared/weights")
        learner = FakeLearner(lambda m: [announce] if m.have_version < 5 else [WeightNone(version=5)])
        link = _link(learner.endpoint)
        update = await link.poll_weights(2)
        assert (update.version, update.transport, update.state) == (5, "fs", None)
        assert update.announce.location == "/shared/weights"
        assert await link.poll_weights(5) is None
        await link.close()
        await learner.close()

        refused = ErrorReply(code="overloaded", message="nccl weight group is full")
        learner = FakeLearner(lambda m: [refused])
        link = _link(learner.endpoint)
        assert await link.poll_weights(0) is None and link.metrics.counter("weight_error_replies") == 1
        await link.close()
        await learner.close()

    asyncio.run(main())


def test_admission_release_and_refused_groups():
    async def main():
        seen = []
        refusals = []

        def policy(m):
            seen.append(m)
            if isinstance(m, TrajectoryGroup):
                if len(refusals) < 2:  # a learner closing its intake refuses the group twice, then acks it
                    refusals.append(m.group_id)
                    return [ErrorReply(code="overloaded", id=m.group_id, message="shutting down")]
                return [GroupAck(group_id=m.group_id, accepted=True)]
            if isinstance(m, AdmissionRelease):  # a learner that does not know the message yet
                return [ErrorReply(code="bad_request", message="AdmissionRelease is served on the weights endpoint")]
            return []

        learner = FakeLearner(policy)
        link = _link(learner.endpoint)
        await link.release_admission("req-1", "group failed")
        ack = await asyncio.wait_for(link.send_group(_group("g3")), 10)
        assert ack.accepted and refusals == ["g3", "g3"]
        release = next(m for m in seen if isinstance(m, AdmissionRelease))
        assert (release.actor_id, release.request_id, release.reason) == ("a0", "req-1", "group failed")
        m = link.metrics.snapshot()
        assert m["groups_refused"] == 2 and m["admission_releases"] == 1
        assert m["admission_releases_unsupported"] == 1 and "error_replies" not in m
        await link.close()
        await learner.close()

    asyncio.run(main())


def test_incomplete_or_inconsistent_buckets():
    tensors = {f"w{i}": np.full(3, i, dtype=np.float32) for i in range(3)}

    async def main():
        learner = FakeLearner(lambda m: weight_buckets(2, tensors)[:2])  # the last bucket never comes
        link = _link(learner.endpoint)
        assert await link.poll_weights(0) is None
        assert link.metrics.counter("weight_timeouts") == 1
        await link.close()
        await learner.close()

        bad = weight_buckets(2, tensors)
        bad[1] = WeightBucket(version=2, index=1, num_buckets=5, tensors=bad[1].tensors)
        learner = FakeLearner(lambda m: bad)
        link = _link(learner.endpoint)
        with pytest.raises(ProtocolError, match="buckets"):
            await link.poll_weights(0)
        await link.close()
        await learner.close()

    asyncio.run(main())


def test_endpoints_are_required():
    with pytest.raises(ValueError, match="weights"):
        LearnerLink("a0", {"trajectories": "tcp://127.0.0.1:1"})
