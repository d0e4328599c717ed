"""Two FSDP2 ranks (gloo, 127.0.0.1) fed through the real ZMQ endpoints by a DEALER in the test: admission →
group → ack, duplicate → duplicate ack, garbage → ErrorReply; one step; new weights served in checkpoint naming
and equal to a 1-process reference step; a batch one rank cannot collate is skipped by all ranks; stop() from
another thread ends a run() blocked waiting for groups."""
from __future__ import annotations

import multiprocessing as mp

import msgspec
import numpy as np
import pytest
import torch
from safetensors import safe_open

from learner.admission import IDLE_CAUSES
from learner.batch import pack_groups
from learner_worlds import Dealer, expect, make_group, rank_main, reference_main
from protocol import (
    AdmissionReply,
    AdmissionRequest,
    ErrorReply,
    GroupAck,
    WeightNone,
    WeightQuery,
    encode,
    from_ndarray,
    to_ndarray,
)
from protocol.sockets import free_port
from protocol.weights import assemble_weight_buckets

CFG = {
    "learner": {"world_size": 2, "lr": 1e-2, "grad_clip": 1.0, "micro_batch_tokens": 40, "weight_bucket_mb": 0.05,
                "take_timeout_s": 0.2, "collective_timeout_s": 60},
    "algo": {"group_size": 4, "groups_per_step": 2, "max_staleness": 1, "correction": "decoupled"},
    "steps": 3,  # only one step's groups are sent: run() then blocks until stop() from another thread
}


def checkpoint(path: str) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.slow
def test_two_ranks_train_through_the_zmq_endpoints_and_match_a_reference(tiny_vlm, tmp_path) -> None:
    path, ids = tiny_vlm
    ctx = mp.get_context("spawn")
    q, done = ctx.Queue(), ctx.Event()
    port = free_port()
    ranks = [ctx.Process(target=rank_main, args=(r, 2, port, path, CFG, q, done), daemon=True)
             for r in range(2)]
    for p in ranks:
        p.start()
    groups = [make_group("g1", ids, seed=1), make_group("g2", ids, seed=2, rewards=(0.0, 1.0, 0.5, 0.0))]
    reference_out = str(tmp_path / "reference.safetensors")
    reference = None
    try:
        endpoints = expect(q, "endpoints", timeout=90)
        trajectories, weights = Dealer(endpoints["trajectories"]), Dealer(endpoints["weights"])
        try:
            query = encode(WeightQuery(actor_id="t", have_version=-1))
            initial_version, initial = assemble_weight_buckets(weights.ask(query))
            saved = checkpoint(f"{path}/model.safetensors")
            assert initial_version == 0 and set(initial) == set(saved)
            assert all(torch.equal(initial[k], saved[k]) for k in saved)

            (reply,) = trajectories.ask(encode(AdmissionRequest(actor_id="t", request_id="a1")))
            assert isinstance(reply, AdmissionReply) and reply.granted and reply.version == 0
            assert trajectories.ask(encode(groups[0])) == [GroupAck(group_id="g1", accepted=True)]
            assert trajectories.ask(encode(groups[0])) == [GroupAck(group_id="g1", accepted=True, duplicate=True)]
            (error,) = trajectories.ask(b"\xff\x00 not msgpack")
            assert isinstance(error, ErrorReply) and error.code == "bad_request"
            assert trajectories.ask(encode(AdmissionRequest(actor_id="t", request_id="a2")))[0].granted
            # The reference trains the same two groups in a separate 1-rank world meanwhile.
            reference = ctx.Process(target=reference_main, args=(free_port(), path, CFG, pack_groups(groups),
                                                                 reference_out), daemon=True)
            reference.start()
            assert trajectories.ask(encode(groups[1])) == [GroupAck(group_id="g2", accepted=True)]

            (row,) = expect(q, "metrics", timeout=60)
            assert row["policy_version"] == 1 and row["groups"] == 2 and row["trajectories"] == 8
            assert row["groups_duplicate"] == 1 and row["bad_frames"] == 1 and row["groups_received"] == 2
            assert row["loss_tokens"] == row["tokens_generated"] > 0
            assert 0.0 <= row["learner_idle_frac"] <= 1.0 and row["grad_norm"] > 0
            # the wait split by cause adds up to the wait (less the bookkeeping between polls)
            causes = sum(row[f"learner_idle_{c}_s"] for c in IDLE_CAUSES)
            assert row["learner_idle_s"] > 0 and 0.9 * row["learner_idle_s"] - 0.01 <= causes <= row["learner_idle_s"]
            assert row["broadcast_s"] >= 0

            version, updated = assemble_weight_buckets(weights.ask(encode(WeightQuery(actor_id="t", have_version=0))))
            assert version == 1 and set(updated) == set(saved)
            changed = [k for k in saved if not torch.equal(updated[k], saved[k])]
            assert len(changed) > len(saved) // 2, f"only {changed} changed"
            assert weights.ask(encode(WeightQuery(actor_id="t", have_version=1))) == [WeightNone(version=1)]
            (reply,) = trajectories.ask(encode(AdmissionRequest(actor_id="t", request_id="a3")))
            assert reply.granted and reply.version == 1

            reference.join(60)
            assert reference.exitcode == 0, f"reference process exited with {reference.exitcode}"
            expected = checkpoint(reference_out)
            worst = max((updated[k] - expected[k]).abs().max().item() for k in expected)
            assert worst < 1e-5, f"2-rank FSDP2 step differs from the 1-rank reference by {worst}"

            # A group that passes receipt checks but cannot be collated (3 placeholders for a 4-token image):
            # every rank skips that batch together instead of one rank raising and the other hanging.
            bad = make_group("bad", ids, seed=3)
            tokens = np.frombuffer(bad.trajectories[0].token_ids.data, dtype=np.int32)
            keep = np.ones(len(tokens), dtype=bool)
            keep[np.flatnonzero(tokens == ids["<|image_pad|>"])[0]] = False
            bad.trajectories[0] = msgspec.structs.replace(bad.trajectories[0], **{
                name: to_ndarray(from_ndarray(getattr(bad.trajectories[0], name))[keep])
                for name in ("token_ids", "loss_mask", "behaviour_logprobs", "versions")})
            assert trajectories.ask(encode(bad))[0].accepted
            assert trajectories.ask(encode(make_group("g3", ids, seed=4)))[0].accepted
            assert expect(q, "skipped", timeout=30) == 1

            done.set()  # stop() while run() waits for groups that never come
            assert expect(q, "stopped", timeout=20) == 1  # the skipped batch did not advance the version
        finally:
            trajectories.close()
            weights.close()
    finally:
        done.set()
        for p in ranks + ([reference] if reference is not None else []):
            p.join(20)
            if p.is_alive():
                p.terminate()
                p.join(5)
    assert all(p.exitcode == 0 for p in ranks), [p.exitcode for p in ranks]
