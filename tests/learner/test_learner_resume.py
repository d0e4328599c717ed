"""Stop and resume two FSDP2 ranks: an uninterrupted run (A) and a run stopped after step 1 (B) then resumed from
its final checkpoint (C) train the same groups in the same order to the same weights; B's acked-but-untrained
groups come back from the checkpoint (none lost), groups trained before the stop are acked as duplicates when
resent (none trained twice), the intake is closed once the final checkpoint is taken, and a group older than
max_staleness after the resume is dropped and counted (algo.stale_policy=drop_counted)."""
from __future__ import annotations

import multiprocessing as mp

import pytest
import torch
from safetensors.torch import load_file

from learner.checkpoint import list_checkpoints
from learner_worlds import Dealer, expect, make_group, resume_rank_main
from protocol import ErrorReply, GroupAck, WeightQuery, encode
from protocol.sockets import free_port

BASE = {
    "learner": {"world_size": 2, "lr": 1e-2, "grad_clip": 1.0, "micro_batch_tokens": 64, "take_timeout_s": 0.2,
                "collective_timeout_s": 60, "lr_schedule": "cosine", "warmup_steps": 1, "decay_steps": 4,
                "weight_decay": 0.01, "packing": True},
    "algo": {"group_size": 4, "groups_per_step": 2, "max_staleness": 2, "stale_policy": "drop_counted"},
}


def config(steps: int, **learner: object) -> dict:
    return {"learner": {**BASE["learner"], **learner}, "algo": dict(BASE["algo"]), "steps": steps}


class World:
    """Two spawned LearnerRanks driven through their endpoints."""

    def __init__(self, path: str, cfg: dict, out: str) -> None:
        ctx = mp.get_context("spawn")
        self.q, self.go, self.release = ctx.Queue(), ctx.Event(), ctx.Event()
        port = free_port()
        self.ranks = [ctx.Process(target=resume_rank_main, daemon=True,
                                  args=(r, 2, port, path, cfg, self.q, self.go, self.release, out))
                      for r in range(2)]
        for p in self.ranks:
            p.start()
        info = expect(self.q, "endpoints", timeout=90)
        self.version = info["version"]
        self.trajectories, self.weights = Dealer(info["trajectories"]), Dealer(info["weights"])

    def send(self, *groups) -> list:
        return [self.trajectories.ask(encode(g))[0] for g in groups]

    def wait_version(self, version: int, timeout: float = 60.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self.weights.ask(encode(WeightQuery(actor_id="t", have_version=version - 1)))[0]
            if getattr(reply, "version", -1) >= version:
                return
            time.sleep(0.1)
        pytest.fail(f"the learner did not reach version {version} within {timeout}s")

    def finish(self) -> dict:
        done = expect(self.q, "done", timeout=90)
        return done

    def close(self) -> None:
        self.release.set()
        self.go.set()
        for dealer in (self.trajectories, self.weights):
            dealer.close()
        for p in self.ranks:
            p.join(30)
            if p.is_alive():
                p.terminate()
                p.join(5)
        assert all(p.exitcode == 0 for p in self.ranks), [p.exitcode for p in self.ranks]


@pytest.mark.slow
def test_stop_and_resume_matches_an_uninterrupted_run(tiny_vlm, tmp_path) -> None:
    path, ids = tiny_vlm
    early = [make_group(f"g{i}", ids, seed=i, rewards=(1.0, 0.0, 0.5 * (i % 2), 0.25)) for i in range(6)]
    late = [make_group(f"g{i}", ids, seed=i, version=3) for i in (6, 7)]
    stale = make_group("old", ids, seed=9, version=0)  # at version 3 its tokens are 3 > max_staleness=2 behind

    def drive_to_the_end(world: World) -> dict:
        world.wait_version(3)
        assert world.send(stale, *late) == [GroupAck(group_id=g.group_id, accepted=True) for g in (stale, *late)]
        return world.finish()

    # A: uninterrupted, 4 steps
    a = World(path, config(4), str(tmp_path / "a.safetensors"))
    try:
        assert all(ack.accepted for ack in a.send(*early))
        a.go.set()
        done_a = drive_to_the_end(a)
    finally:
        a.close()

    # B: one step, then run() returns and writes the final checkpoint with g2..g5 still buffered
    ckpt = tmp_path / "ckpt"
    b = World(path, config(1, checkpoint_dir=str(ckpt)), str(tmp_path / "b.safetensors"))
    try:
        assert all(ack.accepted for ack in b.send(*early))
        b.go.set()
        done_b = b.finish()
        (refused,) = b.send(make_group("too-late", ids, seed=20))  # intake closed with the final checkpoint
        assert isinstance(refused, ErrorReply) and refused.code == "overloaded"
    finally:
        b.close()
    assert done_b["version"] == 1 and done_b["trained"] == ["g0", "g1"]
    assert [p.name for p in list_checkpoints(ckpt)] == ["step_00000001"]

    # C: resume from the latest checkpoint and train 3 more steps
    c = World(path, config(3, checkpoint_dir=str(ckpt), resume_from="latest", checkpoint_every=2),
              str(tmp_path / "c.safetensors"))
    try:
        assert c.version == 1
        resent = c.send(early[1], early[3])  # trained before the stop / buffered in the checkpoint
        assert [(ack.group_id, ack.duplicate) for ack in resent] == [("g1", True), ("g3", True)]
        c.go.set()
        done_c = drive_to_the_end(c)
    finally:
        c.close()

    assert done_a["trained"] == ["g0", "g1", "g2", "g3", "g4", "g5", "g6", "g7"]
    assert done_b["trained"] + done_c["trained"] == done_a["trained"]  # none lost, none twice
    assert done_a["version"] == done_c["version"] == 4
    last_a, last_c = done_a["rows"][-1], done_c["rows"][-1]
    assert last_a["stale_groups_dropped"] == last_c["stale_groups_dropped"] == 1
    assert [r["lr"] for r in done_c["rows"]] == pytest.approx([r["lr"] for r in done_a["rows"][1:]])
    assert [r["loss"] for r in done_c["rows"]] == pytest.approx([r["loss"] for r in done_a["rows"][1:]], abs=1e-6)
    assert [p.name for p in list_checkpoints(ckpt)] == ["step_00000002", "step_00000004"]  # periodic (every 2), final
    weights_a, weights_c = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "c.safetensors"))
    worst = max((weights_a[k] - weights_c[k]).abs().max().item() for k in weights_a)
    assert worst < 1e-6, f"resumed weights differ from the uninterrupted run by {worst}"
    assert any(not torch.equal(weights_a[k], load_file(str(tmp_path / "b.safetensors"))[k]) for k in weights_a)


@pytest.mark.slow
def test_a_killed_learner_resumes_from_its_checkpoint_and_journal_losing_no_acked_group(tiny_vlm, tmp_path) -> None:
    """SIGKILL both ranks (no final checkpoint) after step 3; the checkpoint is at step 2. The groups acked after it
    — trained in step 3 (their effect died with the processes) or waiting — come back from the journal, and the
    version sequence is an uninterrupted run's: g0 g1 → v1, g2 g3 → v2, g4 g5 (in flight at the kill) → v3, g6 g7 →
    v4, as rank 0's group ledger shows once the killed process's step 3 is rolled back (launcher/audit.py)."""
    import time

    from launcher.audit import audit_run

    path, ids = tiny_vlm
    groups = [make_group(f"g{i}", ids, seed=i, version=0 if i < 4 else 2) for i in range(8)]  # within staleness
    ckpt = tmp_path / "ckpt"
    ledger = str(tmp_path / "ledger" / "learner.jsonl")
    d = World(path, config(10, checkpoint_dir=str(ckpt), checkpoint_every=2, ledger=ledger),
              str(tmp_path / "d.safetensors"))
    try:
        assert all(ack.accepted for ack in d.send(*groups[:4]))
        d.go.set()
        d.wait_version(2)
        deadline = time.monotonic() + 60
        while [p.name for p in list_checkpoints(ckpt)] != ["step_00000002"]:
            assert time.monotonic() < deadline, "no periodic checkpoint at step 2"
            time.sleep(0.1)
        assert all(ack.accepted for ack in d.send(*groups[4:7]))  # acked after the checkpoint
        d.wait_version(3)  # g4, g5 trained; g6 waits for a partner
    finally:
        for rank in d.ranks:
            rank.kill()
            rank.join(10)
        for dealer in (d.trajectories, d.weights):
            dealer.close()
    assert [p.name for p in list_checkpoints(ckpt)] == ["step_00000002"]
    assert len(list((ckpt / "journal").glob("*.msgpack"))) == 3

    e = World(path, config(2, checkpoint_dir=str(ckpt), resume_from="latest", ledger=ledger),
              str(tmp_path / "e.safetensors"))
    try:
        assert e.version == 2
        resent = e.send(groups[1], groups[5], groups[7])  # trained before the checkpoint / journaled / new
        assert [(a.group_id, a.accepted, a.duplicate) for a in resent] == [
            ("g1", True, True), ("g5", True, True), ("g7", True, False)]
        e.go.set()
        done = e.finish()
    finally:
        e.close()
    assert done["version"] == 4 and done["trained"] == ["g4", "g5", "g6", "g7"]  # none lost, g4/g5 retrained once
    assert done["rows"][0]["journal_replayed"] == 3
    assert [r["policy_version"] for r in done["rows"]] == [3, 4]
    # The same version sequence as an uninterrupted run, across the kill, with nothing trained twice.
    audit = audit_run(tmp_path)
    assert audit.trained_by_step == {1: ["g0", "g1"], 2: ["g2", "g3"], 3: ["g4", "g5"], 4: ["g6", "g7"]}, audit.text()
    assert audit.learner_opens == 2 and audit.rolled_back == 2 and not audit.trained_twice  # d's step 3 undone
    assert not list((ckpt / "journal").glob("*.msgpack"))  # the final checkpoint holds everything
