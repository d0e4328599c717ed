"""Copy drills: text-only chats of the episode's own phrases whose names and values are all made up, so the answer
can only be copied from the context; the loss mask covers exactly the assistant turns."""
from __future__ import annotations

import re

import numpy as np
import pytest

from data.drills import KINDS, CopyDrills
from data.trajectories import DRILL, OracleStream
from data.oracle import OracleConfig
from episode.tokenizer import EpisodeTokenizer
from protocol import from_ndarray


@pytest.fixture(scope="module")
def tok(small_tiny):
    return EpisodeTokenizer.from_pretrained(small_tiny)


def test_every_drill_kind_copies_what_its_prompt_shows(small_world, tok):
    drills = CopyDrills(small_world, tok, seed=0)
    real = small_world.names()
    for kind in KINDS:
        for _ in range(20):
            user, assistant = drills.drill(kind)
            copied = re.findall(r"(?:is|of|says) ([a-z]+)[. ]|<answer> ([a-z0-9]+) </answer>|> ([a-z]+) [a-z]+ <",
                                assistant)
            words = {w for groups in copied for w in groups if w}
            assert words, (kind, assistant)
            assert all(w in user or w in ("the",) for w in words), (kind, user, assistant)
            assert not set(re.findall(r"[a-z]+", user + assistant)) & real  # no world name: nothing to recall
        if kind == "title":
            assert assistant.startswith("<reason>the top result is ") and "<answer>" in assistant
        if kind == "fact":
            sentence = user.split("\n")[2]
            assert assistant.startswith(f"<reason>the page says {sentence}</reason>")


def test_a_drill_chat_is_a_trajectory_with_loss_on_the_assistant_turns_only(small_world, tok):
    drills = CopyDrills(small_world, tok, seed=1, per_chat=3)
    trajectory = drills.trajectory()
    ids = from_ndarray(trajectory.token_ids)
    mask = from_ndarray(trajectory.loss_mask).astype(bool)
    text = tok.decode(ids.tolist())
    assert text.startswith("<|im_start|>user\n") and text.count("<|im_start|>assistant\n") == 3
    assistant = tok.decode(ids[mask].tolist())
    assert assistant.count("<reason>") == 3 and "<|im_start|>" not in assistant and "<|im_end|>" not in assistant
    assert not trajectory.images and trajectory.num_turns == 3
    again = CopyDrills(small_world, tok, seed=1, per_chat=3).trajectory()
    assert np.array_equal(from_ndarray(again.token_ids), ids)  # seeded
    with pytest.raises(ValueError, match="unknown drill kind"):
        drills.drill("poem")


@pytest.mark.parametrize("vision_drills, drills", [(0.0, 0.0), (0.6, 0.25), (1.0, 1.0)])
def test_the_stream_mixes_drills_in_at_the_configured_shares(small_world, tok, vision_drills, drills):
    stream = OracleStream(small_world, tok, OracleConfig(), seed=0, batch_size=8, vision_steps=6,
                          vision_drills=vision_drills, drills=drills)
    batches = [stream.next_batch_with_ids() for _ in range(12)]
    first = [qid == DRILL for batch in batches[:6] for qid, _ in batch]
    later = [qid == DRILL for batch in batches[6:] for qid, _ in batch]
    assert abs(np.mean(first) - vision_drills) < 0.2 and abs(np.mean(later) - drills) < 0.2
    with pytest.raises(ValueError, match="drill shares"):
        OracleStream(small_world, tok, OracleConfig(), drills=1.5)
