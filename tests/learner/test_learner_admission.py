"""The AReaL admission rule and token-staleness arithmetic, by hand."""
from __future__ import annotations

import numpy as np
import pytest

from learner.admission import IDLE_CAUSES, AdmissionController, IdleClock, idle_cause, spans_versions, token_staleness


def grants(controller: AdmissionController, version: int, attempts: int) -> int:
    return sum(controller.try_grant(version) for _ in range(attempts))


def test_capacity_is_staleness_plus_version_plus_one_batches() -> None:
    c = AdmissionController(groups_per_step=2, max_staleness=1)
    assert grants(c, 0, 10) == 4  # (1 + 0 + 1) · 2
    c.on_group_received()
    c.on_group_received()
    assert grants(c, 0, 10) == 0  # accepted 2 + running 2 = 4: still full at version 0
    assert grants(c, 1, 10) == 2  # (1 + 1 + 1) · 2 = 6
    assert (c.accepted, c.running) == (2, 4)
    assert c.capacity(1) == 0


def test_zero_staleness_is_synchronous() -> None:
    c = AdmissionController(groups_per_step=3, max_staleness=0)
    assert grants(c, 0, 10) == 3
    for _ in range(3):
        c.on_group_received()
    assert grants(c, 0, 10) == 0
    assert grants(c, 1, 10) == 3


def test_lost_groups_free_their_slot_and_unexpected_arrivals_are_counted() -> None:
    c = AdmissionController(groups_per_step=1, max_staleness=0)
    assert c.try_grant(0) and not c.try_grant(0)
    c.on_group_lost()
    assert c.running == 0 and c.try_grant(0)
    c.on_group_received()
    c.on_group_received()  # nobody was granted this one
    assert (c.accepted, c.running, c.unexpected) == (2, 0, 1)
    assert c.capacity(0) == -1


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError):
        AdmissionController(groups_per_step=0, max_staleness=1)
    with pytest.raises(ValueError, match="version"):
        AdmissionController(1, 1).try_grant(-1)


def test_token_staleness_counts_only_generated_tokens() -> None:
    lag = token_staleness(3, np.array([-1, 1, 2, 3, -1]), np.array([0, 1, 1, 1, 0]))
    assert lag.tolist() == [2, 1, 0]
    with pytest.raises(ValueError, match="outside"):
        token_staleness(1, np.array([2]), np.array([1]))
    with pytest.raises(ValueError, match="outside"):
        token_staleness(1, np.array([-1]), np.array([1]))


def test_spans_versions() -> None:
    assert spans_versions(np.array([-1, 2, 3]), np.array([0, 1, 1]))
    assert not spans_versions(np.array([5, 2, 2]), np.array([0, 1, 1]))
    assert not spans_versions(np.array([-1, -1]), np.array([0, 0]))


def test_snapshot_restore_keeps_accepted_and_forgets_old_grants() -> None:
    c = AdmissionController(groups_per_step=2, max_staleness=1)
    assert grants(c, 0, 3) == 3
    c.on_group_received()
    state = c.snapshot()
    assert state == {"accepted": 1, "running": 2, "unexpected": 0}
    resumed = AdmissionController(groups_per_step=2, max_staleness=1)
    resumed.restore(state)
    assert (resumed.accepted, resumed.running) == (1, 0)  # grants of the old process are not trusted
    assert grants(resumed, 0, 10) == 3
    resumed.on_group_received()
    resumed.on_group_received()
    resumed.on_group_received()
    resumed.on_group_received()  # a group granted by the old process arrives after all
    assert (resumed.accepted, resumed.running, resumed.unexpected) == (5, 0, 1)


def test_a_dropped_group_gives_its_slot_back() -> None:
    c = AdmissionController(groups_per_step=1, max_staleness=0)
    assert c.try_grant(0)
    c.on_group_received()
    assert not c.try_grant(0)
    c.on_group_dropped()  # dropped as stale: version 0 may admit one more
    assert c.accepted == 0 and c.try_grant(0)


def test_idle_cause_follows_the_admission_state() -> None:
    c = AdmissionController(groups_per_step=2, max_staleness=1)
    assert idle_cause(c.capacity(0), c.running) == "no_rollouts"  # room, nothing in flight: no actor asking
    grants(c, 0, 1)
    assert idle_cause(c.capacity(0), c.running) == "actor_limit"  # room, one in flight: actors start no more
    grants(c, 0, 10)
    assert idle_cause(c.capacity(0), c.running) == "staleness_bound"  # 4 in flight = (1 + 0 + 1) · 2
    for _ in range(4):
        c.on_group_received()
    # all four arrived but the learner is still at version 0: the rule has no room and nothing runs
    assert (c.capacity(0), c.running) == (0, 0) and idle_cause(0, 0) == "staleness_bound"
    assert idle_cause(c.capacity(1), c.running) == "no_rollouts"
    # room, but an actor denied a moment ago sleeps out its retry delay before it asks again
    assert idle_cause(c.capacity(1), c.running, retrying=True) == "admission_retry"
    assert idle_cause(0, 3, retrying=True) == "staleness_bound"  # no room: the retry is not what holds it up


def test_idle_clock_sums_per_cause_and_rejects_unknown_causes() -> None:
    clock = IdleClock()
    clock.add("actor_limit", 0.25)
    clock.add("actor_limit", 0.5)
    clock.add("staleness_bound", 1.0)
    clock.add("no_rollouts", -0.1)  # a clock step backwards never makes a negative wait
    assert clock.row() == {"learner_idle_staleness_bound_s": 1.0, "learner_idle_admission_retry_s": 0.0,
                           "learner_idle_actor_limit_s": 0.75, "learner_idle_no_rollouts_s": 0.0}
    assert set(clock.row()) == {f"learner_idle_{c}_s" for c in IDLE_CAUSES}
    with pytest.raises(ValueError, match="unknown idle cause"):
        clock.add("tea_break", 1.0)
