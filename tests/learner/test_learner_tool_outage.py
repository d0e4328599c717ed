"""Rank 0's step intake under a tool outage, through the real trajectory endpoint (ZMQ on 127.0.0.1): a group left
without contrast by tool_failed episodes is dropped, counted and its admission slot given back; the others are
trained without their flagged episodes, and the metrics row says how many were left out and how many reached the
loss. (The masking itself: test_learner_batch.py; zero gradient: test_learner_trainer.py.)"""
from __future__ import annotations

import json
import threading

import msgspec
import zmq

from learner.admission import AdmissionController, IdleClock
from learner.batch import samples_from_groups
from learner.config import AlgoConfig, LearnerConfig
from learner.role import LearnerRank
from learner.service import TrajectoryService
from learner_worlds import make_group
from protocol import AdmissionRequest, GroupAck, LearnerOutbound, TrajectoryGroup, decode, encode
from protocol.ledger import Ledger
from protocol.metrics import Metrics


def flag(group: TrajectoryGroup, *positions: int) -> TrajectoryGroup:
    trajectories = [msgspec.structs.replace(t, tool_failed=True) if i in positions else t
                    for i, t in enumerate(group.trajectories)]
    return msgspec.structs.replace(group, trajectories=trajectories)


def rank0(algo: AlgoConfig, ledger: Ledger | None = None) -> LearnerRank:
    """Rank 0's intake and bookkeeping without a model or a process group (the step's collectives are not needed
    to take groups and record a row)."""
    rank = LearnerRank.__new__(LearnerRank)
    rank.algo, rank.learner = algo, LearnerConfig.from_dict({"world_size": 1, "take_timeout_s": 0.1})
    rank.version, rank.trained_count = 0, 0
    rank.metrics, rank._lock, rank._rows, rank._stop = Metrics(), threading.Lock(), [], threading.Event()
    rank.admission = AdmissionController(algo.groups_per_step, algo.max_staleness)
    if ledger is not None:
        rank._ledger = ledger
    rank.service = TrajectoryService(rank.admission, metrics=rank.metrics, ledger=ledger)
    return rank


def test_an_outage_group_is_dropped_counted_and_its_slot_given_back(tiny_vlm, tmp_path) -> None:
    ids = tiny_vlm[1]
    algo = AlgoConfig.from_dict({"group_size": 4, "groups_per_step": 2, "max_staleness": 0})
    rank = rank0(algo, Ledger(tmp_path / "learner.jsonl"))
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, 5000)
    dealer.connect(rank.service.endpoint)

    def ask(message):
        dealer.send(encode(message))
        return decode(dealer.recv(), LearnerOutbound)

    try:
        down = flag(make_group("down", ids), 0, 1, 2)  # one episode left: no contrast, dropped
        half = flag(make_group("half", ids, seed=1, rewards=(1.0, 0.0, 0.0, 1.0)), 3)  # trained on three
        clean = make_group("clean", ids, seed=2, rewards=(0.0, 1.0, 1.0, 0.0))
        rank.service.open_intake()
        assert all(ask(AdmissionRequest(actor_id="t", request_id=f"r{i}")).granted for i in range(2))
        assert not ask(AdmissionRequest(actor_id="t", request_id="r2")).granted  # (0 + 0 + 1) · 2 at version 0
        for group in (down, half):
            assert ask(group) == GroupAck(group_id=group.group_id, accepted=True)
        taken: list = []
        worker = threading.Thread(target=lambda: taken.append(rank._take_groups(IdleClock())))
        worker.start()
        # The dropped group's slot comes back, so a third group may start and complete the step.
        granted = False
        for attempt in range(50):
            granted = ask(AdmissionRequest(actor_id="t", request_id=f"x{attempt}")).granted
            if granted:
                break
            threading.Event().wait(0.05)
        assert granted
        assert ask(clean).accepted
        worker.join(timeout=10)
        (groups,) = taken
        assert [g.group_id for g in groups] == ["half", "clean"]
        assert rank.metrics.counter("tool_failed_groups_dropped") == 1
        assert rank.metrics.counter("tool_failed_episodes") == 4  # 3 in the dropped group, 1 in "half"

        samples = samples_from_groups(groups, algo)
        assert len(samples) == 7
        rank._record(groups, 0, {"loss": 0.0, "seq_tokens": 1.0, "model_tokens": 1.0,
                                 "loss_trajectories": float(len(samples))}, 0.1, 0.1, 0.1, IdleClock())
        (row,) = rank.drain_metrics()
        assert (row["trajectories"], row["tool_failed_masked"], row["loss_trajectories"]) == (8, 1, 7)
        assert (row["tool_failed_episodes"], row["tool_failed_groups_dropped"]) == (4, 1)
        assert row["reward_mean"] == 3 / 7  # (1 + 0 + 0) + (0 + 1 + 1 + 0) over the seven that count
        # The group ledger (launcher/audit.py) says what became of each: accepted, and the outage's group dropped.
        lines = [json.loads(line) for line in (tmp_path / "learner.jsonl").read_text().splitlines()]
        assert [(line["event"], line["group_id"]) for line in lines] == [
            ("accepted", "down"), ("accepted", "half"), ("dropped", "down"), ("accepted", "clean")]
        assert lines[2]["reason"] == "tool_failed" and lines[2]["version"] == 0
    finally:
        dealer.close()
        context.term()
        rank.service.close()
