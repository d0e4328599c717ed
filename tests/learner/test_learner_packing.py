"""The rank/micro-batch plan (token budgets), padded and packed collation with the real image processor, and the
check that packed sequences (per-trajectory M-RoPE positions, block-diagonal attention) score exactly like padding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from learner.batch import samples_from_groups
from learner.config import AlgoConfig
from learner.packing import (
    Collator,
    ImageTokenMismatch,
    assign_to_ranks,
    plan_micro_batches,
    plan_step,
)
from learner.trainer import forward_logprobs
from learner_worlds import make_group


@pytest.fixture(scope="module")
def model(tiny_vlm):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_vlm[0], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def collators(tiny_vlm, model):
    from transformers import AutoImageProcessor

    path, ids = tiny_vlm
    processor = AutoImageProcessor.from_pretrained(path)
    padded = Collator(processor, ids["<|image_pad|>"], ids["<|endoftext|>"])
    packed = Collator(processor, ids["<|image_pad|>"], ids["<|endoftext|>"], rope_index=model.model.get_rope_index,
                      packed=True)
    return padded, packed


# ---------------------------------------------------------------------------------------------------- the plan

def test_ranks_are_balanced_longest_first() -> None:
    # 10 -> r0, 9 -> r1, 8 -> r1 (9 < 10), 1 -> r0 (10 < 17)
    assert assign_to_ranks([10, 9, 8, 1], 2) == [[0, 3], [1, 2]]
    assert assign_to_ranks([5], 3) == [[0], [], []]


def test_padded_micro_batches_respect_rows_times_longest() -> None:
    # sorted 10, 9, 8, 1: [10, 9] = 2·10 <= 20; adding 8 makes 3·10 > 20; [8, 1] = 2·8
    assert plan_micro_batches([0, 1, 2, 3], [10, 9, 8, 1], 20) == [[0, 1], [2, 3]]
    assert plan_micro_batches([0], [50], 20) == [[0]]  # too long for the budget: rides alone


def test_packed_micro_batches_are_first_fit_decreasing_on_the_sum() -> None:
    # sorted 10, 9, 8, 3, 1 into 20: [10, 9, 1] = 20, [8, 3] = 11 (3 does not fit the first: 19 + 3 > 20)
    assert plan_micro_batches([0, 1, 2, 3, 4], [10, 9, 8, 3, 1], 20, packed=True) == [[0, 1, 4], [2, 3]]
    assert plan_micro_batches([0, 1], [30, 5], 20, packed=True) == [[0], [1]]
    with pytest.raises(ValueError, match="max_tokens"):
        plan_micro_batches([0], [1], 0, packed=True)


def test_every_rank_gets_the_same_number_of_micro_batches(tiny_vlm) -> None:
    samples = samples_from_groups([make_group("a", tiny_vlm[1], rewards=(1.0, 0.0, 1.0))], AlgoConfig())
    for packed in (False, True):
        plans = [plan_step(samples, 4, rank, micro_batch_tokens=10, packed=packed) for rank in range(4)]
        assert len({len(p.micro_batches) for p in plans}) == 1
        assert plans[3].micro_batches == [[]]  # 3 samples, 4 ranks: the last rank trains a dummy micro-batch
        assert sorted(i for p in plans for mb in p.micro_batches for i in mb) == [0, 1, 2]
        assert plans[0].total_tokens == sum(int(s.loss_mask.sum()) for s in samples)
        assert plans[0].total_seqs == 3
    with pytest.raises(ValueError, match="rank 4"):
        plan_step(samples, 4, 4, 10)


# ---------------------------------------------------------------------------------------------------- collation

def test_padded_collation_marks_image_tokens_and_indexes_samples(tiny_vlm, collators) -> None:
    ids = tiny_vlm[1]
    samples = samples_from_groups([make_group("a", ids, rewards=(1.0, 0.0))], AlgoConfig())
    mb = collators[0](samples)  # trajectory 0 has one 56x56 image (4 tokens), trajectory 1 none
    assert not mb.packed and mb.image_grid_thw.tolist() == [[1, 4, 4]] and mb.pixel_values.shape[0] == 16
    width = max(s.num_tokens for s in samples)
    assert mb.input_ids.shape == (2, width) and mb.model_tokens == 2 * width
    assert mb.mm_token_type_ids.sum().item() == 4
    assert torch.equal(mb.mm_token_type_ids.bool(), mb.input_ids == ids["<|image_pad|>"])
    assert mb.attention_mask[1].sum().item() == samples[1].num_tokens
    assert torch.equal(mb.loss_mask[0, : samples[0].num_tokens], torch.from_numpy(samples[0].loss_mask))
    assert mb.token_index[1, 0].item() == width  # row 1 starts after row 0 in the flattened output
    assert mb.advantages.tolist() == pytest.approx([s.advantage for s in samples])


def test_packed_collation_concatenates_rows_with_restarting_positions(tiny_vlm, collators) -> None:
    ids = tiny_vlm[1]
    samples = samples_from_groups([make_group("a", ids, rewards=(1.0, 0.0, 0.5))], AlgoConfig())
    mb = collators[1](samples)
    lengths = [s.num_tokens for s in samples]
    assert mb.packed and mb.attention_mask is None and mb.input_ids.shape == (1, sum(lengths))
    assert mb.model_tokens == sum(lengths)  # no padding computed
    assert mb.position_ids.shape == (4, 1, sum(lengths))
    starts = np.cumsum([0] + lengths[:-1]).tolist()
    text = mb.position_ids[0, 0]
    assert [int(text[s]) for s in starts] == [0, 0, 0]  # every trajectory restarts its text positions
    assert mb.token_index[:, 0].tolist() == starts
    # image trajectory: prompt = [im_start, vision_start, 4×pad, vision_end, ...]; the 2×2 merged grid of the pad
    # tokens gets height/width positions (2, 2, 3, 3) / (2, 3, 2, 3) after the two text positions 0, 1.
    assert mb.position_ids[2, 0, 2:6].tolist() == [2, 2, 3, 3] and mb.position_ids[3, 0, 2:6].tolist() == [2, 3, 2, 3]
    assert mb.image_grid_thw.shape[0] == 2  # trajectories 0 and 2 have an image


def test_a_micro_batch_without_images_gets_a_masked_dummy_image(tiny_vlm, collators) -> None:
    ids = tiny_vlm[1]
    samples = samples_from_groups([make_group("a", ids, with_image=False, rewards=(1.0, 0.0))], AlgoConfig())
    padded, packed = collators[0](samples), collators[1](samples)
    assert padded.input_ids.shape[0] == 3 and padded.num_samples == 2 and padded.loss_mask.shape[0] == 2
    assert padded.mm_token_type_ids[2].sum().item() == 4 and padded.image_grid_thw.shape[0] == 1
    assert packed.input_ids.shape[1] == sum(s.num_tokens for s in samples) + 4
    assert packed.mm_token_type_ids.sum().item() == 4
    for collate in collators:
        empty = collate([])
        assert empty.num_samples == 0 and empty.loss_mask.shape[0] == 0 and empty.image_grid_thw.shape[0] == 1


def test_placeholder_count_must_match_the_processed_grid(tiny_vlm, collators) -> None:
    ids = tiny_vlm[1]
    sample = samples_from_groups([make_group("a", ids, rewards=(1.0,))], AlgoConfig())[0]
    pads = np.flatnonzero(sample.input_ids == ids["<|image_pad|>"])
    sample.input_ids = np.delete(sample.input_ids, pads[0])  # 3 placeholders for a 4-token image
    sample.loss_mask = np.delete(sample.loss_mask, pads[0])
    sample.behav_logp = np.delete(sample.behav_logp, pads[0])
    for collate in collators:
        with pytest.raises(ImageTokenMismatch, match=r"3 image placeholder tokens .*\[4\]"):
            collate([sample])


def test_packing_needs_the_models_rope_index(tiny_vlm) -> None:
    from transformers import AutoImageProcessor

    with pytest.raises(ValueError, match="rope_index"):
        Collator(AutoImageProcessor.from_pretrained(tiny_vlm[0]), 1, 0, packed=True)


def test_packed_log_probs_equal_padded_log_probs(tiny_vlm, collators, model) -> None:
    """Mixed image/no-image trajectories of different lengths, plus a dummy-image-only micro-batch."""
    ids = tiny_vlm[1]
    groups = [make_group("a", ids, rewards=(1.0, 0.0, 0.5, 0.2)), make_group("b", ids, seed=5, gen_len=9)]
    samples = samples_from_groups(groups, AlgoConfig())
    cpu = torch.device("cpu")
    with torch.no_grad():
        padded_logp, padded_entropy = forward_logprobs(model, collators[0](samples), cpu, torch.float32)
        packed_logp, packed_entropy = forward_logprobs(model, collators[1](samples), cpu, torch.float32)
    mask = collators[0](samples).loss_mask
    assert mask.sum() > 0
    assert (padded_logp - packed_logp)[mask].abs().max().item() < 1e-5
    assert (padded_entropy - packed_entropy)[mask].abs().max().item() < 1e-5
    # Without the restarting text positions the packed rows would attend across trajectories and differ.
    packed = collators[1](samples)
    packed.position_ids = packed.position_ids[1:]
    with torch.no_grad():
        leaky, _ = forward_logprobs(model, packed, cpu, torch.float32)
    assert (padded_logp - leaky)[mask].abs().max().item() > 1e-3


def test_log_probs_are_scored_at_the_behaviour_temperature(tiny_vlm, collators, model) -> None:
    """log π_T(x) = log softmax(z / T)[x]: at T = 2 the per-token log-probs follow the tempered distribution."""
    ids = tiny_vlm[1]
    samples = samples_from_groups([make_group("a", ids, rewards=(1.0, 0.0))], AlgoConfig())
    batch = collators[0](samples)
    cpu = torch.device("cpu")
    with torch.no_grad():
        plain, _ = forward_logprobs(model, batch, cpu, torch.float32)
        tempered, _ = forward_logprobs(model, batch, cpu, torch.float32, temperature=2.0)
        logits = model(**batch.model_inputs(cpu, torch.float32), use_cache=False).logits.float()
    targets = batch.input_ids[:, 1:]
    expected = torch.log_softmax(logits[:, :-1] / 2.0, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    expected = torch.nn.functional.pad(expected, (1, 0)).reshape(-1)[batch.token_index]
    mask = batch.loss_mask
    assert (tempered - expected)[mask].abs().max().item() < 1e-5
    assert (tempered - plain)[mask].abs().max().item() > 1e-3
