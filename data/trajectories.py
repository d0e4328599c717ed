"""Batches of the synthetic world's oracle episodes as trajectories (episode/oracle.py tokenises each the way an
actor records an episode): what the learner's warm start (learner/sft.py, `algo=sft`) trains on.
"""
from __future__ import annotations

import dataclasses
import numpy as np

from data.drills import CopyDrills
from data.oracle import OracleConfig, oracle_episode
from data.world import World
from episode.oracle import oracle_trajectory, trajectory_length
from episode.tokenizer import EpisodeTokenizer
from protocol import Trajectory


DRILL = "drill"  # the question id of a copy drill in `next_batch_with_ids`


class OracleStream:
    """Batches of fresh oracle trajectories (new search decisions, distractors and stand-in names every time) and
    copy drills (data/drills.py), drawn in rounds of `buckets` batches of similar lengths (less padding) in random
    order. The first `vision_steps` batches: pixel questions answered without search, a `vision_drills` share of
    drills; after them the full mixture, a `drills` share of drills. Deterministic in `seed`, so every learner rank
    draws the same batches."""

    def __init__(self, world: World, tok: EpisodeTokenizer, oracle: OracleConfig, *, split: str = "train",
                 seed: int = 0, batch_size: int = 8, vision_steps: int = 0, buckets: int = 4,
                 vision_drills: float = 0.0, drills: float = 0.0) -> None:
        oracle.validate()
        if batch_size < 1 or vision_steps < 0 or buckets < 1:
            raise ValueError(f"need batch_size>=1, vision_steps>=0, buckets>=1; got {batch_size}, {vision_steps}, "
                             f"{buckets}")
        if not (0.0 <= vision_drills <= 1.0 and 0.0 <= drills <= 1.0):
            raise ValueError(f"drill shares must be in [0, 1]; got vision_drills={vision_drills}, drills={drills}")
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
        self.vision_drills, self.drills = vision_drills, drills
        self._drills = CopyDrills(world, tok, seed, fresh_value_fraction=oracle.fresh_value_fraction)

    def next_batch(self) -> list[Trajectory]:
        return [t for _, t in self.next_batch_with_ids()]

    def next_batch_with_ids(self) -> list[tuple[str, Trajectory]]:
        """The next batch as (question id, trajectory) pairs."""
        if self._batches == self.vision_steps:
            self._pending = []  # the full mixture from now on
        if not self._pending:
            vision = self._batches < self.vision_steps
            rows, oracle = (self.pixel_rows, self._no_search) if vision else (self.rows, self.oracle)
            share = self.vision_drills if vision else self.drills
            size = self.batch_size * self.buckets
            picks = self._rng.choice(len(rows), size=size, replace=len(rows) < size)
            drawn: list[tuple[str, Trajectory]] = []
            for i in picks:
                if share and self._rng.random() < share:
                    drawn.append((DRILL, self._drills.trajectory()))
                    continue
                episode = oracle_episode(rows[int(i)], self.world, self._rng, oracle)
                drawn.append((episode.question_id, oracle_trajectory(self.tok, episode)))
            drawn.sort(key=lambda pair: trajectory_length(pair[1]))
            batches = [drawn[b * self.batch_size:(b + 1) * self.batch_size] for b in range(self.buckets)]
            self._pending = [pair for b in self._rng.permutation(self.buckets) for pair in batches[int(b)]]
        batch, self._pending = self._pending[:self.batch_size], self._pending[self.batch_size:]
        self._batches += 1
        return batch
