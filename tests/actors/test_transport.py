"""The actor's learner link against a small fake learner ROUTER: admissions, acks, resends, weight buckets."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from actors.config import TransportConfig
from actors.transport import LearnerLink, TransportClosed
from actors_helpers import FakeLearner, weight_buckets
from protocol import (AdmissionReply, AdmissionRequest, GroupAck, ProtocolError, TrajectoryGroup, WeightBucket,
                      WeightNone, WeightQuery)

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
        version, state = await link.poll_weights(1)
        assert version == 4 and set(state) == set(tensors)
        for name, value in tensors.items():
            assert state[name].dtype == torch.float32 and tuple(state[name].shape) == value.shape
            assert torch.equal(state[name], torch.from_numpy(value.astype(np.float32)))
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
