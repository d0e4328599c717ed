"""The actor's bounded spool: slots give back-pressure, groups and grants survive on disk, bad files are moved
aside."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from actors.spool import Grant, GroupSpool
from protocol import Trajectory, TrajectoryGroup, encode, to_ndarray


def _group(gid: str) -> TrajectoryGroup:
    arr = to_ndarray(np.arange(4, dtype=np.int32))
    traj = Trajectory(token_ids=arr, loss_mask=to_ndarray(np.ones(4, dtype=np.uint8)),
                      behaviour_logprobs=to_ndarray(np.zeros(4, dtype=np.float32)), versions=arr, reward=0.5)
    return TrajectoryGroup(group_id=gid, actor_id="a0", prompt_id="q", trajectories=[traj])


def test_slots_block_at_the_bound(tmp_path):
    async def main():
        spool = GroupSpool(tmp_path, max_groups=2)
        await spool.acquire()
        await spool.acquire()
        third = asyncio.create_task(spool.acquire())
        await asyncio.sleep(0.05)
        assert not third.done() and spool.held == 2  # a full spool: the actor asks for no admission
        spool.release()
        await asyncio.wait_for(third, 1)
        assert spool.held == 2 and spool.metrics.counter("spool_full_waits") == 1

    asyncio.run(main())


def test_groups_and_grants_survive_on_disk(tmp_path):
    spool = GroupSpool(tmp_path / "spool", max_groups=4)
    spool.record_grant(Grant(request_id="r1", question_id="q1", version=3))
    spool.record_grant(Grant(request_id="r2", question_id="q2", version=3))
    group = _group("g1")
    spool.put(group, encode(group), request_id="r1")  # r1's group is finished: its grant becomes a group
    assert spool.count() == 1

    again = GroupSpool(tmp_path / "spool", max_groups=4)  # a restarted actor
    grants, groups = again.leftovers()
    assert grants == [Grant(request_id="r2", question_id="q2", version=3)]
    assert [g.group_id for g in groups] == ["g1"] and groups[0].trajectories[0].reward == 0.5
    again.remove("g1")
    again.drop_grant("r2")
    assert again.leftovers() == ([], [])
    assert not list((tmp_path / "spool").rglob(".*.tmp"))  # atomic writes leave no temporaries


def test_unreadable_files_are_quarantined(tmp_path):
    spool = GroupSpool(tmp_path, max_groups=2)
    (spool.groups_dir / "broken.msgpack").write_bytes(b"\x00not msgpack")
    (spool.grants_dir / "broken.json").write_text("{")
    good = _group("g2")
    spool.put(good, encode(good))
    grants, groups = spool.leftovers()
    assert grants == [] and [g.group_id for g in groups] == ["g2"]
    assert sorted(p.name for p in (tmp_path / "bad").iterdir()) == ["broken.json", "broken.msgpack"]
    assert spool.metrics.counter("spool_bad_files") == 2
    assert spool.discard_leftovers() == 1 and spool.count() == 0


def test_bound_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="max_groups"):
        GroupSpool(tmp_path, max_groups=0)
