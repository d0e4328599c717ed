"""The shared tokens reach every peer that needs them (issue 13 item 6): a learner bound beyond loopback with a token
serves an actor's LearnerLink that sends it (admissions, releases, groups, weights) and refuses, counts and fails
loudly one that does not; the tool servers' token reaches every ToolClient the actors, eval, curate and the
search-path check make; a token variable named in config but missing from the environment stops the start with an
error naming it. Listeners bind 0.0.0.0 only where the test is about binding beyond loopback; every peer connects
through 127.0.0.1.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from actors.actor import RolloutActor
from actors.config import ActorConfig, TransportConfig
from actors.eval import tool_clients
from actors.transport import LearnerLink, LearnerUnauthorized
from learner.admission import AdmissionController
from learner.config import LearnerConfig
from learner.role import LearnerRank, learner_token
from learner.service import TrajectoryService
from learner.weights import ZmqWeightPublisher
from protocol import Trajectory, TrajectoryGroup, to_ndarray
from tool_servers.errors import ToolCallError
from tool_servers.server import ToolServerRole

TOKEN = "learner-s3cret-for-tests"
TOOL_TOKEN = "tool-s3cret-for-tests"
FAST = TransportConfig(reply_timeout_s=0.5, max_backoff_s=1.0, weight_timeout_s=5.0)


def _via_loopback(endpoint: str) -> str:
    """tcp://0.0.0.0:PORT -> tcp://127.0.0.1:PORT: tests talk to 127.0.0.1 only."""
    return endpoint.replace("0.0.0.0", "127.0.0.1")


def _group(group_id: str) -> TrajectoryGroup:
    trajectory = Trajectory(token_ids=to_ndarray(np.array([1, 2, 3], np.int32)),
                            loss_mask=to_ndarray(np.array([0, 1, 1], np.uint8)),
                            behaviour_logprobs=to_ndarray(np.array([0.0, -0.5, -0.7], np.float32)),
                            versions=to_ndarray(np.array([-1, 0, 0], np.int32)), reward=1.0)
    return TrajectoryGroup(group_id=group_id, actor_id="a0", prompt_id="q0", trajectories=[trajectory])


@pytest.fixture
def wide_learner():
    """Rank 0's two endpoints bound on every interface with a token, as learner.bind_host=0.0.0.0 makes them."""
    service = TrajectoryService(AdmissionController(groups_per_step=2, max_staleness=0), endpoint="tcp://0.0.0.0:*",
                                allow_remote=True, token=TOKEN)
    weights = ZmqWeightPublisher("tcp://0.0.0.0:*", allow_remote=True, token=TOKEN, metrics=service.metrics)
    weights.publish(1, {"w": torch.arange(4, dtype=torch.float32)})
    yield service, {"trajectories": _via_loopback(service.endpoint), "weights": _via_loopback(weights.endpoint)}
    service.close()
    weights.close()


def test_a_learner_beyond_loopback_serves_the_link_with_its_token(wide_learner):
    service, endpoints = wide_learner
    assert service.endpoint.startswith("tcp://0.0.0.0:")

    async def main():
        link = LearnerLink("a0", endpoints, FAST, token=TOKEN)
        try:
            granted = await asyncio.wait_for(link.request_admission(), 10)
            spare = await asyncio.wait_for(link.request_admission(), 10)
            await link.release_admission(spare.request_id, "test gives it back")
            ack = await asyncio.wait_for(link.send_group(_group("g1")), 10)
            update = await asyncio.wait_for(link.poll_weights(0), 10)
        finally:
            await link.close()
        return granted, spare, ack, update

    granted, spare, ack, update = asyncio.run(main())
    assert granted.granted and spare.granted and ack.accepted
    assert update is not None and update.version == 1 and torch.equal(update.state["w"], torch.arange(4.0))
    counters = service.metrics.snapshot()
    assert counters["trajectories_unauthorized"] == 0 and counters["weights_unauthorized"] == 0
    assert counters["admission_releases"] == 1 and counters["groups_received"] == 1
    buffered, *_ = service.snapshot()
    assert [g.group_id for g in buffered] == ["g1"] and buffered[0].token is None  # stamped on the wire only


@pytest.mark.parametrize("token", [None, "wrong"])
def test_a_learner_beyond_loopback_refuses_and_counts_a_link_without_its_token(wide_learner, token):
    service, endpoints = wide_learner

    async def main():
        link = LearnerLink("a0", endpoints, FAST, token=token)
        try:
            with pytest.raises(LearnerUnauthorized, match="rejected the token"):
                await asyncio.wait_for(link.request_admission(), 10)
            with pytest.raises(LearnerUnauthorized):  # every later call fails at once
                await asyncio.wait_for(link.send_group(_group("g1")), 10)
            weights_link = LearnerLink("a0", endpoints, FAST, token=token)
            try:
                with pytest.raises(LearnerUnauthorized):
                    await asyncio.wait_for(weights_link.poll_weights(0), 10)
            finally:
                await weights_link.close()
        finally:
            await link.close()
        return link.metrics.snapshot()

    link_counters = asyncio.run(main())
    assert link_counters["learner_unauthorized"] == 1
    counters = service.metrics.snapshot()
    assert counters["trajectories_unauthorized"] == 1 and counters["weights_unauthorized"] == 1
    assert counters.get("admissions_granted", 0) == 0 and counters.get("groups_received", 0) == 0


# ------------------------------------------------------------------------------------------------ tool clients


@pytest.fixture(scope="module")
def guarded_tool():
    role = ToolServerRole("text_search", {"backend": "simulated"}, token=TOOL_TOKEN)
    yield role.start()
    role.stop()


def _call_every(clients) -> list:
    async def main():
        try:
            return [await client.call(tool, {"query": "otter"}) for tool, client in clients.items()]
        finally:
            for client in clients.values():
                await client.close()

    return asyncio.run(main())


def test_the_actors_tool_clients_send_the_tool_servers_token(guarded_tool, tmp_path):
    cfg = {"actors": {"tool_retries": 0}, "algo": {"group_size": 2},
           "tokens": {"tools": TOOL_TOKEN, "learner": TOKEN}}
    actor = RolloutActor("a0", str(tmp_path), str(tmp_path / "q.parquet"), {"text_search": [guarded_tool]},
                         {"trajectories": "tcp://127.0.0.1:1", "weights": "tcp://127.0.0.1:1"}, cfg, str(tmp_path))
    assert actor.cfg.tokens.learner == TOKEN and TOKEN not in repr(actor.cfg) and TOOL_TOKEN not in repr(actor.cfg)
    replies = _call_every(actor._make_tools())  # the rollout actor's own clients
    assert replies[0].ok
    # eval and curate build theirs the same way from the config launch.py hands them
    assert _call_every(tool_clients({"text_search": [guarded_tool]}, ActorConfig.from_dict(cfg)))[0].ok
    without = ActorConfig.from_dict({"actors": {"tool_retries": 0}})
    with pytest.raises(ToolCallError, match="unauthorized"):
        _call_every(tool_clients({"text_search": [guarded_tool]}, without))


def test_tokens_are_never_config_keys():
    with pytest.raises(ValueError, match="not a config key"):
        ActorConfig.from_dict({"tokens": {"tools": "x"}})
    with pytest.raises(ValueError, match="not a config key"):
        ActorConfig.from_dict({"actors": {"tokens": {"tools": "x"}}})
    with pytest.raises(ValueError, match="unknown tokens config keys"):
        ActorConfig.from_dict({"actors": {}, "tokens": {"tool": "x"}})


def test_the_search_path_check_sends_the_tool_servers_token(small_paths):
    from launcher.search_check import check_search_path

    roles = [ToolServerRole("image_search", {"backend": "local", "corpus": str(small_paths.image_corpus)},
                            token=TOOL_TOKEN),
             ToolServerRole("text_search", {"backend": "local", "corpus": str(small_paths.text_corpus)},
                            token=TOOL_TOKEN)]
    try:
        endpoints = {role.tool: [role.start()] for role in roles}
        figures = check_search_path(small_paths, endpoints, {}, limit=2, token=TOOL_TOKEN)
        assert figures["image_top1"] > 0 and figures["text_hit"] > 0
        with pytest.raises(ToolCallError, match="unauthorized"):
            check_search_path(small_paths, endpoints, {}, limit=2, deadline_s=2.0)
    finally:
        for role in roles:
            role.stop()


# ------------------------------------------------------------------------------------------------ missing variable


def test_a_token_variable_named_but_missing_stops_the_learner_before_it_joins_a_world(monkeypatch):
    monkeypatch.delenv("FORAGE_TEST_LEARNER_TOKEN", raising=False)
    with pytest.raises(ValueError, match="learner.token_env='FORAGE_TEST_LEARNER_TOKEN'.*empty or unset"):
        LearnerRank(0, 1, "127.0.0.1", 1, "/nonexistent/model",
                    {"learner": {"world_size": 1, "token_env": "FORAGE_TEST_LEARNER_TOKEN"}})
    monkeypatch.setenv("FORAGE_TEST_LEARNER_TOKEN", "")
    with pytest.raises(ValueError, match="FORAGE_TEST_LEARNER_TOKEN"):
        learner_token(LearnerConfig(token_env="FORAGE_TEST_LEARNER_TOKEN"))
    monkeypatch.setenv("FORAGE_TEST_LEARNER_TOKEN", TOKEN)
    assert learner_token(LearnerConfig(token_env="FORAGE_TEST_LEARNER_TOKEN")) == TOKEN
    assert learner_token(LearnerConfig()) is None
