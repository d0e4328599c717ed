"""A played group's scoring and counts: episodes a tool outage ended travel flagged and are counted apart, outside
the actor's reward and accuracy figures."""
from __future__ import annotations

import pytest

from actors.config import ActorConfig
from actors.episode import EpisodeResult, Question
from actors.groups import GroupPlayer
from protocol.metrics import Metrics


def _episode(turns: list[str], tool_failed: bool = False) -> EpisodeResult:
    result = EpisodeResult(token_ids=[1, 2, 3], loss_mask=[0, 1, 1], logprobs=[0.0, -0.5, -0.5], versions=[-1, 2, 2],
                           turns=turns, image_searches=int(tool_failed), tool_errors=int(tool_failed),
                           tool_failed=tool_failed, finish_reason="tool_failed" if tool_failed else "answer")
    return result


def test_tool_failed_episodes_are_flagged_counted_and_kept_out_of_the_reward_figures():
    metrics = Metrics()
    player = GroupPlayer("actor0", 0, ActorConfig(), slot=None, tokenizer=None, tools={}, spool=None,
                         metrics=metrics, reach_version=None, release_grant=None)
    question = Question(id="q", question="what colour", answer="red", aliases=[], image=b"")
    played = [(_episode(["<reason> a </reason><answer> red </answer>"]), 2),
              (_episode(["<reason> a </reason><answer> blue </answer>"]), 2),
              (_episode(["<reason> a </reason><search><img></search>"], tool_failed=True), 2)]
    group = player._make_group("g", question, played)
    assert [t.tool_failed for t in group.trajectories] == [False, False, True]
    assert group.trajectories[2].finish_reason == "tool_failed"
    snapshot = metrics.snapshot()
    assert snapshot["episodes"] == 3 and snapshot["tool_failed_episodes"] == 1 and snapshot["tool_errors"] == 1
    assert snapshot["reward_count"] == 2 and snapshot["accuracy_count"] == 2  # the outage is no sample of either
    assert snapshot["accuracy_mean"] == pytest.approx(0.5)
