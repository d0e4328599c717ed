"""Oracle episodes as the trajectories an actor would record if its engine generated exactly the oracle's turns:
tokenised piece by piece with the actors' own episode tokenizer (first prompt, generated turn, tool-result
continuation), each image placeholder expanded the way the engine expands it, loss mask 1 on generated tokens only.
The learner's warm start (learner/sft.py, `algo=sft`) trains on these, so it never has to import actors/.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
import numpy as np

from actors.episode import EpisodeTokenizer
from data.oracle import OracleConfig, OracleEpisode, oracle_episode
from data.world import World
from protocol import Trajectory, from_ndarray, to_ndarray
from protocol.images import image_size


def trajectory_length(trajectory: Trajectory) -> int:
    return int(from_ndarray(trajectory.token_ids).shape[0])


def oracle_tokenizer(model_path: str | Path) -> EpisodeTokenizer:
    """The episode tokenizer of the model folder (its processor and chat template), as an actor builds it."""
    return EpisodeTokenizer.from_pretrained(model_path)


def expand_placeholders(ids: list[int], image_pad_id: int, counts: list[int]) -> list[int]:
    """`ids` with the k-th `image_pad_id` repeated counts[k] times, as the engine expands each image's placeholder."""
    out: list[int] = []
    k = 0
    for token in ids:
        if token == image_pad_id:
            if k >= len(counts):
                raise ValueError(f"more image placeholders than images ({len(counts)})")
            out.extend([token] * counts[k])
            k += 1
        else:
            out.append(token)
    if k != len(counts):
        raise ValueError(f"{k} image placeholders for {len(counts)} images")
    return out


def oracle_trajectory(tok: EpisodeTokenizer, episode: OracleEpisode) -> Trajectory:
    """First prompt, then per turn the generated tokens (loss mask 1) and the tool-result continuation (mask 0);
    behaviour log-probs 0 and versions -1 (nothing was sampled), reward 1 (the oracle is right)."""
    def expanded(ids: list[int], images: list[bytes]) -> list[int]:
        return expand_placeholders(ids, tok.image_pad_id, [tok.image_tokens_of_size(*image_size(b)) for b in images])

    images = [episode.image]
    ids = expanded(tok.first_prompt(episode.question), images)
    mask = [0] * len(ids)
    searches = {"image_search": 0, "text_search": 0}
    for turn in episode.turns:
        generated = tok.tokenizer.encode(turn.assistant, add_special_tokens=False)
        if tok.forbidden_ids.intersection(generated):
            raise ValueError(f"oracle turn of {episode.question_id} holds a vision placeholder: {turn.assistant!r}")
        ids += generated
        mask += [1] * len(generated)
        if turn.tool is not None:
            searches[turn.tool] += 1
            shown = [(hit.title, hit.text, hit.image is not None) for hit in turn.results]
            new = [hit.image for hit in turn.results if hit.image is not None]
            piece = expanded(tok.continuation(shown), new)
            ids += piece
            mask += [0] * len(piece)
            images += new
    n = len(ids)
    return Trajectory(token_ids=to_ndarray(np.asarray(ids, np.int32)), loss_mask=to_ndarray(np.asarray(mask, np.uint8)),
                      behaviour_logprobs=to_ndarray(np.zeros(n, np.float32)),
                      versions=to_ndarray(np.full(n, -1, np.int32)), images=images, reward=1.0,
                      image_searches=searches["image_search"], text_searches=searches["text_search"],
                      num_turns=len(episode.turns), finish_reason="answer")


class OracleStream:
    """Batches of fresh oracle trajectories (new search decisions, distractors and stand-in names every time), drawn
    in rounds of `buckets` batches of similar lengths (less padding) in random order: pixel questions answered
    without search for the first `vision_steps` batches, the full mixture after. Deterministic in `seed`, so every
    learner rank draws the same batches."""

    def __init__(self, world: World, tok: EpisodeTokenizer, oracle: OracleConfig, *, split: str = "train",
                 seed: int = 0, batch_size: int = 8, vision_steps: int = 0, buckets: int = 4) -> None:
        oracle.validate()
        if batch_size < 1 or vision_steps < 0 or buckets < 1:
            raise ValueError(f"need batch_size>=1, vision_steps>=0, buckets>=1; got {batch_size}, {vision_steps}, "
                             f"{buckets}")
        self.world, self.tok, self.oracle = world, tok, oracle
        self.batch_size, self.vision_steps, self.buckets = batch_size, vision_steps, buckets
        self.rows = [q for q in world.questions if q["split"] == split]
        self.pixel_rows = [q for q in self.rows if q["kind"] == "pixels"]
        if not self.rows or (vision_steps and not self.pixel_rows):
            raise ValueError(f"the world has {len(self.rows)} {split!r} questions, {len(self.pixel_rows)} of kind "
                             f"pixels: the warm start needs both")
        self._rng = np.random.default_rng([seed, 29])
        self._no_search = dataclasses.replace(oracle, pixel_search_fraction=0.0)
        self._pending: list[tuple[str, Trajectory]] = []
        self._batches = 0

    def next_batch(self) -> list[Trajectory]:
        return [t for _, t in self.next_batch_with_ids()]

    def next_batch_with_ids(self) -> list[tuple[str, Trajectory]]:
        """The next batch as (question id, trajectory) pairs."""
        if self._batches == self.vision_steps:
            self._pending = []  # the full mixture from now on
        if not self._pending:
            rows, oracle = ((self.pixel_rows, self._no_search) if self._batches < self.vision_steps
                            else (self.rows, self.oracle))
            size = self.batch_size * self.buckets
            picks = self._rng.choice(len(rows), size=size, replace=len(rows) < size)
            drawn: list[tuple[str, Trajectory]] = []
            for i in picks:
                episode = oracle_episode(rows[int(i)], self.world, self._rng, oracle)
                drawn.append((episode.question_id, oracle_trajectory(self.tok, episode)))
            drawn.sort(key=lambda pair: trajectory_length(pair[1]))
            batches = [drawn[b * self.batch_size:(b + 1) * self.batch_size] for b in range(self.buckets)]
            self._pending = [pair for b in self._rng.permutation(self.buckets) for pair in batches[int(b)]]
        batch, self._pending = self._pending[:self.batch_size], self._pending[self.batch_size:]
        self._batches += 1
        return batch
