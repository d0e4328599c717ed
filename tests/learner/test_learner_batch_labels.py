"""batch_stats per search label: search ratio and accuracy of each label's trajectories (for the run plots)."""
from __future__ import annotations

import numpy as np

from learner.batch import batch_stats
from learner_worlds import make_trajectory
from protocol import TrajectoryGroup


def test_search_ratio_and_accuracy_per_search_label(tiny_vlm) -> None:
    ids = tiny_vlm[1]
    rng = np.random.default_rng(0)
    free = TrajectoryGroup(group_id="f", actor_id="a", prompt_id="p1", search_label="search_free", trajectories=[
        make_trajectory(rng, ids, reward=1.0, searches=(1, 0), accuracy=1.0),
        make_trajectory(rng, ids, reward=1.0, accuracy=1.0),
        make_trajectory(rng, ids, reward=0.0),
        make_trajectory(rng, ids, reward=0.0)])
    required = TrajectoryGroup(group_id="r", actor_id="a", prompt_id="p2", search_label="search_required",
                               trajectories=[make_trajectory(rng, ids, reward=1.0, searches=(1, 1), accuracy=1.0),
                                             make_trajectory(rng, ids, reward=0.0, searches=(0, 1))])
    unlabelled = TrajectoryGroup(group_id="u", actor_id="a", prompt_id="p3", trajectories=[
        make_trajectory(rng, ids, reward=0.0, searches=(1, 0))])
    stats = batch_stats([free, required, unlabelled], version=0)
    assert stats["search_ratio_search_free"] == 0.25 and stats["accuracy_search_free"] == 0.5
    assert stats["search_ratio_search_required"] == 1.0 and stats["accuracy_search_required"] == 0.5
    assert stats["search_ratio"] == 4 / 7  # the overall ratio still counts every trajectory
    assert not [k for k in stats if k.endswith("_")]  # an unlabelled group adds no per-label key
    assert not any(k.startswith("search_ratio_") for k in batch_stats([unlabelled], version=0))
