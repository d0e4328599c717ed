"""Receipt validation, samples with advantages, group staleness, the broadcast wire form and batch stats."""
from __future__ import annotations

import msgspec
import numpy as np
import pytest

from learner.batch import (
    InvalidGroup,
    StaleGroupError,
    apply_stale_policy,
    batch_stats,
    group_staleness,
    pack_groups,
    samples_from_groups,
    split_stale,
    split_tool_failed,
    unpack_groups,
    validate_group,
)
from learner.config import AlgoConfig
from learner_worlds import make_group, make_trajectory
from protocol import TrajectoryGroup, to_ndarray
from testkit import solid_png


def check(group: TrajectoryGroup, ids: dict[str, int], max_version: int = 5) -> None:
    validate_group(group, vocab_size=ids["vocab_size"], image_token_id=ids["<|image_pad|>"],
                   max_version=max_version, max_image_pixels=64 * 64)


def with_traj(group: TrajectoryGroup, **changes) -> TrajectoryGroup:
    """The group with its first trajectory's fields replaced."""
    first = msgspec.structs.replace(group.trajectories[0], **changes)
    return msgspec.structs.replace(group, trajectories=[first, *group.trajectories[1:]])


# ------------------------------------------------------------------------------------------------ validation

def test_a_well_formed_group_passes(tiny_vlm) -> None:
    check(make_group("g", tiny_vlm[1]), tiny_vlm[1])


def test_invalid_groups_are_rejected_with_the_reason(tiny_vlm) -> None:
    ids = tiny_vlm[1]
    good = make_group("g", ids)
    traj = good.trajectories[0]
    tokens = np.array(np.frombuffer(traj.token_ids.data, dtype=np.int32))
    mask = np.frombuffer(traj.loss_mask.data, dtype=np.uint8)
    cases = {
        "vocabulary": dict(token_ids=to_ndarray(np.where(mask == 1, ids["vocab_size"], tokens).astype(np.int32))),
        "not 0/1": dict(loss_mask=to_ndarray(np.where(mask == 1, 2, 0).astype(np.uint8))),
        "finite": dict(behaviour_logprobs=to_ndarray(np.where(mask == 1, np.nan, 0).astype(np.float32))),
        "versions span": dict(versions=to_ndarray(np.where(mask == 1, 9, -1).astype(np.int32))),
        "placeholder run": dict(images=[]),
        "unreadable": dict(images=[b"not an image"]),
        "exceeds": dict(images=[solid_png((1, 2, 3), 100)]),
        "differ in length": dict(loss_mask=to_ndarray(mask[:-1].copy())),
    }
    for reason, change in cases.items():
        with pytest.raises(InvalidGroup, match=reason):
            check(with_traj(good, **change), ids)
    with pytest.raises(InvalidGroup, match="no trajectories"):
        check(TrajectoryGroup(group_id="e", actor_id="a", prompt_id="p"), ids)


# ------------------------------------------------------------------------------------------------ samples

def test_samples_carry_group_advantages(tiny_vlm) -> None:
    ids = tiny_vlm[1]
    groups = [make_group("a", ids, rewards=(1.0, 0.0)), make_group("b", ids, seed=1, rewards=(2.0, 2.0, 2.0))]
    samples = samples_from_groups(groups, AlgoConfig(eps=1e-6))
    # group a: mean 0.5, std sqrt(0.5) -> ±0.7071; group b: equal rewards -> 0
    assert [round(s.advantage, 4) for s in samples] == [0.7071, -0.7071, 0.0, 0.0, 0.0]
    assert [s.group_id for s in samples] == ["a", "a", "b", "b", "b"]
    assert samples[0].input_ids.dtype == np.int64 and samples[0].loss_mask.dtype == bool


def flag(group: TrajectoryGroup, *positions: int) -> TrajectoryGroup:
    """The group with the trajectories at `positions` marked tool_failed."""
    trajectories = [msgspec.structs.replace(t, tool_failed=True) if i in positions else t
                    for i, t in enumerate(group.trajectories)]
    return msgspec.structs.replace(group, trajectories=trajectories)


def without(group: TrajectoryGroup, *positions: int) -> TrajectoryGroup:
    return msgspec.structs.replace(group, trajectories=[t for i, t in enumerate(group.trajectories)
                                                        if i not in positions])


def test_a_tool_failed_episode_is_no_sample_and_leaves_the_others_advantages_as_without_it(tiny_vlm) -> None:
    """Group a: rewards (1, 0, 0, 1, 1) with the last one cut by an outage; its advantages are those of (1, 0, 0, 1)
    alone: mean 0.5, std sqrt(1/3) -> ±0.866. Whatever reward the flagged one carries changes nothing."""
    ids = tiny_vlm[1]
    a = flag(make_group("a", ids, rewards=(1.0, 0.0, 0.0, 1.0, 1.0)), 4)
    b = make_group("b", ids, seed=1, rewards=(2.0, 0.0))
    samples = samples_from_groups([a, b], AlgoConfig(eps=1e-6))
    reference = samples_from_groups([without(a, 4), b], AlgoConfig(eps=1e-6))
    assert [round(s.advantage, 4) for s in samples] == [0.866, -0.866, -0.866, 0.866, 0.7071, -0.7071]
    assert [s.advantage for s in samples] == [s.advantage for s in reference]
    for got, want in zip(samples, reference):
        np.testing.assert_array_equal(got.input_ids, want.input_ids)
        np.testing.assert_array_equal(got.loss_mask, want.loss_mask)
    outlier = flag(make_group("a", ids, rewards=(1.0, 0.0, 0.0, 1.0, -50.0)), 4)
    assert [s.advantage for s in samples_from_groups([outlier, b], AlgoConfig(eps=1e-6))] == \
        [s.advantage for s in samples]


def test_groups_an_outage_leaves_without_contrast_are_dropped(tiny_vlm) -> None:
    ids = tiny_vlm[1]
    groups = {
        "all failed": flag(make_group("all", ids, rewards=(1.0, 0.0, 1.0)), 0, 1, 2),
        "one left": flag(make_group("one", ids, rewards=(1.0, 0.0, 1.0)), 0, 1),
        "two left": flag(make_group("two", ids, rewards=(1.0, 0.0, 1.0)), 0),
        "none failed": make_group("none", ids, rewards=(1.0,)),  # G = 1 and no outage: not this rule's business
    }
    keep, drop = split_tool_failed(list(groups.values()))
    assert [g.group_id for g in keep] == ["two", "none"] and [g.group_id for g in drop] == ["all", "one"]


def test_batch_stats_leave_tool_failed_episodes_out_of_reward_and_count_them(tiny_vlm) -> None:
    """Rewards (1, 0, 1, 0, 0, 0), the odd ones searching, and the outage cut two of the searching ones (3 and 5):
    reward_mean and accuracy stay those of the other four (0.5), while the search ratio counts every episode's
    decision (3 of 6 searched; the four alone would read 1 of 4)."""
    ids = tiny_vlm[1]
    group = flag(make_group("g", ids, rewards=(1.0, 0.0, 1.0, 0.0, 0.0, 0.0)), 3, 5)
    stats = batch_stats([group], version=0)
    clean = batch_stats([without(group, 3, 5)], version=0)
    assert stats["trajectories"] == 6 and stats["tool_failed_masked"] == 2 and clean["tool_failed_masked"] == 0
    for key in ("reward_mean", "accuracy", "zero_std_groups"):
        assert stats[key] == clean[key], key
    assert stats["reward_mean"] == 0.5 and stats["accuracy"] == 0.5 and stats["tokens_generated"] > \
        clean["tokens_generated"]
    assert (stats["search_ratio"], clean["search_ratio"]) == (0.5, 0.25)
    labelled = batch_stats([msgspec.structs.replace(group, search_label="search_required")], version=0)
    assert (labelled["accuracy_search_required"], labelled["search_ratio_search_required"]) == (0.5, 0.5)
    one_left = flag(make_group("z", ids, rewards=(1.0, 0.0, 0.0)), 1, 2)
    assert batch_stats([one_left], version=0)["zero_std_groups"] == 1


# ------------------------------------------------------------------------------------------------ wire, stats

def test_pack_unpack_round_trip(tiny_vlm) -> None:
    groups = [make_group("a", tiny_vlm[1]), make_group("b", tiny_vlm[1], seed=2)]
    back = unpack_groups(pack_groups(groups))
    assert [g.group_id for g in back] == ["a", "b"]
    assert back[1].trajectories[0].images == groups[1].trajectories[0].images


def test_batch_stats_by_hand(tiny_vlm) -> None:
    ids = tiny_vlm[1]
    rng = np.random.default_rng(0)
    t1 = make_trajectory(rng, ids, reward=1.0, gen_len=3, versions=[2, 3, 3], searches=(1, 2), accuracy=1.0)
    t2 = make_trajectory(rng, ids, reward=0.0, gen_len=2, versions=[3, 3], with_image=False)
    group = TrajectoryGroup(group_id="g", actor_id="a", prompt_id="p", trajectories=[t1, t2])
    stats = batch_stats([group], version=3, max_staleness=2)
    assert stats["trajectories"] == 2 and stats["tokens_generated"] == 5
    assert stats["reward_mean"] == 0.5 and stats["accuracy"] == 0.5 and stats["search_ratio"] == 0.5
    assert (stats["image_searches"], stats["text_searches"]) == (1, 2)
    assert stats["staleness_mean"] == pytest.approx(1 / 5) and stats["staleness_max"] == 1
    assert stats["multi_version_trajectories"] == 1
    # lags: t1 [1, 0, 0], t2 [0, 0]; bins 0..max_staleness always present, so hist_2 is a stable zero column
    assert (stats["staleness_hist_0"], stats["staleness_hist_1"], stats["staleness_hist_2"]) == (4, 1, 0)
    assert stats["stale_tokens"] == 0
    late = batch_stats([group], version=5, max_staleness=1)  # lags [3, 2, 2] and [2, 2]
    assert (late["staleness_hist_0"], late["staleness_hist_1"], late["staleness_hist_2"],
            late["staleness_hist_3"]) == (0, 0, 4, 1)
    assert late["stale_tokens"] == 5


def test_group_staleness_is_the_oldest_generated_token(tiny_vlm) -> None:
    ids = tiny_vlm[1]
    rng = np.random.default_rng(0)
    fresh = TrajectoryGroup(group_id="f", actor_id="a", prompt_id="p", trajectories=[
        make_trajectory(rng, ids, reward=1.0, gen_len=3, versions=[4, 5, 5])])
    old = TrajectoryGroup(group_id="o", actor_id="a", prompt_id="p", trajectories=[
        make_trajectory(rng, ids, reward=1.0, gen_len=2, versions=[5, 5]),
        make_trajectory(rng, ids, reward=0.0, gen_len=2, versions=[2, 3])])  # the second trajectory started at 2
    assert group_staleness(fresh, 5) == 1 and group_staleness(old, 5) == 3
    kept, stale = split_stale([fresh, old], version=5, max_staleness=1)
    assert [g.group_id for g in kept] == ["f"] and [g.group_id for g in stale] == ["o"]
    kept, stale = split_stale([fresh, old], version=5, max_staleness=3)
    assert len(kept) == 2 and stale == []
    with pytest.raises(ValueError, match="outside"):
        group_staleness(fresh, 4)  # a token from version 5 cannot be trained into version 4


def test_stale_policies_drop_train_or_raise(tiny_vlm) -> None:
    ids = tiny_vlm[1]
    fresh, old = make_group("fresh", ids, version=4), make_group("old", ids, seed=1, version=1)
    keep, dropped = apply_stale_policy([old, fresh], version=4, max_staleness=1, policy="drop_counted")
    assert [g.group_id for g in keep] == ["fresh"] and [g.group_id for g in dropped] == ["old"]
    keep, dropped = apply_stale_policy([old, fresh], version=4, max_staleness=1, policy="train")
    assert [g.group_id for g in keep] == ["old", "fresh"] and dropped == []
    with pytest.raises(StaleGroupError, match=r"\['old'\] .* max_staleness=1 .* version 4"):
        apply_stale_policy([old, fresh], version=4, max_staleness=1, policy="error")
    assert apply_stale_policy([fresh], version=4, max_staleness=0, policy="error") == ([fresh], [])
    with pytest.raises(ValueError, match="unknown stale policy"):
        apply_stale_policy([old], version=4, max_staleness=0, policy="ignore")
