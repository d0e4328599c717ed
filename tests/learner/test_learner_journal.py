"""The intake journal: an acked group is on disk before its ack; a service built after a crash replays what the
checkpoint does not hold (after its trained and buffered groups), knows the replayed ids (resends are duplicates),
and a fresh start discards an old run's entries. Real ZMQ sockets; the crash is simply not closing the service."""
from __future__ import annotations

import zmq

from learner.admission import AdmissionController
from learner.journal import GroupJournal
from learner.service import TrajectoryService
from learner_worlds import make_group
from protocol import ErrorReply, GroupAck, decode, encode
from protocol.messages import LearnerOutbound


class Client:
    def __init__(self, endpoint: str) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVTIMEO, 5000)
        self.socket.connect(endpoint)

    def send(self, group):
        self.socket.send(encode(group))
        return decode(self.socket.recv(), LearnerOutbound)

    def close(self) -> None:
        self.socket.close()
        self.context.term()


def _service(journal_dir, replay_after, **kwargs) -> TrajectoryService:
    return TrajectoryService(AdmissionController(2, 4), journal=GroupJournal(journal_dir), replay_after=replay_after,
                             **kwargs)


def test_journal_numbers_frames_and_truncates(tmp_path):
    journal = GroupJournal(tmp_path)
    assert [journal.append(f) for f in (b"a", b"b", b"c")] == [0, 1, 2]
    assert journal.entries_after(0) == [(1, b"b"), (2, b"c")]
    assert journal.truncate(1) == 2 and journal.count() == 1
    (tmp_path / ".000000000003.msgpack.tmp").write_bytes(b"half")  # an append cut by a crash: never acked
    again = GroupJournal(tmp_path)
    assert again.last_seq == 2 and again.append(b"d") == 3
    assert not list(tmp_path.glob(".*.tmp"))


def test_acked_groups_survive_a_crash_and_come_back_after_the_checkpointed_ones(tmp_path, tiny_vlm):
    ids = tiny_vlm[1]
    groups = [make_group(f"g{i}", ids, seed=i) for i in range(5)]
    first = _service(tmp_path / "journal", None)
    client = Client(first.endpoint)
    try:
        assert [client.send(g) for g in groups[:3]] == [GroupAck(group_id=f"g{i}", accepted=True) for i in range(3)]
        trained = first.take(2, 1.0)  # g0, g1 trained ...
        buffered, seen, admission, seq = first.snapshot()  # ... then a checkpoint holding g2 (buffered)
        first.checkpointed(seq)
        assert seq == 2 and [g.group_id for g in buffered] == ["g2"] and len(trained) == 2
        assert GroupJournal(tmp_path / "journal").count() == 0  # the checkpoint holds all three
        assert [client.send(g).accepted for g in groups[3:]] == [True, True]  # acked after the checkpoint
    finally:
        client.close()
        first._router.close()  # the crash: no final checkpoint
    assert sorted(p.name for p in (tmp_path / "journal").iterdir()) == ["000000000003.msgpack",
                                                                        "000000000004.msgpack"]
    resumed = _service(tmp_path / "journal", seq, restore=(buffered, seen))
    client = Client(resumed.endpoint)
    try:
        assert [g.group_id for g in resumed.take(3, 1.0)] == ["g2", "g3", "g4"]  # checkpoint first, then replay
        assert client.send(groups[4]).duplicate and client.send(groups[0]).duplicate  # nothing trained twice
        assert resumed.metrics.counter("journal_replayed") == 2
        assert resumed.admission.unexpected == 2  # replayed groups count as arrivals without a grant
    finally:
        client.close()
        resumed.close()


def test_a_crash_between_the_checkpoint_and_the_truncation_replays_nothing_twice(tmp_path, tiny_vlm):
    ids = tiny_vlm[1]
    first = _service(tmp_path / "journal", None)
    client = Client(first.endpoint)
    try:
        assert client.send(make_group("a", ids)).accepted
        buffered, seen, _, seq = first.snapshot()  # the checkpoint completes, then the process dies
    finally:
        client.close()
        first._router.close()
    resumed = _service(tmp_path / "journal", seq, restore=(buffered, seen))
    try:
        assert [g.group_id for g in resumed.take(1, 1.0)] == ["a"] and resumed.buffered() == 0
        assert resumed.metrics.counter("journal_replayed") == 0 and GroupJournal(tmp_path / "journal").count() == 0
    finally:
        resumed.close()


def test_a_fresh_start_discards_an_old_runs_entries_and_counts_them(tmp_path, tiny_vlm):
    journal = GroupJournal(tmp_path / "journal")
    journal.append(encode(make_group("old", tiny_vlm[1])))
    fresh = _service(tmp_path / "journal", None)
    try:
        assert fresh.buffered() == 0 and fresh.metrics.counter("journal_discarded") == 1
        assert GroupJournal(tmp_path / "journal").count() == 0
    finally:
        fresh.close()


def test_resuming_without_any_checkpoint_replays_the_whole_journal(tmp_path, tiny_vlm):
    journal = GroupJournal(tmp_path / "journal")
    for name in ("x", "y"):
        journal.append(encode(make_group(name, tiny_vlm[1])))
    (tmp_path / "journal" / "000000000002.msgpack").write_bytes(b"\x00garbage")  # damaged on disk
    resumed = _service(tmp_path / "journal", -1)
    try:
        assert [g.group_id for g in resumed.take(2, 1.0)] == ["x", "y"]
        assert resumed.metrics.counter("journal_bad_entries") == 1
    finally:
        resumed.close()


def test_a_journal_that_cannot_write_refuses_the_group_so_the_actor_keeps_it(tmp_path, tiny_vlm, monkeypatch):
    service = _service(tmp_path / "journal", None)
    client = Client(service.endpoint)

    def disk_full(self, frame):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(GroupJournal, "append", disk_full)
    try:
        reply = client.send(make_group("kept-by-actor", tiny_vlm[1]))
        assert isinstance(reply, ErrorReply) and reply.code == "overloaded" and reply.id == "kept-by-actor"
        assert "No space left" in reply.message
        assert service.buffered() == 0 and service.metrics.counter("journal_errors") == 1
        assert service.snapshot()[1] == []  # not remembered: the resend is accepted once the disk works
    finally:
        client.close()
        service.close()
