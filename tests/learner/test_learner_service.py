"""The trajectory endpoint over real ZMQ: admissions, acks, duplicates, rejects, garbage, hand-off to training."""
from __future__ import annotations

import itertools
import threading
import time

import numpy as np
import pytest

from learner.admission import AdmissionController
from learner.batch import validate_group
from learner.service import TrajectoryService
from learner_worlds import Dealer, make_group
from protocol import (
    AdmissionRelease,
    AdmissionReply,
    AdmissionRequest,
    ErrorReply,
    GroupAck,
    LearnerOutbound,
    WeightQuery,
    decode,
    encode,
    to_ndarray,
)


@pytest.fixture
def service(tiny_vlm):
    ids = tiny_vlm[1]

    def validate(group, version):
        validate_group(group, vocab_size=ids["vocab_size"], image_token_id=ids["<|image_pad|>"],
                       max_version=version, max_image_pixels=1 << 20)

    svc = TrajectoryService(AdmissionController(groups_per_step=2, max_staleness=0), validate)
    yield svc
    svc.close()


@pytest.fixture
def dealer(service):
    peer = Dealer(service.endpoint, timeout_ms=5000)
    yield peer.socket
    peer.close()


def ask(socket, payload: bytes):
    socket.send(payload)
    return decode(socket.recv(), LearnerOutbound)


_REQUESTS = itertools.count()


def admit(socket, n: int = 1) -> list[AdmissionReply]:
    """`n` admission requests, each with a new id (as actors make them; a repeated id is a resend)."""
    return [ask(socket, encode(AdmissionRequest(actor_id="t", request_id=f"r{next(_REQUESTS)}"))) for _ in range(n)]


def test_admission_group_ack_duplicate_and_take(service, dealer, tiny_vlm) -> None:
    ids = tiny_vlm[1]
    replies = admit(dealer, 3)
    assert [r.granted for r in replies] == [True, True, False]  # (0 + 0 + 1) · 2 at version 0
    assert replies[2].retry_after_ms > 0 and not replies[2].stopping
    g1, g2 = make_group("g1", ids), make_group("g2", ids, seed=1)
    assert ask(dealer, encode(g1)) == GroupAck(group_id="g1", accepted=True)
    assert ask(dealer, encode(g1)) == GroupAck(group_id="g1", accepted=True, duplicate=True)
    assert service.take(2, timeout=0.05) == []  # only one group so far: nothing removed
    assert ask(dealer, encode(g2)).accepted
    taken = service.take(2, timeout=1.0)
    assert [g.group_id for g in taken] == ["g1", "g2"]
    assert service.metrics.counter("groups_duplicate") == 1 and service.metrics.counter("groups_received") == 2
    assert not admit(dealer)[0].granted  # accepted 2 fill version 0's capacity
    service.set_version(1)
    assert admit(dealer)[0].granted


def test_bad_frames_get_error_replies_and_the_endpoint_keeps_serving(service, dealer) -> None:
    reply = ask(dealer, b"\x93garbage")
    assert isinstance(reply, ErrorReply) and reply.code == "bad_request"
    reply = ask(dealer, encode(WeightQuery(actor_id="t", have_version=0)))
    assert isinstance(reply, ErrorReply) and "weights endpoint" in reply.message
    assert service.metrics.counter("bad_frames") == 2
    assert admit(dealer)[0].granted


def test_a_handler_that_raises_is_answered_backend_error_counted_and_the_endpoint_keeps_serving() -> None:
    from learner.router import RouterThread

    def handler(payload: bytes) -> list[bytes]:
        if payload == b"boom":
            raise RuntimeError("a bug")
        return [encode(ErrorReply(code="bad_request", message="fine"))]

    router = RouterThread("probe", handler)
    peer = Dealer(router.endpoint, timeout_ms=5000)
    try:
        for payload, code in ((b"boom", "backend_error"), (b"ok", "bad_request")):
            reply = ask(peer.socket, payload)
            assert isinstance(reply, ErrorReply) and reply.code == code, reply
        assert router.metrics.counter("probe_handler_errors") == 1
    finally:
        peer.close()
        router.close()


def test_invalid_group_is_refused_and_frees_its_admission(service, dealer, tiny_vlm) -> None:
    assert admit(dealer, 2)[1].granted
    bad = make_group("bad", tiny_vlm[1])
    bad.trajectories[0].images = []
    ack = ask(dealer, encode(bad))
    assert not ack.accepted and "placeholder" in ack.message
    assert service.admission.running == 1 and service.metrics.counter("groups_rejected") == 1
    assert ask(dealer, encode(bad)).accepted is False  # a rejected id is not remembered as seen


def test_a_released_admission_frees_its_slot_once(service, dealer) -> None:
    replies = admit(dealer, 3)
    assert [r.granted for r in replies] == [True, True, False]  # capacity 2 at version 0
    first = replies[0].request_id
    dealer.send(encode(AdmissionRelease(actor_id="t", request_id=first, reason="engine crashed twice")))
    dealer.send(encode(AdmissionRelease(actor_id="t", request_id=first)))  # a repeat frees nothing more
    dealer.send(encode(AdmissionRelease(actor_id="t", request_id="never-granted")))
    reply = ask(dealer, encode(AdmissionRequest(actor_id="t", request_id="fresh-after-release")))
    assert reply.granted  # the released slot was reused, and no reply was sent for the releases
    assert not admit(dealer)[0].granted
    assert service.metrics.counter("admission_releases") == 1
    assert service.metrics.counter("admission_releases_unknown") == 2
    assert service.admission.running == 2


def test_tokens_from_a_future_version_are_refused_until_the_learner_has_it(service, dealer, tiny_vlm) -> None:
    group = make_group("future", tiny_vlm[1])
    for traj in group.trajectories:
        versions = np.frombuffer(traj.versions.data, dtype=np.int32)
        traj.versions = to_ndarray(np.where(versions >= 0, 1, -1).astype(np.int32))
    ack = ask(dealer, encode(group))
    assert not ack.accepted and "versions span [1, 1]" in ack.message
    service.set_version(1)
    assert ask(dealer, encode(group)).accepted


def test_stopping_refuses_admissions_and_wakes_take(service, dealer) -> None:
    result: list = []
    waiter = threading.Thread(target=lambda: result.append(service.take(2, timeout=30)))
    waiter.start()
    time.sleep(0.1)
    service.stop_admissions()
    waiter.join(5)
    assert result == [[]]
    reply = admit(dealer)[0]
    assert not reply.granted and reply.stopping


def test_closed_intake_refuses_new_groups_so_a_snapshot_is_final(service, dealer, tiny_vlm) -> None:
    ids = tiny_vlm[1]
    admit(dealer, 2)
    assert ask(dealer, encode(make_group("kept", ids))).accepted
    service.close_intake()
    refused = ask(dealer, encode(make_group("late", ids, seed=1)))
    assert isinstance(refused, ErrorReply) and refused.code == "overloaded" and refused.id == "late"
    assert ask(dealer, encode(make_group("kept", ids))).duplicate  # a resend of an acked group is still acked
    groups, seen, admission, journal_seq = service.snapshot()
    assert journal_seq == -1  # no journal
    assert [g.group_id for g in groups] == ["kept"] and seen == ["kept"]
    assert admission == {"accepted": 1, "running": 1, "unexpected": 0}
    assert service.metrics.counter("groups_refused_closed") == 1
    service.open_intake()
    assert ask(dealer, encode(make_group("late", ids, seed=1))).accepted


def test_a_restored_service_serves_its_checkpointed_groups_first_and_knows_their_ids(tiny_vlm) -> None:
    ids = tiny_vlm[1]
    old = [make_group("old1", ids), make_group("old2", ids, seed=1)]
    svc = TrajectoryService(AdmissionController(2, 1), restore=(old, ["trained0", "old1", "old2"]), version=3)
    peer = Dealer(svc.endpoint, timeout_ms=5000)
    socket = peer.socket
    try:
        assert ask(socket, encode(make_group("trained0", ids))).duplicate  # trained before the restart
        assert ask(socket, encode(make_group("new", ids, seed=2))).accepted
        assert [g.group_id for g in svc.take(2, 1.0)] == ["old1", "old2"]
        svc.requeue([old[1]])
        assert [g.group_id for g in svc.take(2, 1.0)] == ["old2", "new"]
        assert admit(socket)[0].version == 3
    finally:
        peer.close()
        svc.close()


def test_a_resent_admission_request_gets_the_same_grant_not_a_second_slot(service, dealer) -> None:
    """An actor resends its request when the reply is lost: the repeat is answered granted without another slot."""
    first = ask(dealer, encode(AdmissionRequest(actor_id="t", request_id="again")))
    repeat = ask(dealer, encode(AdmissionRequest(actor_id="t", request_id="again")))
    assert first.granted and repeat.granted and service.admission.running == 1
    assert service.metrics.counter("admission_repeats") == 1
    assert admit(dealer)[0].granted and not admit(dealer)[0].granted  # capacity 2: one slot was left


def test_retry_pending_covers_a_denied_actors_retry_delay() -> None:
    """The learner's idle clock puts waits down to `admission_retry` while a denied actor sleeps out retry_after_ms."""
    svc = TrajectoryService(AdmissionController(groups_per_step=1, max_staleness=0), retry_after_ms=60_000)
    peer = Dealer(svc.endpoint, timeout_ms=5000)
    socket = peer.socket
    try:
        assert not svc.retry_pending()  # nobody was denied yet
        granted, denied = admit(socket, 2)  # room for one group at version 0
        assert granted.granted and not denied.granted and denied.retry_after_ms == 60_000
        assert svc.retry_pending()
    finally:
        peer.close()
        svc.close()
    quick = TrajectoryService(AdmissionController(groups_per_step=1, max_staleness=0), retry_after_ms=1)
    try:
        quick._admit(AdmissionRequest(actor_id="t", request_id="q1"))
        assert not quick._admit(AdmissionRequest(actor_id="t", request_id="q2")).granted
        time.sleep(0.01)
        assert not quick.retry_pending()  # its 1 ms delay is over: the actor may ask again
    finally:
        quick.close()
