"""Batches of the synthetic world's oracle episodes as trajectories (episode/oracle.py tokenises each the way an
actor records an episode): what the learner's warm start (learner/sft.py, `algo=sft`) trains on.
"""
from __future__ import annotations

import dataclasses
import numpy as np

from data.oracle import OracleConfig, oracle_episode
from data.world import World
from episode.oracle import oracle_trajectory, trajectory_length
from episode.tokenizer import EpisodeTokenizer
from protocol import Trajectory


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
