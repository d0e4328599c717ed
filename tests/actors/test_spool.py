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


def test_unanswered_admission_requests_are_found_after_a_crash(tmp_path):
    spool = GroupSpool(tmp_path, max_groups=4)
    spool.record_request("asked")  # died before the answer came
    spool.record_request("granted")  # died after recording the grant, before dropping the request
    spool.record_grant(Grant(request_id="granted", question_id="q", version=1))
    spool.record_request("played")  # ... and this one got as far as its group
    group = _group("g9")
    spool.put(group, encode(group), request_id="played")
    spool.record_request("denied")
    spool.drop_request("denied")
    again = GroupSpool(tmp_path, max_groups=4)
    assert again.unanswered_requests() == ["asked"]
    assert sorted(p.name for p in again.requests_dir.iterdir()) == ["asked"]  # answered ones cleaned up
    again.drop_request("asked")
    assert again.unanswered_requests() == []


def test_a_grant_whose_group_is_stored_is_not_played_again(tmp_path):
    spool = GroupSpool(tmp_path, max_groups=4)
    spool.record_grant(Grant(request_id="r1", question_id="q1", version=0))
    group = _group("g1")
    # the crash falls between storing the group and dropping its grant: simulate by recording the grant again
    spool.put(group, encode(group), request_id="r1")
    spool.record_grant(Grant(request_id="r1", question_id="q1", version=0))
    grants, groups = GroupSpool(tmp_path, max_groups=4).leftovers()
    assert grants == [] and [g.group_id for g in groups] == ["g1"]
    assert spool.metrics.counter("spool_grants_already_spooled") == 0  # counted by the spool that found it
    assert not list(spool.grants_dir.glob("*.json"))
    spool.remove("g1")  # by group id, whatever admission it carries in its name
    assert spool.count() == 0
