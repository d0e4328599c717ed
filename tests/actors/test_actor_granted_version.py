"""A group granted at policy version v is played by version >= v: the actor waits for the weights first (what makes
run.mode=sync, algo.max_staleness=0, train on fresh groups only)."""
from __future__ import annotations

import asyncio
import time

import numpy as np

from actors_helpers import FakeLearner, weight_buckets
from protocol import AdmissionReply, AdmissionRequest, GroupAck, TrajectoryGroup, WeightNone, WeightQuery, \
    from_ndarray
from test_actor import FakeActor, _write_questions


def test_groups_granted_at_a_newer_version_wait_for_its_weights(tmp_path, tiny_model_dir):
    weights = {"model.language_model.norm.weight": np.full(4, 3.0, dtype=np.float32)}
    cfg = {"actors": {"max_concurrency": 4, "weight_poll_s": 0.05, "transport": {"reply_timeout_s": 0.3}},
           "algo": {"group_size": 2}}
    published_at = time.monotonic() + 0.6  # version 1 exists from the start but is served only after 0.6 s

    async def main():
        groups: list[TrajectoryGroup] = []
        grants = 0

        def policy(m):
            nonlocal grants
            if isinstance(m, AdmissionRequest):
                grants += 1
                stopping = grants > 2
                return [AdmissionReply(request_id=m.request_id, granted=not stopping, version=1, stopping=stopping)]
            if isinstance(m, TrajectoryGroup):
                groups.append(m)
                return [GroupAck(group_id=m.group_id, accepted=True)]
            if isinstance(m, WeightQuery):
                if m.have_version >= 1 or time.monotonic() < published_at:
                    return [WeightNone(version=m.have_version)]
                return weight_buckets(1, weights)
            return []

        learner = FakeLearner(policy)
        actor = FakeActor("a0", str(tiny_model_dir), str(_write_questions(tmp_path / "q.parquet")), {},
                          {"trajectories": learner.endpoint, "weights": learner.endpoint}, cfg, str(tmp_path / "run"))
        await actor.start()
        await asyncio.wait_for(actor.run(), 30)
        metrics = actor.metrics()
        await actor.stop()
        await learner.close()
        return groups, metrics

    groups, metrics = asyncio.run(main())
    assert len({g.group_id for g in groups}) == 2
    for group in groups:
        for traj in group.trajectories:
            versions = from_ndarray(traj.versions)[from_ndarray(traj.loss_mask).astype(bool)]
            assert versions.size and versions.min() >= 1, versions  # not one token sampled by version 0
    assert metrics["actor_version_waits"] >= 1 and metrics["actor_version_wait_s_max"] >= 0.3
    assert metrics["actor_weight_updates"] == 1
