"""Receipt validation, samples, the rank/micro-batch plan, collation with the real image processor, batch stats."""
from __future__ import annotations

import msgspec
import numpy as np
import pytest
import torch

from learner.batch import (
    Collator,
    ImageTokenMismatch,
    InvalidGroup,
    assign_to_ranks,
    batch_stats,
    pack_groups,
    plan_micro_batches,
    plan_step,
    samples_from_groups,
    unpack_groups,
    validate_group,
)
from learner.config import AlgoConfig
from learner_worlds import make_group, make_trajectory, png
from protocol import TrajectoryGroup, to_ndarray


@pytest.fixture(scope="module")
def collator(tiny_vlm):
    from transformers import AutoImageProcessor

    path, ids = tiny_vlm
    return Collator(AutoImageProcessor.from_pretrained(path), ids["<|image_pad|>"], ids["<|endoftext|>"])


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
        "exceeds": dict(images=[png((1, 2, 3), side=100)]),
        "differ in length": dict(loss_mask=to_ndarray(mask[:-1].copy())),
    }
    for reason, change in cases.items():
        with pytest.raises(InvalidGroup, match=reason):
            check(with_traj(good, **change), ids)
    with pytest.raises(InvalidGroup, match="no trajectories"):
        check(TrajectoryGroup(group_id="e", actor_id="a", prompt_id="p"), ids)


# ------------------------------------------------------------------------------------------------ samples, plan

def test_samples_carry_group_advantages(tiny_vlm) -> None:
    ids = tiny_vlm[1]
    groups = [make_group("a", ids, rewards=(1.0, 0.0)), make_group("b", ids, seed=1, rewards=(2.0, 2.0, 2.0))]
    samples = samples_from_groups(groups, AlgoConfig(eps=1e-6))
    # group a: mean 0.5, std sqrt(0.5) -> ±0.7071; group b: equal rewards -> 0
    assert [round(s.advantage, 4) for s in samples] == [0.7071, -0.7071, 0.0, 0.0, 0.0]
    assert [s.group_id for s in samples] == ["a", "a", "b", "b", "b"]
    assert samples[0].input_ids.dtype == np.int64 and samples[0].loss_mask.dtype == bool


def test_ranks_are_balanced_longest_first() -> None:
    # 10 -> r0, 9 -> r1, 8 -> r1 (9 < 10), 1 -> r0 (10 < 17)
    assert assign_to_ranks([10, 9, 8, 1], 2) == [[0, 3], [1, 2]]
    assert assign_to_ranks([5], 3) == [[0], [], []]


def test_micro_batches_respect_the_padded_token_budget() -> None:
    # sorted 10, 9, 8, 1: [10, 9] = 2·10 <= 20; adding 8 makes 3·10 > 20; [8, 1] = 2·8
    assert plan_micro_batches([0, 1, 2, 3], [10, 9, 8, 1], 20) == [[0, 1], [2, 3]]
    assert plan_micro_batches([0], [50], 20) == [[0]]  # too long for the budget: rides alone


def test_every_rank_gets_the_same_number_of_micro_batches(tiny_vlm) -> None:
    samples = samples_from_groups([make_group("a", tiny_vlm[1], rewards=(1.0, 0.0, 1.0))], AlgoConfig())
    plans = [plan_step(samples, 4, rank, micro_batch_tokens=10) for rank in range(4)]
    assert len({len(p.micro_batches) for p in plans}) == 1
    assert plans[3].micro_batches == [[]]  # 3 samples, 4 ranks: the last rank trains a dummy micro-batch
    assert sorted(i for p in plans for mb in p.micro_batches for i in mb) == [0, 1, 2]
    assert plans[0].total_tokens == sum(int(s.loss_mask.sum()) for s in samples)
    assert plans[0].total_seqs == 3


# ------------------------------------------------------------------------------------------------ collation

def test_collation_pads_marks_image_tokens_and_processes_images(tiny_vlm, collator) -> None:
    ids = tiny_vlm[1]
    samples = samples_from_groups([make_group("a", ids, rewards=(1.0, 0.0))], AlgoConfig())
    mb = collator(samples)  # trajectory 0 has one 56x56 image (4 tokens), trajectory 1 none
    assert mb.image_grid_thw.tolist() == [[1, 4, 4]]
    assert mb.pixel_values.shape[0] == 16
    assert mb.input_ids.shape == (2, max(s.num_tokens for s in samples))
    assert mb.mm_token_type_ids.sum().item() == 4
    assert torch.equal(mb.mm_token_type_ids.bool(), mb.input_ids == ids["<|image_pad|>"])
    assert mb.attention_mask[1].sum().item() == samples[1].num_tokens
    assert torch.equal(mb.loss_mask[0, : samples[0].num_tokens], torch.from_numpy(samples[0].loss_mask))
    assert mb.advantages.tolist() == pytest.approx([s.advantage for s in samples])


def test_a_micro_batch_without_images_gets_a_masked_dummy_image_row(tiny_vlm, collator) -> None:
    ids = tiny_vlm[1]
    samples = samples_from_groups([make_group("a", ids, with_image=False, rewards=(1.0, 0.0))], AlgoConfig())
    mb = collator(samples)
    assert mb.input_ids.shape[0] == 3 and mb.num_samples == 2
    assert mb.image_grid_thw.shape[0] == 1
    assert mb.mm_token_type_ids[2].sum().item() == 4 and not mb.loss_mask[2].any()
    assert mb.advantages[2].item() == 0.0
    empty = collator([])
    assert empty.input_ids.shape[0] == 1 and not empty.loss_mask.any()


def test_placeholder_count_must_match_the_processed_grid(tiny_vlm, collator) -> None:
    ids = tiny_vlm[1]
    sample = samples_from_groups([make_group("a", ids, rewards=(1.0,))], AlgoConfig())[0]
    pads = np.flatnonzero(sample.input_ids == ids["<|image_pad|>"])
    sample.input_ids = np.delete(sample.input_ids, pads[0])  # 3 placeholders for a 4-token image
    sample.loss_mask = np.delete(sample.loss_mask, pads[0])
    sample.behav_logp = np.delete(sample.behav_logp, pads[0])
    with pytest.raises(ImageTokenMismatch, match=r"3 image placeholder tokens .*\[4\]"):
        collator([sample])


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
    stats = batch_stats([group], version=3)
    assert stats["trajectories"] == 2 and stats["tokens_generated"] == 5
    assert stats["reward_mean"] == 0.5 and stats["accuracy"] == 0.5 and stats["search_ratio"] == 0.5
    assert (stats["image_searches"], stats["text_searches"]) == (1, 2)
    assert stats["staleness_mean"] == pytest.approx(1 / 5) and stats["staleness_max"] == 1
    assert stats["multi_version_trajectories"] == 1
    assert (stats["staleness_hist_0"], stats["staleness_hist_1"]) == (4, 1)
