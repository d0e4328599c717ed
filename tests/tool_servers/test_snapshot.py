"""Frozen search snapshots through real tool servers on 127.0.0.1: record then replay gives identical replies (local
and web backends), misses are counted errors or fall through to the backend, replicas in separate processes record
into one file, the snapshot CLI (info, merge, export), and bad snapshot paths."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from protocol import ToolItem
from protocol.images import encode_png
from tool_servers import snapshot
from tool_servers.cache import CacheConfig, ResultCache, request_text
from tool_servers.client import SyncToolClient, ToolClient
from tool_servers.errors import ToolCallError
from tool_servers.server import ToolServer, ToolServerRole
from tool_servers.snapshot import SnapshotConfig, SnapshotError, SnapshotReader, SnapshotRecorder
from ts_helpers import FakeBackend, draw_entity, perturb, run, serving

REPO = Path(__file__).resolve().parents[2]
QUERIES = ["who built the clock tower", "Pondle otter", "capital of Quell", "glassblower Oskar"]


def _role(tool: str, corpus: Path, **snapshot_knobs) -> ToolServerRole:
    section = {"backend": "local", "corpus": str(corpus), "top_k": 2, "cache": {"max_entries": 64}}
    if tool == "image_search":
        section["top_k"] = 1
    return ToolServerRole(tool, section, snapshot=snapshot_knobs)


def _ask(role: ToolServerRole, tool: str, args_list: list[dict]) -> list:
    client = SyncToolClient([role.endpoint], default_deadline_s=10.0, retries=0)
    try:
        out = []
        for args in args_list:
            try:
                reply = client.call(tool, args)
                out.append((reply.items, reply.cached))
            except ToolCallError as exc:
                out.append(exc)
        return out
    finally:
        client.close()


# ---------------------------------------------------------------- record, then replay


def test_record_then_replay_gives_identical_replies_run_after_run(text_corpus, image_corpus, tmp_path):
    snap = tmp_path / "snap"
    images = [encode_png(perturb(draw_entity(i), seed=i)) for i in range(3)]
    asks = {"text_search": [{"query": q} for q in QUERIES], "image_search": [{"image": b} for b in images]}
    corpora = {"text_search": text_corpus, "image_search": image_corpus}

    recorded = {}
    for tool, args_list in asks.items():
        role = _role(tool, corpora[tool], record=str(snap))
        role.start()
        try:
            recorded[tool] = _ask(role, tool, args_list + args_list)  # the repeats come from the result cache
        finally:
            role.stop()  # stop flushes the recorder
        stats = role.stats()
        assert all(isinstance(r, tuple) for r in recorded[tool])
        assert stats["snapshot_records"] == len(args_list) and stats["snapshot_record_dropped"] == 0
        assert stats["cache_hits"] == len(args_list)  # cache hits are recorded too, once per request
    summary = snapshot.info(snap)
    assert summary["replies_per_tool"] == {"image_search": 3, "text_search": 4}
    assert summary["replies_per_source"] == {"LocalImageSearch": 3, "LocalTextSearch": 4}

    for attempt in range(2):  # reproducible run to run: two fresh replaying servers answer the same
        for tool, args_list in asks.items():
            role = _role(tool, corpora[tool], replay=str(snap))
            role.start()
            try:
                if tool == "text_search":  # the normalised request: case and spacing do not matter
                    args_list = [{"query": "  " + q.upper().replace(" ", "   ")} for q in QUERIES]
                replayed = _ask(role, tool, args_list)
                stats = role.stats()
            finally:
                role.stop()
            assert [items for items, _ in replayed] == [items for items, _ in recorded[tool][:len(args_list)]]
            assert all(cached for _, cached in replayed)  # replayed answers say cached
            assert stats["snapshot_hits"] == len(args_list) and stats["snapshot_misses"] == 0
            assert "cache_entries" not in stats  # a replaying server has no result cache


def test_a_miss_is_a_counted_backend_error_by_default(text_corpus, tmp_path):
    snap = tmp_path / "snap"
    role = _role("text_search", text_corpus, record=str(snap))
    role.start()
    _ask(role, "text_search", [{"query": "Pondle otter"}])
    role.stop()

    role = _role("text_search", text_corpus, replay=str(snap))
    role.start()
    try:
        hit, miss = _ask(role, "text_search", [{"query": "pondle OTTER"}, {"query": "who built the clock tower"}])
        bad = _ask(role, "text_search", [{"query": "!!!"}])[0]  # a malformed call is still the caller's fault
        stats = role.stats()
    finally:
        role.stop()
    assert isinstance(hit, tuple) and hit[0][0].title == "Pondle"
    assert isinstance(miss, ToolCallError) and miss.code == "backend_error"
    assert "snapshot miss" in miss.message and '{"query":"who built the clock tower"}' in miss.message
    assert str(snap) in miss.message
    assert isinstance(bad, ToolCallError) and bad.code == "bad_request"
    assert stats["snapshot_hits"] == 1 and stats["snapshot_misses"] == 1 and stats["error_backend_error"] == 1


def test_live_fall_through_answers_misses_and_records_them_into_the_same_snapshot(text_corpus, tmp_path):
    snap = tmp_path / "snap"
    backend = FakeBackend()
    knobs = SnapshotConfig(record=str(snap), replay=None)

    async def record_one():
        async with serving({"text_search": backend}, snapshot=knobs) as (server, endpoint):
            async with _client(endpoint) as client:
                await client.call("text_search", {"query": "first"})
    run(record_one())

    pay_once = SnapshotConfig(record=str(snap), replay=str(snap), replay_miss="live")

    async def replay_live():
        async with serving({"text_search": backend}, snapshot=pay_once) as (server, endpoint):
            async with _client(endpoint) as client:
                hit = await client.call("text_search", {"query": "FIRST"})
                live = await client.call("text_search", {"query": "second"})
                assert server.flush_snapshot(10.0)
                again = await client.call("text_search", {"query": "Second"})  # now in the snapshot: not searched
            return hit, live, again, server.stats()
    before = len(backend.batches)
    hit, live, again, stats = run(replay_live())
    assert hit.cached and hit.items == [ToolItem(title="first")]
    assert not live.cached and live.items == [ToolItem(title="second")]
    assert again.cached and again.items == [ToolItem(title="second")]
    assert len(backend.batches) - before == 1  # only the miss reached the backend
    assert stats["snapshot_hits"] == 2 and stats["snapshot_misses"] == 1 and stats["snapshot_records"] == 1
    assert snapshot.info(snap)["replies"] == 2


def test_replaying_one_snapshot_while_recording_another_copies_what_was_asked(tmp_path):
    source = _recorded(tmp_path / "a", {"alpha": "A-alpha", "beta": "A-beta"}, "Orig")
    knobs = SnapshotConfig(record=str(tmp_path / "subset"), replay=str(source), replay_miss="live")

    async def main():
        async with serving({"text_search": FakeBackend()}, snapshot=knobs) as (server, endpoint):
            async with _client(endpoint) as client:
                await client.call("text_search", {"query": "Alpha"})
                await client.call("text_search", {"query": "gamma"})  # a miss, answered live
    run(main())
    subset = {row.request: (row.items[0].title, row.source) for row in snapshot.rows(tmp_path / "subset")}
    assert subset == {'{"query":"alpha"}': ("A-alpha", "snapshot"), '{"query":"gamma"}': ("gamma", "FakeBackend")}


def _client(endpoint):
    from ts_helpers import client_of

    return client_of(endpoint, default_deadline_s=5.0, retries=0)


def test_web_replies_replay_without_asking_the_web(tmp_path, monkeypatch):
    from fake_web import API_KEY, FakeWeb

    monkeypatch.setenv("SERPAPI_API_KEY", API_KEY)
    fake = FakeWeb().start()
    try:
        section = {"backend": "web", "endpoint": f"{fake.base}/serpapi/search.json", "top_k": 2,
                   "reader_endpoint": f"{fake.base}/reader/", "summariser_endpoint": f"{fake.base}/v1",
                   "summariser_model": "qwen-summariser", "timeout_s": 2.0, "rate_per_s": 0,
                   "cache": {"max_entries": 16}}
        role = ToolServerRole("text_search", section, snapshot={"record": str(tmp_path / "web")})
        role.start()
        try:
            paid = _ask(role, "text_search", [{"query": "lighthouse keeper"}, {"query": "glass city"}])
        finally:
            role.stop()
        calls = len(fake.calls)
        assert calls > 0 and all(isinstance(r, tuple) and r[0] for r in paid)

        role = ToolServerRole("text_search", section, snapshot={"replay": str(tmp_path / "web")})
        role.start()
        try:
            free = _ask(role, "text_search", [{"query": "Lighthouse  keeper"}, {"query": "glass city"}])
        finally:
            role.stop()
        assert [r[0] for r in free] == [r[0] for r in paid]
        assert len(fake.calls) == calls  # replaying paid nothing
    finally:
        fake.stop()


# ---------------------------------------------------------------- several replicas, one file


def _replica(snap: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "tool_servers", "--log-level", "WARNING", "serve", "--tool", "text_search",
               "--backend", "simulated", "--knob", "latency_ms=1", "--record", str(snap)]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if not line.startswith("serving text_search on "):
        process.kill()
        raise RuntimeError(f"replica did not start: {line!r} {process.stderr.read()}")
    return process, line.split()[-1]


def test_concurrent_replicas_record_into_one_snapshot(tmp_path):
    snap = tmp_path / "shared"
    replicas = []
    try:
        replicas = [_replica(snap) for _ in range(3)]

        async def main():
            clients = [ToolClient([endpoint], default_deadline_s=10.0, retries=0) for _, endpoint in replicas]
            try:
                # every replica answers every query (the same 120 requests three times over), all at once
                await asyncio.gather(*(c.call("text_search", {"query": f"q{i}"}) for c in clients for i in range(120)))
                return [await c.stats() for c in clients]
            finally:
                for c in clients:
                    await c.close()
        run(main())
        for process, _ in replicas:
            process.send_signal(signal.SIGTERM)  # a graceful stop writes what is queued
        for process, _ in replicas:
            assert process.wait(timeout=20) == 0, process.stderr.read()
    finally:
        for process, _ in replicas:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stdout.close()
            process.stderr.close()
    summary = snapshot.info(snap)
    assert summary["replies_per_tool"] == {"text_search": 120}
    reader = SnapshotReader(snap)
    try:
        assert reader.get("text_search", request_text({"query": "Q7"}))[0].title == "q7"
    finally:
        reader.close()


def test_recorder_keeps_the_first_reply_and_counts_rows(tmp_path):
    first = SnapshotRecorder(tmp_path / "s")
    second = SnapshotRecorder(tmp_path / "s")  # another process or replica on the same file
    key = request_text({"query": "Who built  Harrow?"})
    assert key == '{"query":"who built harrow?"}'
    first.add("text_search", key, [ToolItem(title="one")], "A")
    assert first.flush(10.0)
    second.add("text_search", key, [ToolItem(title="two")], "B")
    second.add("text_search", key, [ToolItem(title="three")], "B")  # a repeat is not even queued
    assert second.flush(10.0)
    first.close()
    second.close()
    assert first.metrics.counter("snapshot_records") == 1 and second.metrics.counter("snapshot_records") == 0
    reader = SnapshotReader(tmp_path / "s")
    assert reader.get("text_search", key) == [ToolItem(title="one")]
    assert reader.get("image_search", key) is None
    reader.close()


# ---------------------------------------------------------------- the CLI


def _recorded(folder: Path, entries: dict[str, str], source: str = "Test") -> Path:
    recorder = SnapshotRecorder(folder)
    for query, title in entries.items():
        recorder.add("text_search", request_text({"query": query}), [ToolItem(title=title, url="u", text="t")],
                     source)
    recorder.add("image_search", request_text({"image": b"\x89PNG" + source.encode()}),
                 [ToolItem(title="img", image=b"\x00\x01" + source.encode())], source)
    recorder.close()
    return folder


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tool_servers", "snapshot", *args], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)


def test_cli_info_merge_and_export(tmp_path):
    a = _recorded(tmp_path / "a", {"alpha": "A-alpha", "shared": "A-shared"}, "A")
    b = _recorded(tmp_path / "b", {"beta": "B-beta", "shared": "B-shared"}, "B")

    out = _cli("info", str(a))
    assert out.returncode == 0 and "3 replies" in out.stdout and "text_search: 2" in out.stdout, out
    out = _cli("info", str(a / "snapshot.sqlite3"), "--json")
    assert json.loads(out.stdout)["replies_per_tool"] == {"image_search": 1, "text_search": 2}

    out = _cli("merge", str(tmp_path / "m"), str(a), str(b))
    assert out.returncode == 0, out.stderr
    assert f"{a / 'snapshot.sqlite3'}: 3 replies added" in out.stdout
    assert f"{b / 'snapshot.sqlite3'}: 2 replies added" in out.stdout  # b's "shared" lost to a's
    merged = snapshot.info(tmp_path / "m")
    assert merged["replies_per_tool"] == {"image_search": 2, "text_search": 3}
    reader = SnapshotReader(tmp_path / "m")
    assert reader.get("text_search", request_text({"query": "shared"}))[0].title == "A-shared"
    reader.close()
    assert snapshot.merge(tmp_path / "m", [b]) == {str(b / "snapshot.sqlite3"): 0}  # merging again adds nothing

    out = _cli("export", str(tmp_path / "m"), str(tmp_path / "m.jsonl"))
    assert out.returncode == 0 and "wrote 5 replies" in out.stdout, out
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [(r["tool"], r["request"]) for r in lines][2:] == [
        ("text_search", {"query": "alpha"}), ("text_search", {"query": "beta"}), ("text_search", {"query": "shared"})]
    images = [r for r in lines if r["tool"] == "image_search"]
    assert {base64.b64decode(r["items"][0]["image"]) for r in images} == {b"\x00\x01A", b"\x00\x01B"}
    assert lines[-1]["items"] == [{"title": "A-shared", "url": "u", "text": "t", "image": None}]

    assert snapshot.export(tmp_path / "m", tmp_path / "m.parquet", tool="text_search") == 3
    table = pq.read_table(tmp_path / "m.parquet").to_pylist()
    assert [json.loads(r["request"])["query"] for r in table] == ["alpha", "beta", "shared"]
    assert table[0]["items"] == [{"title": "A-alpha", "url": "u", "text": "t", "image": None}]
    assert {r["source"] for r in table} == {"A", "B"}


# ---------------------------------------------------------------- bad paths and knobs


def test_bad_snapshot_paths_and_knobs_give_clear_errors(tmp_path, text_corpus):
    with pytest.raises(SnapshotError, match=f"no snapshot at {tmp_path / 'nowhere'}"):
        SnapshotReader(tmp_path / "nowhere")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "snapshot.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(SnapshotError, match="is not a forage tool snapshot"):
        SnapshotReader(tmp_path / "junk")
    other = sqlite3.connect(tmp_path / "other.sqlite3")
    other.execute("CREATE TABLE t (x)")
    other.close()
    with pytest.raises(SnapshotError, match="other.sqlite3 is not a forage tool snapshot"):
        snapshot.info(tmp_path / "other.sqlite3")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SnapshotError, match="cannot create the snapshot folder .*afile/snap"):
        SnapshotRecorder(tmp_path / "afile" / "snap")
    with pytest.raises(SnapshotError, match="afile is not a forage tool snapshot"):
        SnapshotRecorder(tmp_path / "afile")  # a file is taken as the snapshot file itself
    with pytest.raises(ValueError, match="replay_miss must be one of"):
        SnapshotConfig(replay=str(tmp_path), replay_miss="maybe")
    with pytest.raises(ValueError, match="without a cache"):
        ToolServer({"text_search": FakeBackend()}, cache=ResultCache(CacheConfig()),
                   snapshot=SnapshotConfig(replay=str(tmp_path)))
    with pytest.raises(SnapshotError, match="merge .* into itself"):
        snapshot.merge(_recorded(tmp_path / "self", {"x": "y"}), [tmp_path / "self"])
    with pytest.raises(SnapshotError, match="use jsonl or parquet"):
        snapshot.export(tmp_path / "self", tmp_path / "out.csv")

    role = ToolServerRole("text_search", {"backend": "simulated"}, snapshot={"replay": str(tmp_path / "nowhere")})
    with pytest.raises(SnapshotError, match="no snapshot at"):
        role.start()
    assert role.endpoint is None  # nothing was bound

    out = _cli("info", str(tmp_path / "nowhere"))
    assert out.returncode == 2 and "no snapshot at" in out.stderr and "Traceback" not in out.stderr
    serve = subprocess.run([sys.executable, "-m", "tool_servers", "serve", "--tool", "text_search", "--backend",
                            "simulated", "--replay", str(tmp_path / "junk")], cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
    assert serve.returncode == 2 and "is not a forage tool snapshot" in serve.stderr
    assert "Traceback" not in serve.stderr


def test_config_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = SnapshotConfig.from_mapping({"record": "rec", "replay": None, "replay_miss": None, "token_env": None})
    assert config.record == str(tmp_path / "rec") and config.replay is None and config.replay_miss == "error"
    assert not SnapshotConfig.from_mapping({}).enabled
