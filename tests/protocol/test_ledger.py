"""protocol/ledger.py: one JSON line per event, appended (a second writer of the same file, e.g. a restarted
process, continues it), never interleaved across threads; no path writes nothing; an unwritable path is logged and
the caller goes on."""
from __future__ import annotations

import json
import threading

import pytest

from protocol.ledger import Ledger, actor_ledger_path


def test_lines_are_appended_whole_with_the_fixed_fields(tmp_path):
    path = actor_ledger_path(tmp_path, "actor0")
    assert path == tmp_path / "ledger" / "actor0.jsonl"
    first = Ledger(path, actor="actor0")
    first.write("started", group_id="g1", request_id="r1", version=3)
    first.close()
    first.write("lost after close")  # a closed ledger writes nothing
    second = Ledger(path, actor="actor0")  # a restarted process appends
    second.write("sent", group_id="g1")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(line["event"], line["actor"], line.get("group_id")) for line in lines] == [
        ("started", "actor0", "g1"), ("sent", "actor0", "g1")]
    assert lines[0]["version"] == 3 and lines[0]["request_id"] == "r1" and {"t", "pid"} <= set(lines[0])
    second.close()


def test_threads_never_interleave_lines(tmp_path):
    ledger = Ledger(tmp_path / "l.jsonl")

    def writer(n: int) -> None:
        for i in range(200):
            ledger.write("trained", group_id=f"w{n}-{i}", padding="x" * 300)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ledger.close()
    lines = [json.loads(line) for line in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert len(lines) == 800 and len({line["group_id"] for line in lines}) == 800


def test_no_path_writes_nothing_and_an_unwritable_one_is_logged_once(tmp_path, caplog):
    off = Ledger(None)
    off.write("started", group_id="g")
    assert not off.enabled
    blocker = tmp_path / "file"
    blocker.write_text("")
    broken = Ledger(blocker / "ledger" / "a.jsonl")  # its folder cannot be made under a file
    broken.write("started", group_id="g")
    assert not broken.enabled and broken.errors == 1
    assert "cannot be written" in caplog.text


@pytest.mark.parametrize("bad", ["", "a/b", ".hidden"])
def test_an_actor_id_that_cannot_name_a_file_is_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="cannot name a ledger file"):
        actor_ledger_path(tmp_path, bad)
