"""RolloutActor's loop with a fake engine, fake tools and a fake learner: admissions (denied, granted, stopping),
seeded question order, groups of G acked trajectories with rewards, in-place weight updates, stop and metrics."""
from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from actors.actor import QuestionOrder, RolloutActor, load_questions
from actors.engine import TurnOutput, TurnRequest
from actors.episode import EpisodeTokenizer
from actors_helpers import FakeLearner, FakeTools, png_bytes, solid_image, weight_buckets
from protocol import (AdmissionReply, AdmissionRequest, GroupAck, TrajectoryGroup, WeightNone, WeightQuery,
                      from_ndarray)


def _write_questions(path: Path, n: int = 5) -> Path:
    rows = [{"id": f"q{i}", "image": png_bytes(solid_image((40 * i, 30, 30))), "question": f"what colour {i}",
             "answer": "red" if i % 2 == 0 else "blue", "aliases": [], "kind": "visual", "search_label": "no_search",
             "split": "train" if i < n - 1 else "test"} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


class AnsweringEngine:
    """Answers every turn with `<reason> look </reason><answer> red </answer>`; records weight updates."""

    def __init__(self, tok: EpisodeTokenizer) -> None:
        self.tok = tok
        self.version = 0
        self.startup_s = 0.0
        self.updates: list[tuple[int, dict]] = []
        self.closed = False
        self.answer = tok.tokenizer.encode("<reason> look </reason><answer> red </answer>", add_special_tokens=False)

    async def start(self) -> None:
        pass

    async def generate(self, request: TurnRequest) -> TurnOutput:
        await asyncio.sleep(0.01)
        expanded = []
        for t in request.prompt_token_ids:
            expanded.extend([t] * (4 if t == self.tok.image_pad_id else 1))
        return TurnOutput(prompt_token_ids=expanded, token_ids=list(self.answer), logprobs=[-0.5] * len(self.answer),
                          versions=[self.version] * len(self.answer), finish_reason="stop")

    async def update_weights(self, version: int, path) -> float:
        self.updates.append((version, load_file(str(path))))
        self.version = version
        return 0.001

    async def close(self) -> None:
        self.closed = True


class FakeActor(RolloutActor):
    def _make_engine(self):
        return AnsweringEngine(self.tokenizer)

    def _make_tools(self):
        return FakeTools().as_clients()


def test_question_loading_and_order(tmp_path):
    path = _write_questions(tmp_path / "q.parquet")
    train = load_questions(path, "train")
    assert [q.id for q in train] == ["q0", "q1", "q2", "q3"]
    assert len(load_questions(path, None)) == 5
    with pytest.raises(ValueError, match="no questions"):
        load_questions(path, "dev")
    pq.write_table(pa.Table.from_pylist([{"id": "x", "question": "q"}]), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="lacks columns"):
        load_questions(tmp_path / "bad.parquet")
    a, b = QuestionOrder(train, seed=3), QuestionOrder(train, seed=3)
    first = [a.next().id for _ in range(8)]
    assert first == [b.next().id for _ in range(8)]
    assert sorted(first[:4]) == sorted(first[4:]) == ["q0", "q1", "q2", "q3"]  # each epoch covers all


def test_actor_plays_acked_groups_and_applies_weights(tmp_path, tiny_model_dir):
    weights = {"model.language_model.norm.weight": np.full(4, 2.0, dtype=np.float32)}
    cfg = {"actors": {"num_actors": 1, "max_concurrency": 3, "weight_poll_s": 0.05, "seed": 1,
                      "transport": {"reply_timeout_s": 0.3}},
           "algo": {"group_size": 3}}

    async def main():
        admissions = []
        groups: list[TrajectoryGroup] = []

        def policy(m):
            if isinstance(m, AdmissionRequest):
                admissions.append(m)
                if len(admissions) == 1:
                    return [AdmissionReply(request_id=m.request_id, granted=False, version=0, retry_after_ms=10)]
                stopping = len(admissions) > 4
                return [AdmissionReply(request_id=m.request_id, granted=not stopping, version=0, stopping=stopping)]
            if isinstance(m, TrajectoryGroup):
                first = all(g.group_id != m.group_id for g in groups)
                groups.append(m)
                return [] if len(groups) == 1 else [GroupAck(group_id=m.group_id, accepted=True, duplicate=not first)]
            if isinstance(m, WeightQuery):
                return [WeightNone(version=1)] if m.have_version >= 1 else weight_buckets(1, weights)
            return []

        learner = FakeLearner(policy)
        actor = FakeActor("a0", str(tiny_model_dir), str(_write_questions(tmp_path / "q.parquet")),
                          {"image_search": ["tcp://127.0.0.1:1"]},
                          {"trajectories": learner.endpoint, "weights": learner.endpoint}, cfg, str(tmp_path / "run"))
        await actor.start()
        await asyncio.wait_for(actor.run(), 30)
        metrics = actor.metrics()
        engine = actor.engine
        await actor.stop()
        await learner.close()
        return admissions, groups, metrics, engine, actor

    admissions, groups, metrics, engine, actor = asyncio.run(main())
    assert len(admissions) == 5  # denied, 3 granted, stopping
    unique = {g.group_id: g for g in groups}
    assert len(unique) == 3 and len(groups) >= 4  # the first group was resent until acked
    order = QuestionOrder(load_questions(tmp_path / "q.parquet"), seed=actor.seed)
    assert sorted(g.prompt_id for g in unique.values()) == sorted(order.next().id for _ in range(3))
    for g in unique.values():
        assert g.actor_id == "a0" and g.kind == "visual" and len(g.trajectories) == 3
        for t in g.trajectories:
            mask = from_ndarray(t.loss_mask)
            assert mask.sum() == len(engine.answer) and t.finish_reason == "answer" and t.num_turns == 1
            expected = 1.0 if g.prompt_id in ("q0", "q2") else 0.1  # answered "red": right for even ids
            assert t.reward == pytest.approx(expected)
    # the weights were pulled and applied in place, through a file that is gone afterwards
    assert [v for v, _ in engine.updates] == [1]
    assert engine.updates[0][1]["model.language_model.norm.weight"].tolist() == [2.0] * 4
    assert not list((tmp_path / "run").rglob("*.safetensors"))
    assert metrics["actor_episodes"] == 9 and metrics["actor_admissions_denied"] == 1
    assert metrics["actor_weight_updates"] == 1 and metrics["actor_groups_acked"] == 3
    assert metrics["actor_tokens_generated"] == 9 * len(engine.answer)
    assert engine.closed
    other = FakeActor("a1", str(tiny_model_dir), str(tmp_path / "q.parquet"), {}, {}, cfg, str(tmp_path))
    assert other.seed != actor.seed  # actors sharing cfg.seed still get their own order and sampling seeds


def test_failed_episode_fails_run(tmp_path, tiny_model_dir):
    class BrokenEngine(AnsweringEngine):
        async def generate(self, request):
            raise RuntimeError("engine died")

    class BrokenActor(FakeActor):
        def _make_engine(self):
            return BrokenEngine(self.tokenizer)

    async def main():
        learner = FakeLearner(lambda m: [AdmissionReply(request_id=m.request_id, granted=True, version=0)]
                              if isinstance(m, AdmissionRequest) else
                              [WeightNone(version=0)] if isinstance(m, WeightQuery) else [])
        actor = BrokenActor("a0", str(tiny_model_dir), str(_write_questions(tmp_path / "q.parquet")), {},
                            {"trajectories": learner.endpoint, "weights": learner.endpoint},
                            {"group_size": 2}, str(tmp_path / "run"))
        await actor.start()
        try:
            with pytest.raises(RuntimeError, match="engine died"):
                await asyncio.wait_for(actor.run(), 30)
        finally:
            await actor.stop()
            await learner.close()

    asyncio.run(main())


def test_questions_that_cannot_fit_are_skipped_before_admission(tmp_path, tiny_model_dir):
    path = _write_questions(tmp_path / "q.parquet")
    table = pq.read_table(path).to_pylist()
    table[0]["question"] = "long " * 400  # far beyond max_total_tokens
    table[1]["image"] = b"broken"
    pq.write_table(pa.Table.from_pylist(table), path)
    endpoints = {"trajectories": "tcp://127.0.0.1:1", "weights": "tcp://127.0.0.1:1"}

    async def main(limit):
        actor = FakeActor("a0", str(tiny_model_dir), str(path), {}, endpoints,
                          {"episode": {"max_total_tokens": limit}}, str(tmp_path / "run"))
        try:
            await actor.start()
            return [q.id for q in actor._order._questions], actor.metrics()
        finally:
            await actor.stop()

    ids, metrics = asyncio.run(main(1024))
    assert ids == ["q2", "q3"] and metrics["actor_questions_skipped"] == 2
    with pytest.raises(ValueError, match="no playable question"):
        asyncio.run(main(64))


def test_run_before_start_is_an_error(tmp_path):
    actor = RolloutActor("a0", str(tmp_path), str(tmp_path / "q.parquet"), {}, {"trajectories": "x", "weights": "y"},
                         {}, str(tmp_path))
    with pytest.raises(RuntimeError, match="before start"):
        asyncio.run(actor.run())


def test_failed_weight_update_stops_the_actor(tmp_path, tiny_model_dir):
    class FailingUpdate(AnsweringEngine):
        async def update_weights(self, version, path):
            raise RuntimeError("reload failed")

    class Actor(FakeActor):
        def _make_engine(self):
            return FailingUpdate(self.tokenizer)

    async def main():
        weights = {"w": np.zeros(2, dtype=np.float32)}
        learner = FakeLearner(lambda m: [AdmissionReply(request_id=m.request_id, granted=False, version=0,
                                                        retry_after_ms=20)] if isinstance(m, AdmissionRequest)
                              else weight_buckets(1, weights) if isinstance(m, WeightQuery) else [])
        actor = Actor("a0", str(tiny_model_dir), str(_write_questions(tmp_path / "q.parquet")), {},
                      {"trajectories": learner.endpoint, "weights": learner.endpoint},
                      {"weight_poll_s": 0.05}, str(tmp_path / "run"))
        await actor.start()
        try:
            with pytest.raises(RuntimeError, match="applying new weights failed") as info:
                await asyncio.wait_for(actor.run(), 30)
            assert "reload failed" in str(info.value.__cause__)
            assert actor.metrics()["actor_weight_errors"] == 1
        finally:
            await actor.stop()
            await learner.close()

    asyncio.run(main())
