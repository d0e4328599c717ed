"""Oracle episodes as actor trajectories (data/trajectories.py): the actors' own episode loop, fed the oracle's
turns and hits, records exactly the same tokens and mask; the whole chat template agrees; the stream is
deterministic and switches from pixel questions to the mixture."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from actors.config import EpisodeConfig, SamplingConfig
from actors.engine import TurnOutput, TurnRequest
from actors.episode import Question, run_episode
from data.oracle import OracleConfig, oracle_episode
from data.trajectories import OracleStream
from episode.oracle import oracle_trajectory
from episode.tokenizer import EpisodeTokenizer, expand_placeholders
from protocol import ToolItem, ToolReply, from_ndarray
from warmstart_reference import encode_episode

KINDS = ("pixels", "image_search", "image_text_search", "text_search")


def _episodes(world, seed: int = 0, cfg: OracleConfig = OracleConfig(pixel_search_fraction=1.0)):
    rng = np.random.default_rng(seed)
    return [oracle_episode(next(q for q in world.questions if q["kind"] == kind), world, rng, cfg) for kind in KINDS]


def test_expand_placeholders_by_hand():
    assert expand_placeholders([1, 9, 2, 9, 3], 9, [2, 3]) == [1, 9, 9, 2, 9, 9, 9, 3]
    with pytest.raises(ValueError, match="1 image placeholders for 2 images"):
        expand_placeholders([9, 1], 9, [4, 4])
    with pytest.raises(ValueError, match="more image placeholders"):
        expand_placeholders([9, 9], 9, [4])


class _ReplayEngine:
    """Scripted engine for the actor side of the comparison: returns the oracle's turn tokens and expands each
    image placeholder by the count the processor gives that image (as vLLM does)."""

    def __init__(self, tok: EpisodeTokenizer, turns: list[list[int]], images: list[bytes]) -> None:
        from protocol.images import decode_image

        self.tok, self.turns = tok, list(turns)
        self.counts = [tok.image_tokens(decode_image(b)) for b in images]

    async def generate(self, request: TurnRequest) -> TurnOutput:
        prompt = expand_placeholders(request.prompt_token_ids, self.tok.image_pad_id,
                                     self.counts[:len(request.images)])
        tokens = self.turns.pop(0)
        return TurnOutput(prompt_token_ids=prompt, token_ids=tokens, logprobs=[-0.5] * len(tokens),
                          versions=[0] * len(tokens), finish_reason="stop")


class _ReplayTools:
    """Tool clients answering with the oracle's hits, in order."""

    def __init__(self, results: list[tuple]) -> None:
        self.results = list(results)

    async def call(self, tool: str, args: dict, deadline_s: float | None = None) -> ToolReply:
        hits = self.results.pop(0)
        return ToolReply(id="r", ok=True, items=[ToolItem(title=h.title, text=h.text, image=h.image) for h in hits])


def test_oracle_trajectory_is_exactly_what_an_actor_records(small_world, small_tiny):
    """The actor's own episode loop, fed the oracle's turns and hits, records the same tokens and loss mask."""
    world = small_world
    tok = EpisodeTokenizer.from_pretrained(small_tiny)
    for episode in _episodes(world):
        trajectory = oracle_trajectory(tok, episode)
        turns = [tok.tokenizer.encode(t.assistant, add_special_tokens=False) for t in episode.turns]
        images = [episode.image] + [h.image for t in episode.turns for h in t.results if h.image is not None]
        tools = _ReplayTools([t.results for t in episode.turns if t.tool is not None])
        question = Question(id=episode.question_id, question=episode.question, answer=episode.answer, aliases=[],
                            image=episode.image, kind=episode.kind)
        cfg = EpisodeConfig(max_result_chars=10_000, max_total_tokens=4096)
        result = asyncio.run(run_episode(_ReplayEngine(tok, turns, images), tok,
                                         {"image_search": tools, "text_search": tools}, question, cfg,
                                         SamplingConfig(), "r"))
        assert result.finish_reason == "answer", episode.kind
        assert from_ndarray(trajectory.token_ids).tolist() == result.token_ids, episode.kind
        assert from_ndarray(trajectory.loss_mask).tolist() == result.loss_mask, episode.kind
        assert trajectory.images == result.images
        assert (trajectory.image_searches, trajectory.text_searches) == (result.image_searches, result.text_searches)


def test_oracle_trajectory_agrees_with_the_whole_chat_template(small_world, small_tiny):
    """An independent rendering: the processor on the whole conversation expands images itself. The trajectory is
    its prefix (the template adds the last turn's <|im_end|>), and the loss tokens decode to the assistant turns."""
    tok = EpisodeTokenizer.from_pretrained(small_tiny)
    for episode in _episodes(small_world, seed=1):
        trajectory = oracle_trajectory(tok, episode)
        ids, mask = from_ndarray(trajectory.token_ids), from_ndarray(trajectory.loss_mask).astype(bool)
        whole = encode_episode(tok.processor, episode, tok.prompt).input_ids.tolist()
        assert whole[:len(ids)] == ids.tolist()
        assert tok.decode(whole[len(ids):]).strip() == "<|im_end|>"
        assert tok.decode(ids[mask].tolist()) == "".join(t.assistant for t in episode.turns)
        assert not mask[0] and (from_ndarray(trajectory.versions) == -1).all()
        assert int((ids == tok.image_pad_id).sum()) == 4 * len(trajectory.images)  # 56x56 images: 4 tokens each


def _ids(batch) -> list[list[int]]:
    return [from_ndarray(t.token_ids).tolist() for _, t in batch]


def test_oracle_stream_is_deterministic_and_switches_phase(small_world, small_tiny):
    tok = EpisodeTokenizer.from_pretrained(small_tiny)
    kwargs = dict(seed=0, batch_size=3, vision_steps=2)
    a, b = OracleStream(small_world, tok, OracleConfig(), **kwargs), OracleStream(small_world, tok, OracleConfig(),
                                                                                  **kwargs)
    batches = []
    for _ in range(6):
        batch_a, batch_b = a.next_batch_with_ids(), b.next_batch_with_ids()
        assert len(batch_a) == 3 and _ids(batch_a) == _ids(batch_b)
        batches.append(batch_a)
    by_id = {q["id"]: q for q in small_world.questions}
    vision = [by_id[qid] for batch in batches[:2] for qid, _ in batch]
    assert all(q["kind"] == "pixels" and q["split"] == "train" for q in vision)
    assert all(t.image_searches == t.text_searches == 0 for batch in batches[:2] for _, t in batch)
    mixture = {by_id[qid]["kind"] for batch in batches[2:] for qid, _ in batch}
    assert len(mixture) > 1 and all(by_id[qid]["split"] == "train" for batch in batches[2:] for qid, _ in batch)
    other = OracleStream(small_world, tok, OracleConfig(), **{**kwargs, "seed": 1})
    assert _ids(other.next_batch_with_ids()) != _ids(OracleStream(small_world, tok, OracleConfig(),
                                                                  **kwargs).next_batch_with_ids())


def test_oracle_stream_rejects_bad_settings(small_world, small_tiny):
    tok = EpisodeTokenizer.from_pretrained(small_tiny)
    with pytest.raises(ValueError, match="batch_size"):
        OracleStream(small_world, tok, OracleConfig(), batch_size=0)
    with pytest.raises(ValueError, match="'nope' questions"):
        OracleStream(small_world, tok, OracleConfig(), split="nope")
