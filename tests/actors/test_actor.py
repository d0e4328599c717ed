"""RolloutActor's loop with a fake engine, fake tools and a fake learner: admissions (denied, granted, stopping),
seeded question order, groups of G acked trajectories with rewards, in-place weight updates, stop and metrics."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from actors.actor import RolloutActor
from actors.engine import EngineError, TurnOutput, TurnRequest
from actors.questions import QuestionOrder, load_questions
from actors.spool import Grant, GroupSpool
from actors_helpers import FakeLearner, FakeTools, solid_image, weight_buckets
from episode.tokenizer import EpisodeTokenizer
from protocol import (AdmissionRelease, AdmissionReply, AdmissionRequest, GroupAck, TrajectoryGroup, WeightNone,
                      WeightQuery, from_ndarray)
from protocol.images import encode_png


def _write_questions(path: Path, n: int = 5) -> Path:
    rows = [{"id": f"q{i}", "image": encode_png(solid_image((40 * i, 30, 30))), "question": f"what colour {i}",
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

    async def update_weights(self, version: int, paths) -> float:
        state = {}
        for path in paths:
            state.update(load_file(str(path)))
        self.updates.append((version, state))
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
    assert metrics["actor_episodes_per_s"] > 0 and metrics["actor_tokens_per_s"] > 0
    assert metrics["actor_turns_per_episode_mean"] == 1 and metrics["actor_searches_per_episode_mean"] == 0
    assert metrics["actor_weight_update_s_count"] == 1 and metrics["actor_policy_version"] == 1
    assert metrics["actor_token_staleness_count"] == 9 and metrics["actor_token_staleness_max_max"] >= 0
    assert engine.closed
    assert not list((tmp_path / "run").rglob("*.msgpack"))  # every acked group left the spool
    other = FakeActor("a1", str(tiny_model_dir), str(tmp_path / "q.parquet"), {}, {}, cfg, str(tmp_path))
    assert other.seed != actor.seed  # actors sharing cfg.seed still get their own order and sampling seeds


def _granting_learner(limit: int = 10**9, ack: bool = True, weights: dict | None = None):
    """A fake learner that grants `limit` admissions (then says stopping), acks groups when `ack` (a mutable
    list: [True] / [False]), and serves `weights` as version 1 (granting nothing until the actor has them)."""
    state = {"granted": 0, "ack": [ack] if isinstance(ack, bool) else ack, "groups": [], "releases": [],
             "admissions": 0, "has_weights": weights is None}

    def policy(m):
        if isinstance(m, AdmissionRequest):
            state["admissions"] += 1
            if not state["has_weights"]:
                return [AdmissionReply(request_id=m.request_id, granted=False, version=1, retry_after_ms=10)]
            if state["granted"] >= limit:
                return [AdmissionReply(request_id=m.request_id, granted=False, version=0, stopping=True)]
            state["granted"] += 1
            return [AdmissionReply(request_id=m.request_id, granted=True, version=0)]
        if isinstance(m, TrajectoryGroup):
            state["groups"].append(m)
            return [GroupAck(group_id=m.group_id, accepted=True)] if state["ack"][0] else []
        if isinstance(m, AdmissionRelease):
            state["releases"].append(m)
            return []
        if isinstance(m, WeightQuery):
            state["has_weights"] = state["has_weights"] or m.have_version >= 1
            if weights is None or m.have_version >= 1:
                return [WeightNone(version=1 if weights else 0)]
            return weight_buckets(1, weights)
        return []

    return policy, state


def _actor(cls, tmp_path, learner, cfg, actor_id="a0"):
    return cls(actor_id, str(_TINY[0]), str(tmp_path / "q.parquet"), {},
               {"trajectories": learner.endpoint, "weights": learner.endpoint}, cfg, str(tmp_path / "run"))


_TINY: list = []


@pytest.fixture(autouse=True)
def _remember_model(tiny_model_dir):
    _TINY[:] = [tiny_model_dir]


def test_group_failing_every_attempt_fails_run_and_releases_its_admission(tmp_path):
    class BrokenEngine(AnsweringEngine):
        async def generate(self, request):
            raise RuntimeError("engine died")

    class BrokenActor(FakeActor):
        def _make_engine(self):
            return BrokenEngine(self.tokenizer)

    _write_questions(tmp_path / "q.parquet")
    policy, state = _granting_learner(limit=1)

    async def main():
        learner = FakeLearner(policy)
        actor = _actor(BrokenActor, tmp_path, learner, {"group_size": 2})
        await actor.start()
        try:
            with pytest.raises(RuntimeError, match="failed 3 times.*engine died"):
                await asyncio.wait_for(actor.run(), 30)
            await asyncio.sleep(0.1)
            return actor.metrics()
        finally:
            await actor.stop()
            await learner.close()

    metrics = asyncio.run(main())
    assert metrics["actor_group_failures"] == 3 and metrics["actor_group_reruns"] == 2
    assert metrics["actor_admissions_released"] == 1 and "actor_engine_restarts" not in metrics  # it never died
    assert len(state["releases"]) == 1 and not state["groups"]  # nothing partial was shipped
    assert not list((tmp_path / "run").rglob("grants/*.json"))  # the released grant is forgotten
    # The ledger says the group was given up, with the admission and the reason (launcher/audit.py: dropped)
    started, given_up = [line for line in _ledger(tmp_path) if line["event"] in ("started", "given_up")]
    assert (given_up["group_id"], given_up["request_id"]) == (started["group_id"], started["request_id"])
    assert "engine died" in given_up["reason"] and given_up["actor"] == "a0"
    assert given_up["request_id"] == state["releases"][0].request_id


def _ledger(tmp_path, actor_id="a0") -> list[dict]:
    """The actor's group ledger lines (<run>/ledger/<actor_id>.jsonl)."""
    path = tmp_path / "run" / "ledger" / f"{actor_id}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


class CrashingEngine(AnsweringEngine):
    """Dies (like vLLM's EngineDeadError: every call in flight and after fails) at its `crash_at`-th request."""

    def __init__(self, tok, crash_at: int | None) -> None:
        super().__init__(tok)
        self.crash_at = crash_at
        self.calls = 0
        self.dead = False

    def is_healthy(self) -> bool:
        return not self.dead

    async def generate(self, request):
        self.calls += 1
        if self.crash_at is not None and self.calls >= self.crash_at:
            self.dead = True
        await asyncio.sleep(0.02)
        if self.dead:
            raise RuntimeError("EngineCore encountered an issue")
        return await super().generate(request)


def test_engine_crash_restarts_the_engine_and_reruns_the_groups(tmp_path):
    engines = []

    class Actor(FakeActor):
        def _make_engine(self):
            engines.append(CrashingEngine(self.tokenizer, crash_at=5 if not engines else None))
            return engines[-1]

    _write_questions(tmp_path / "q.parquet")
    weights = {"model.language_model.norm.weight": np.full(4, 3.0, dtype=np.float32)}
    policy, state = _granting_learner(limit=4, weights=weights)
    cfg = {"group_size": 3, "max_concurrency": 6, "max_groups_in_flight": 2, "weight_poll_s": 0.02,
           "transport": {"reply_timeout_s": 0.3}}

    async def main():
        learner = FakeLearner(policy)
        actor = _actor(Actor, tmp_path, learner, cfg)
        await actor.start()
        await asyncio.wait_for(actor.run(), 30)  # admissions only once version 1 is in: the restart must keep it
        metrics = actor.metrics()
        await actor.stop()
        await learner.close()
        return metrics

    metrics = asyncio.run(main())
    assert len(engines) == 2 and engines[0].dead and not engines[1].dead
    assert engines[1].updates[0][0] == 1  # re-applied the newest version after the restart
    unique = {g.group_id: g for g in state["groups"]}
    assert len(unique) == state["granted"] == 4  # never lost: one group per admission
    for group in unique.values():  # never partial: every group whole, every episode played to its answer
        assert len(group.trajectories) == 3
        assert all(t.finish_reason == "answer" and t.num_turns == 1 for t in group.trajectories)
    assert metrics["actor_engine_restarts"] == 1 and metrics["actor_group_reruns"] >= 1
    assert metrics["actor_engine_restart_s_count"] == 1 and metrics["actor_episodes"] == 12
    assert not state["releases"]


class HangingEngine(AnsweringEngine):
    """Healthy to is_healthy() but never answers its `hang_at`-th request (and none after)."""

    def __init__(self, tok, hang_at: int | None) -> None:
        super().__init__(tok)
        self.hang_at, self.calls = hang_at, 0

    async def generate(self, request):
        self.calls += 1
        if self.hang_at is not None and self.calls >= self.hang_at:
            await asyncio.sleep(3600)
        return await super().generate(request)


def test_a_hung_engine_is_restarted_and_its_group_rerun(tmp_path):
    engines = []

    class Actor(FakeActor):
        def _make_engine(self):
            engines.append(HangingEngine(self.tokenizer, hang_at=3 if not engines else None))
            return engines[-1]

    _write_questions(tmp_path / "q.parquet")
    policy, state = _granting_learner(limit=2)
    cfg = {"group_size": 2, "max_groups_in_flight": 1, "episode": {"turn_timeout_s": 0.5},
           "transport": {"reply_timeout_s": 0.3}}

    async def main():
        learner = FakeLearner(policy)
        actor = _actor(Actor, tmp_path, learner, cfg)
        await actor.start()
        await asyncio.wait_for(actor.run(), 30)
        metrics = actor.metrics()
        await actor.stop()
        await learner.close()
        return metrics

    metrics = asyncio.run(main())
    assert len(engines) == 2 and engines[0].closed  # the hung engine was replaced, though it never "died"
    unique = {g.group_id: g for g in state["groups"]}
    assert len(unique) == 2 and all(len(g.trajectories) == 2 for g in unique.values())
    assert metrics["actor_engine_restarts"] == 1 and metrics["actor_engine_turn_timeouts"] >= 1
    assert metrics["actor_group_reruns"] == 1 and not state["releases"]


def test_engine_that_keeps_dying_fails_the_actor(tmp_path):
    class Actor(FakeActor):
        def _make_engine(self):
            return CrashingEngine(self.tokenizer, crash_at=1)

    _write_questions(tmp_path / "q.parquet")
    policy, state = _granting_learner(limit=1)

    async def main():
        learner = FakeLearner(policy)
        actor = _actor(Actor, tmp_path, learner, {"group_size": 2, "max_engine_restarts": 1})
        await actor.start()
        try:
            with pytest.raises(EngineError, match="died again after 1 restart"):
                await asyncio.wait_for(actor.run(), 30)
            for _ in range(100):  # the release is fire-and-forget: let the fake learner read it under load
                if state["releases"]:
                    break
                await asyncio.sleep(0.05)
        finally:
            await actor.stop()
            await learner.close()

    asyncio.run(main())
    assert len(state["releases"]) == 1 and not state["groups"]


def test_slow_learner_is_back_pressure_not_memory(tmp_path):
    _write_questions(tmp_path / "q.parquet")
    acking = [False]
    policy, state = _granting_learner(limit=6, ack=acking)
    cfg = {"group_size": 2, "spool_max_groups": 3, "max_groups_in_flight": 2,
           "transport": {"reply_timeout_s": 0.2, "max_backoff_s": 0.2}}

    async def main():
        learner = FakeLearner(policy)
        actor = _actor(FakeActor, tmp_path, learner, cfg)
        await actor.start()
        running = asyncio.create_task(actor.run())
        spool = tmp_path / "run" / "actors" / "a0" / "spool" / "groups"
        while len(list(spool.glob("*.msgpack"))) < 3:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.6)  # several resend rounds: the actor holds its 3 groups and asks for nothing more
        held = (state["admissions"], len(list(spool.glob("*.msgpack"))), actor.link.unacked)
        acking[0] = True  # the learner catches up: resends are acked and admissions resume
        await asyncio.wait_for(running, 30)
        metrics = actor.metrics()
        await actor.stop()
        await learner.close()
        return held, metrics

    (admissions, spooled, unacked), metrics = asyncio.run(main())
    assert (admissions, spooled, unacked) == (3, 3, 3)
    assert len({g.group_id for g in state["groups"]}) == 6 and metrics["actor_group_resends"] >= 3
    assert metrics["actor_spool_full_waits"] >= 1
    assert not list((tmp_path / "run").rglob("*.msgpack"))


def test_unacked_groups_and_grants_survive_an_actor_restart(tmp_path):
    _write_questions(tmp_path / "q.parquet")
    acking = [False]
    policy, state = _granting_learner(limit=2, ack=acking)
    cfg = {"group_size": 2, "stop_timeout_s": 0.5, "transport": {"reply_timeout_s": 0.2}}

    async def first_life():
        learner = FakeLearner(policy)
        actor = _actor(FakeActor, tmp_path, learner, cfg)
        await actor.start()
        running = asyncio.create_task(actor.run())
        while len({g.group_id for g in state["groups"]}) < 2:
            await asyncio.sleep(0.02)
        await actor.stop()  # the learner never acked: the groups stay on disk
        await running
        await learner.close()
        return learner.endpoint

    endpoint = asyncio.run(first_life())
    spool = tmp_path / "run" / "actors" / "a0" / "spool"
    files = sorted((spool / "groups").glob("*.msgpack"))
    left = sorted(p.stem.split("~")[0] for p in files)  # <group_id>~<request_id>
    assert len(left) == 2 and all("~" in p.stem for p in files)
    # ... and an admission granted just before the process died, its group never finished
    GroupSpool(spool, 4).record_grant(Grant(request_id="lost-req", question_id="q1", version=0))
    # ... one asked for whose answer it never recorded (the learner may hold a slot for it)
    GroupSpool(spool, 4).record_request("asked-req")
    # ... and one whose group was stored but whose grant file outlived it (the crash fell between the two)
    spooled_req = files[0].stem.split("~")[1]
    GroupSpool(spool, 4).record_grant(Grant(request_id=spooled_req, question_id="q2", version=0))

    acking[0] = True
    state["granted"] = 10**9  # the restarted learner grants nothing new: only leftovers can arrive
    state["groups"].clear()

    async def second_life():
        learner = FakeLearner(policy, endpoint)
        actor = _actor(FakeActor, tmp_path, learner, cfg)
        await actor.start()
        await asyncio.wait_for(actor.run(), 30)
        metrics = actor.metrics()
        await actor.stop()
        await learner.close()
        return metrics

    metrics = asyncio.run(second_life())
    delivered = {g.group_id: g for g in state["groups"]}
    assert set(left) <= set(delivered) and len(delivered) == 3
    replayed = [g for gid, g in delivered.items() if gid not in left]
    assert replayed[0].prompt_id == "q1" and len(replayed[0].trajectories) == 2
    assert metrics["actor_spool_resent"] == 2 and metrics["actor_spool_replayed"] == 1  # not the spooled one
    assert metrics["actor_spool_admissions_released"] == 1
    assert [r.request_id for r in state["releases"]] == ["asked-req"]
    assert not list(spool.rglob("*.msgpack")) and not list(spool.rglob("grants/*.json"))
    assert not list((spool / "requests").iterdir())
    # The ledger of both lives: two processes (open), two groups started and sent by the first, never acked; the
    # second resent them and re-played the leftover grant under a new group id, and released the unanswered request.
    lines = _ledger(tmp_path)
    pids = [line["pid"] for line in lines if line["event"] == "open"]
    assert len(pids) == 2  # one process here, two lives: each start() opens
    first, second = (lines[:[i for i, x in enumerate(lines) if x["event"] == "open"][1]],
                     lines[[i for i, x in enumerate(lines) if x["event"] == "open"][1]:])
    assert sorted(x["group_id"] for x in first if x["event"] == "started") == left
    assert sorted(x["group_id"] for x in first if x["event"] == "sent") == left
    assert not [x for x in first if x["event"] == "acked"]
    [replay] = [x for x in second if x["event"] == "started"]
    assert replay["request_id"] == "lost-req" and replay["question_id"] == "q1" and replay["version"] == 0
    assert {x["group_id"] for x in second if x["event"] == "acked" and x["accepted"]} == set(delivered)
    assert [(x["request_id"], x["event"]) for x in second if "request_id" in x and x["event"] != "started"] == [
        ("asked-req", "released")]


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
        asyncio.run(main(8))  # fewer tokens than any first prompt (image included)


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


def test_actor_evaluates_held_out_questions_greedily_at_one_version(tmp_path, tiny_model_dir):
    """evaluate(): per-label held-out subset, greedy sampling, the slot's lock held (no weight update mid-pass),
    samples scored by the real reward; a bad mode fails before any episode."""
    rows = [{"id": f"q{i}", "image": encode_png(solid_image((40 * i, 30, 30))), "question": f"what colour {i}",
             "answer": "red" if i % 2 == 0 else "blue", "aliases": [], "kind": "pixels",
             "search_label": "search_free" if i < 4 else "search_required", "split": "test"} for i in range(7)]
    path = tmp_path / "q.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    seen = []

    class Recording(AnsweringEngine):
        async def generate(self, request):
            seen.append((request.sampling.temperature, actor._slot.lock.locked(), request.request_id))
            return await super().generate(request)

    class EvalActor(FakeActor):
        def _make_engine(self):
            return Recording(self.tokenizer)

    endpoints = {"trajectories": "tcp://127.0.0.1:1", "weights": "tcp://127.0.0.1:1"}
    actor = EvalActor("a0", str(tiny_model_dir), str(path), {}, endpoints, {"split": "test"}, str(tmp_path / "run"))

    async def main():
        with pytest.raises(RuntimeError, match="before start"):
            await actor.evaluate("policy")
        await actor.start()
        try:
            out = await actor.evaluate("policy", split="test", per_label=2)
            with pytest.raises(ValueError, match="unknown eval mode"):
                await actor.evaluate("sometimes_search")
            return out, actor.metrics()
        finally:
            await actor.stop()

    out, metrics = asyncio.run(main())
    assert out["mode"] == "policy" and out["version"] == 0 and out["seconds"] > 0
    assert [s["id"] for s in out["samples"]] == ["q0", "q1", "q4", "q5"]  # the first 2 of each label
    assert [s["correct"] for s in out["samples"]] == [True, False, True, False]  # the engine always says red
    assert all(s["searches"] == 0 for s in out["samples"])
    assert seen and all(t == 0.0 and locked and rid.startswith("eval-policy") for t, locked, rid in seen)
    assert metrics["actor_eval_passes"] == 1
