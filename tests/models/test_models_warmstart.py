"""The whole-template rendering of oracle episodes (the loss mask covers exactly the assistant turns) and the
warm-start evaluation, which runs episodes end to end and scores them. The warm start itself is tested in
tests/learner/test_learner_sft.py."""
from __future__ import annotations

import numpy as np
import torch
from transformers import AutoProcessor

from data.oracle import OracleConfig, oracle_episode
from warmstart_reference import assistant_mask, collate, encode_episode, evaluate_warmstart


def test_assistant_mask_by_hand():
    # 1 = <|im_start|>, 2 = <|im_end|>, header "assistant\n" = [7, 8]
    ids = [1, 9, 9, 2, 1, 7, 8, 5, 6, 2, 1, 9, 2, 1, 7, 8, 4, 2]
    mask = assistant_mask(ids, im_start=1, im_end=2, assistant_header=[7, 8])
    assert [i for i, m in enumerate(mask) if m] == [7, 8, 9, 16, 17]
    assert assistant_mask([1, 7, 8, 5], 1, 2, [7, 8]) == [False, False, False, True]  # unterminated turn


def test_loss_mask_is_exactly_the_assistant_turns(small_tiny, small_world):
    processor = AutoProcessor.from_pretrained(small_tiny)
    rng = np.random.default_rng(0)
    row = next(r for r in small_world.questions if r["kind"] == "image_text_search")
    episode = oracle_episode(row, small_world, rng)
    enc = encode_episode(processor, episode)
    decoded = processor.tokenizer.decode(enc.input_ids[enc.loss_mask], skip_special_tokens=False)
    assert decoded == "".join(t.assistant + "<|im_end|>" for t in episode.turns)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert torch.equal(enc.mm_token_type_ids.bool(), enc.input_ids == image_id)
    assert enc.image_grid_thw.shape[0] == 1 + OracleConfig().image_results  # question image + the thumbnails


def test_collate_pads_right_and_masks_labels(small_tiny, small_world):
    processor = AutoProcessor.from_pretrained(small_tiny)
    rng = np.random.default_rng(1)
    encs = [encode_episode(processor, oracle_episode(r, small_world, rng)) for r in small_world.questions[:3]]
    batch = collate(encs, processor.tokenizer.pad_token_id)
    lengths = [len(e.input_ids) for e in encs]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert int((batch["labels"] != -100).sum()) == sum(int(e.loss_mask.sum()) for e in encs)
    assert batch["pixel_values"].shape[0] == sum(e.pixel_values.shape[0] for e in encs)


def test_evaluation_scores_episodes(small_tiny, small_paths):
    report = evaluate_warmstart(small_tiny, small_paths, split="test", per_kind=1, max_turns=2, max_new_tokens=8)
    assert report["questions"] == 4
    for key, value in report.items():
        if key.split("/")[0] in ("format_rate", "accuracy", "search_rate"):
            assert 0.0 <= value <= 1.0

