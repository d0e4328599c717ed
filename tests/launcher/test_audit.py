"""launcher/audit.py on hand-written ledgers: every started group lands in exactly one class (trained, dropped by
reason, regenerated, pending with where, trained twice, conflicting, lost); a resumed learner's roll-back; the places
a pending group is found (final checkpoint buffer, journal, actor spool group and grant); torn lines; the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.audit import AuditError, audit_run, main
from learner.batch import pack_groups
from protocol import TrajectoryGroup, encode


def write(path: Path, *lines: dict, raw: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps({"t": 0.0, "pid": 1, **line}) + "\n")
        f.write(raw)


def started(group_id: str, request_id: str, version: int = 0, actor: str = "actor0") -> dict:
    return {"event": "started", "actor": actor, "group_id": group_id, "request_id": request_id, "version": version}


def trained(group_id: str, version: int) -> dict:
    return {"event": "trained", "group_id": group_id, "version": version, "step": version + 1}


def dropped(group_id: str, reason: str, version: int) -> dict:
    return {"event": "dropped", "group_id": group_id, "reason": reason, "version": version}


def opened(version: int = 0) -> dict:
    return {"event": "open", "version": version}


def group(group_id: str) -> TrajectoryGroup:
    return TrajectoryGroup(group_id=group_id, actor_id="actor0", prompt_id="q")


def accounted(audit) -> int:
    return (audit.trained + sum(len(v) for v in audit.dropped.values()) + len(audit.regenerated) + len(audit.pending)
            + len(audit.lost) + len([g for g in audit.trained_twice if g not in audit.unstarted])
            + len(audit.conflicting))


def test_a_clean_run_accounts_for_every_group_once(tmp_path):
    ledger = tmp_path / "ledger"
    write(ledger / "actor0.jsonl", {"event": "open", "actor": "actor0"},
          started("a", "r1"), started("b", "r2"), started("c", "r3"), started("d", "r4"), started("e", "r5"),
          {"event": "sent", "actor": "actor0", "group_id": "a"},
          {"event": "acked", "actor": "actor0", "group_id": "a", "accepted": True, "duplicate": False},
          {"event": "given_up", "actor": "actor0", "group_id": "e", "request_id": "r5", "reason": "failed 3 times"})
    write(ledger / "learner.jsonl", opened(),
          *({"event": "accepted", "group_id": g, "version": 0} for g in "abcd"),
          trained("a", 0), trained("b", 0), dropped("c", "stale", 1), {"event": "duplicate", "group_id": "a"},
          {"event": "rejected", "group_id": "d", "reason": "token id out of range"})
    audit = audit_run(tmp_path)
    assert audit.clean and audit.actors == ["actor0"] and audit.learner_opens == 1
    assert (audit.started, audit.trained) == (5, 2)
    assert audit.dropped == {"given_up": ["e"], "rejected": ["d"], "stale": ["c"]}
    assert audit.dropped_counts == {"given_up": 1, "rejected": 1, "stale": 1}
    assert not (audit.lost or audit.pending or audit.trained_twice or audit.regenerated or audit.unstarted)
    assert audit.duplicates_received == 1 and audit.trained_by_step == {1: ["a", "b"]}
    assert accounted(audit) == audit.started


def test_lost_and_trained_twice_are_defects(tmp_path):
    ledger = tmp_path / "ledger"
    write(ledger / "actor0.jsonl", started("a", "r1"), started("b", "r2"), started("c", "r3"))
    write(ledger / "actor1.jsonl", started("x", "r1", actor="actor1"))  # same request id, another actor: no link
    write(ledger / "learner.jsonl", opened(), {"event": "accepted", "group_id": "a"}, trained("a", 0),
          trained("a", 3), trained("c", 1), dropped("c", "tool_failed", 2))
    audit = audit_run(tmp_path)
    assert not audit.clean
    assert audit.trained_twice == {"a": [1, 4]}
    assert audit.conflicting == {"c": "trained and dropped (tool_failed)"}
    assert audit.lost == ["b", "x"]
    assert accounted(audit) == audit.started == 4
    assert "NOT CLEAN" in audit.text() and "lost: b, x" in audit.text()


def test_a_resumed_learner_rolls_back_what_died_with_its_predecessor(tmp_path):
    """Checkpoint at version 2, killed after training step 3 (g4, g5) and dropping g8 at version 3: the resumed
    learner (open at version 2) trains g4, g5 again and g6, g7 — once each, in the same version sequence."""
    ledger = tmp_path / "ledger"
    write(ledger / "actor0.jsonl", *(started(f"g{i}", f"r{i}") for i in range(9)))
    write(ledger / "learner.jsonl", opened(),
          trained("g0", 0), trained("g1", 0), trained("g2", 1), trained("g3", 1),
          {"event": "checkpoint", "version": 2, "final": False, "buffered": []},
          trained("g4", 2), trained("g5", 2), dropped("g8", "stale", 3),
          opened(version=2), {"event": "replayed", "group_id": "g4"},
          trained("g4", 2), trained("g5", 2), trained("g6", 3), trained("g7", 3), dropped("g8", "stale", 4))
    audit = audit_run(tmp_path)
    assert audit.clean, audit.text()
    assert audit.learner_opens == 2 and audit.rolled_back == 3
    assert audit.trained == 8 and audit.dropped == {"stale": ["g8"]}
    assert audit.trained_by_step == {1: ["g0", "g1"], 2: ["g2", "g3"], 3: ["g4", "g5"], 4: ["g6", "g7"]}


def test_trained_twice_across_a_resume_is_still_a_defect(tmp_path):
    ledger = tmp_path / "ledger"
    write(ledger / "actor0.jsonl", started("g0", "r0"))
    write(ledger / "learner.jsonl", opened(), trained("g0", 0), opened(version=1), trained("g0", 1))
    audit = audit_run(tmp_path)
    assert audit.trained_twice == {"g0": [1, 2]} and audit.rolled_back == 0 and not audit.clean


def test_a_fresh_start_after_a_crash_rolls_back_everything(tmp_path):
    ledger = tmp_path / "ledger"
    write(ledger / "actor0.jsonl", started("g0", "r0"))
    write(ledger / "learner.jsonl", opened(), trained("g0", 0), opened(version=0))
    audit = audit_run(tmp_path)
    assert audit.lost == ["g0"] and audit.rolled_back == 1


def test_a_restarted_actor_regenerates_the_admission_it_was_playing(tmp_path):
    ledger = tmp_path / "ledger"
    write(ledger / "actor0.jsonl", {"event": "open"}, started("old-a", "r1"), started("old-b", "r2"),
          {"event": "open"}, started("new-a", "r1"), started("new-b", "r2"))
    write(ledger / "learner.jsonl", opened(), trained("new-a", 1), trained("new-b", 1))
    audit = audit_run(tmp_path)
    assert audit.clean and audit.regenerated == ["old-a", "old-b"] and audit.trained == 2
    assert accounted(audit) == audit.started == 4


def test_pending_groups_are_found_where_they_wait(tmp_path):
    """At the end: in the newest checkpoint's buffer, in a journal entry newer than it, in an actor's spool (a
    finished group, or the grant being played); an older checkpoint's buffer does not count."""
    ledger = tmp_path / "ledger"
    write(ledger / "actor0.jsonl", *(started(g, f"r-{g}") for g in ("buf", "jour", "spooled", "playing", "old")))
    write(ledger / "learner.jsonl", opened(), {"event": "accepted", "group_id": "buf"},
          {"event": "accepted", "group_id": "jour"})
    ckpt = tmp_path / "checkpoints"
    for version, buffered, seq in ((2, ["old"], 0), (4, ["buf"], 3)):
        step = ckpt / f"step_{version:08d}"
        step.mkdir(parents=True)
        (step / "learner_state.json").write_text(json.dumps({"version": version, "journal_seq": seq}))
        (step / "groups.msgpack").write_bytes(pack_groups([group(g) for g in buffered]))
    (ckpt / "journal").mkdir()
    (ckpt / "journal" / "000000000003.msgpack").write_bytes(encode(group("old")))  # covered by step 4
    (ckpt / "journal" / "000000000004.msgpack").write_bytes(encode(group("jour")))
    spool = tmp_path / "actors" / "actor0" / "spool"
    (spool / "groups").mkdir(parents=True)
    (spool / "grants").mkdir()
    (spool / "groups" / "spooled~r-spooled.msgpack").write_bytes(encode(group("spooled")))
    (spool / "grants" / "r-playing.json").write_text("{}")
    audit = audit_run(tmp_path)
    assert audit.pending == {"buf": "checkpoint step_00000004 buffer", "jour": "learner journal 000000000004.msgpack",
                             "spooled": "actor0 spool (group)", "playing": "actor0 spool (grant r-playing)"}
    assert audit.lost == ["old"] and not audit.clean


def test_a_group_the_learner_accepted_is_lost_if_only_an_actor_still_has_it(tmp_path):
    """A resend would be acked as a duplicate, so the actor's spooled copy cannot bring it back."""
    ledger = tmp_path / "ledger"
    write(ledger / "actor0.jsonl", started("g", "r"))
    write(ledger / "learner.jsonl", opened(), {"event": "accepted", "group_id": "g"})
    (tmp_path / "actors" / "actor0" / "spool" / "groups").mkdir(parents=True)
    (tmp_path / "actors" / "actor0" / "spool" / "groups" / "g~r.msgpack").write_bytes(encode(group("g")))
    assert audit_run(tmp_path).lost == ["g"]


def test_the_checkpoint_folder_comes_from_the_runs_config(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(f"learner:\n  checkpoint_dir: {elsewhere}\n")
    write(tmp_path / "run" / "ledger" / "actor0.jsonl", started("g", "r"))
    (elsewhere / "step_00000001").mkdir(parents=True)
    (elsewhere / "step_00000001" / "groups.msgpack").write_bytes(pack_groups([group("g")]))
    assert audit_run(tmp_path / "run").pending == {"g": "checkpoint step_00000001 buffer"}


def test_torn_lines_are_skipped_and_counted_and_unstarted_groups_listed(tmp_path):
    ledger = tmp_path / "ledger"
    write(ledger / "actor0.jsonl", started("a", "r1"), raw='{"t": 1.0, "pid": 1, "event": "sta')
    write(ledger / "learner.jsonl", opened(), trained("a", 0), trained("stranger", 0), raw="[1, 2]\n")
    audit = audit_run(tmp_path)
    assert audit.bad_lines == 2 and audit.unstarted == ["stranger"] and audit.clean


def test_the_cli_exits_with_the_verdict(tmp_path, capsys):
    ledger = tmp_path / "ledger"
    write(ledger / "actor0.jsonl", started("a", "r1"))
    write(ledger / "learner.jsonl", opened(), trained("a", 0))
    assert main([str(tmp_path)]) == 0
    assert "trained exactly once  1" in capsys.readouterr().out
    write(ledger / "actor0.jsonl", started("b", "r2"))
    assert main([str(tmp_path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["lost"] == ["b"] and report["clean"] is False
    assert main([str(tmp_path / "nowhere")]) == 2
    with pytest.raises(AuditError, match="no ledger/"):
        audit_run(tmp_path / "nowhere")
