"""Frozen search snapshots: every (tool, normalised request) -> reply the tool servers answered, in one SQLite file,
so that a run can be replayed without the live backend (`tool_servers.record` / `replay` / `replay_miss`), and the
`python -m tool_servers snapshot info|merge|export` commands.

File format, version 1: `<folder>/snapshot.sqlite3`, SQLite in WAL mode (several replicas, on one host or on a
shared filesystem that supports SQLite locking, record into one file), two tables:

    meta(key TEXT PRIMARY KEY, value TEXT)       format = "forage-tool-snapshot", version = "1", created_at
    replies(tool TEXT, request TEXT, items BLOB, n_items INTEGER, recorded_at REAL, source TEXT,
            PRIMARY KEY (tool, request))

`request` is the request's arguments normalised exactly as the result cache keys them (tool_servers/cache.py
`request_text`: canonical JSON; strings NFKC, case-folded, whitespace collapsed; image bytes as
{"blake2b": content hash}). `items` is the msgpack array of the reply's item maps ({title, url, text, image}), byte
for byte what the server sent. `source` names the backend class that answered (`snapshot` when it was replayed from
another snapshot). Only ok replies are recorded, and the first reply for a request wins (INSERT OR IGNORE), so a
snapshot answers each request the same way every run.
"""
from __future__ import annotations

import base64
import json
import logging
import queue
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from protocol import ToolItem
from protocol.metrics import Metrics

log = logging.getLogger(__name__)

SNAPSHOT_FILE = "snapshot.sqlite3"
FORMAT = "forage-tool-snapshot"
VERSION = 1
REPLAY_MISS = ("error", "live")  # a request the replayed snapshot lacks: a backend_error reply, or ask the backend
BUSY_TIMEOUT_S = 30.0  # how long a writer waits for another replica's write lock before giving up on a batch

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS replies (tool TEXT NOT NULL, request TEXT NOT NULL, items BLOB NOT NULL, "
    "n_items INTEGER NOT NULL, recorded_at REAL NOT NULL, source TEXT NOT NULL, PRIMARY KEY (tool, request)) "
    "WITHOUT ROWID",
)
_COLUMNS = "tool, request, items, n_items, recorded_at, source"

_items_encoder = msgspec.msgpack.Encoder()
_items_decoder = msgspec.msgpack.Decoder(list[ToolItem])


class SnapshotError(ValueError):
    """A snapshot path that cannot be used: missing, not a folder, not a snapshot, another format version."""


def snapshot_file(path: str | Path) -> Path:
    """The SQLite file of a snapshot named by its folder (the usual form) or by the file itself."""
    path = Path(path).expanduser()
    if path.suffix == ".sqlite3" or path.is_file():
        return path
    return path / SNAPSHOT_FILE


@dataclass(frozen=True)
class SnapshotConfig:
    """The snapshot knobs of conf/tool_servers/*.yaml: `record`, `replay` (folders) and `replay_miss`."""

    record: str | None = None  # record every ok reply into this snapshot
    replay: str | None = None  # answer from this snapshot instead of the backend (the result cache is off)
    replay_miss: str = "error"  # error: a miss is a counted backend_error reply; live: ask the backend

    def __post_init__(self) -> None:
        if self.replay_miss not in REPLAY_MISS:
            raise ValueError(f"tool_servers.replay_miss must be one of {REPLAY_MISS}, got {self.replay_miss!r}")

    @property
    def enabled(self) -> bool:
        return bool(self.record or self.replay)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "SnapshotConfig":
        """From a conf/tool_servers mapping (its other keys are ignored); paths become absolute here, so a Ray worker
        with another working directory opens the same files."""
        values = values or {}

        def absolute(key: str) -> str | None:
            value = values.get(key)
            return str(Path(str(value)).expanduser().resolve()) if value else None

        return cls(record=absolute("record"), replay=absolute("replay"),
                   replay_miss=str(values.get("replay_miss") or "error"))


def _connect(file: Path, *, create: bool, read_only: bool = False) -> sqlite3.Connection:
    """Open (or create) a snapshot file and check that it is one; every failure is a SnapshotError naming the path."""
    if create:
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SnapshotError(f"cannot create the snapshot folder {file.parent}: {exc}") from exc
    elif not file.is_file():
        where = file.parent if file.name == SNAPSHOT_FILE else file
        raise SnapshotError(f"no snapshot at {where}: {file} does not exist (record one with tool_servers.record)")
    if file.is_file() and file.stat().st_size:
        with open(file, "rb") as handle:
            if handle.read(16) != b"SQLite format 3\x00":  # never turn someone's file into a snapshot
                raise SnapshotError(f"{file} is not a forage tool snapshot (not an SQLite file)")
    uri = f"{file.resolve().as_uri()}?mode={'ro' if read_only else 'rwc'}"
    try:
        db = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None)
    except sqlite3.Error as exc:
        raise SnapshotError(f"cannot open the snapshot {file}: {exc}") from exc
    try:
        db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        if create:
            db.execute("PRAGMA journal_mode=WAL")  # readers never block writers; replicas append concurrently
            db.execute("PRAGMA synchronous=NORMAL")  # a crash may lose the last batch, never corrupt the file
            db.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                db.execute(statement)
            db.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)",
                           [("format", FORMAT), ("version", str(VERSION)), ("created_at", repr(time.time()))])
            db.execute("COMMIT")
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.Error as exc:
        db.close()
        raise SnapshotError(f"{file} is not a forage tool snapshot ({exc})") from exc
    if meta.get("format") != FORMAT:
        db.close()
        raise SnapshotError(f"{file} is not a forage tool snapshot (meta format {meta.get('format')!r})")
    if meta.get("version") != str(VERSION):
        db.close()
        raise SnapshotError(f"{file} is snapshot format version {meta.get('version')}; this forage reads {VERSION}")
    return db


class SnapshotReader:
    """Look replies up in a snapshot (thread-safe; the server calls it from its executor threads)."""

    def __init__(self, path: str | Path) -> None:
        self.file = snapshot_file(path)
        self._db = _connect(self.file, create=False, read_only=True)
        self._lock = threading.Lock()

    def get(self, tool: str, request: str) -> list[ToolItem] | None:
        """The recorded items of (tool, normalised request), or None when the snapshot lacks it."""
        with self._lock:
            row = self._db.execute("SELECT items FROM replies WHERE tool = ? AND request = ?",
                                   (tool, request)).fetchone()
        return None if row is None else _items_decoder.decode(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


class SnapshotRecorder:
    """Append ok replies to a snapshot from a background thread, so the server's event loop never waits for the file
    (another replica may hold its write lock). `add` never blocks: past `max_pending` queued replies, or when a write
    fails, replies are dropped and counted (`snapshot_record_dropped`). `snapshot_records` counts rows written."""

    def __init__(self, path: str | Path, metrics: Metrics | None = None, *, flush_s: float = 0.05,
                 max_pending: int = 10_000, remember: int = 65_536) -> None:
        self.file = snapshot_file(path)
        self.metrics = metrics or Metrics()
        self._db = _connect(self.file, create=True)
        self._flush_s = flush_s
        self._queue: queue.Queue[tuple[str, str, list[ToolItem], float, str] | None] = queue.Queue(max_pending)
        self._recent: OrderedDict[tuple[str, str], None] = OrderedDict()  # recently queued: skip repeats early
        self._remember = remember
        self._cond = threading.Condition()
        self._unwritten = 0  # queued and not yet written (or dropped)
        self._thread = threading.Thread(target=self._write_loop, name=f"snapshot-{self.file.parent.name}", daemon=True)
        self._thread.start()

    def add(self, tool: str, request: str, items: list[ToolItem], source: str) -> None:
        """Queue one ok reply for writing (the first one recorded for a request is kept)."""
        with self._cond:
            if (tool, request) in self._recent:
                return
            try:
                self._queue.put_nowait((tool, request, items, time.time(), source))
            except queue.Full:
                self.metrics.inc("snapshot_record_dropped")
                log.warning("snapshot %s: %d replies waiting to be written; dropped one for %s", self.file,
                            self._queue.qsize(), tool)
                return
            self._unwritten += 1
            self._recent[(tool, request)] = None
            if len(self._recent) > self._remember:
                self._recent.popitem(last=False)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything queued so far is written (or dropped and counted); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._unwritten == 0, timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued, stop the thread, close the file."""
        if not self._thread.is_alive():
            return
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            pass
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("snapshot %s: the writer did not finish within %.0f s", self.file, timeout_s)
            return
        self._db.close()

    def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            deadline = time.monotonic() + self._flush_s
            while len(batch) < 1024:  # one transaction per batch: fewer syncs, shorter lock holds
                try:
                    entry = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if entry is None:
                    stopping = True
                    break
                batch.append(entry)
            self._write(batch)
            with self._cond:
                self._unwritten -= len(batch)
                self._cond.notify_all()

    def _write(self, batch: list[tuple[str, str, list[ToolItem], float, str]]) -> None:
        rows = [(tool, request, _items_encoder.encode(items), len(items), at, source)
                for tool, request, items, at, source in batch]
        try:
            before = self._db.total_changes
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(f"INSERT OR IGNORE INTO replies ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)", rows)
            self._db.execute("COMMIT")
            self.metrics.inc("snapshot_records", self._db.total_changes - before)
        except sqlite3.Error as exc:  # locked past the busy timeout, disk full: count it, keep serving
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self.metrics.inc("snapshot_record_dropped", len(rows))
            log.error("snapshot %s: could not write %d replies: %s", self.file, len(rows), exc)
            with self._cond:  # they may be recorded when they are answered again
                for tool, request, *_ in batch:
                    self._recent.pop((tool, request), None)


# ------------------------------------------------------------------------------------------------ the CLI's work


class Recorded(msgspec.Struct, kw_only=True):
    """One row of a snapshot, as `export` writes it."""

    tool: str
    request: str
    items: list[ToolItem]
    recorded_at: float
    source: str


def rows(path: str | Path, tool: str | None = None) -> Iterator[Recorded]:
    """Every recorded reply (of `tool`, when given), in (tool, request) order."""
    db = _connect(snapshot_file(path), create=False, read_only=True)
    try:
        where, params = ("WHERE tool = ?", (tool,)) if tool else ("", ())
        for t, request, items, _, at, source in db.execute(
                f"SELECT {_COLUMNS} FROM replies {where} ORDER BY tool, request", params):
            yield Recorded(tool=t, request=request, items=_items_decoder.decode(items), recorded_at=at, source=source)
    finally:
        db.close()


def info(path: str | Path) -> dict[str, Any]:
    """What a snapshot holds: its file, format, replies per tool and per source, the span of recording times."""
    file = snapshot_file(path)
    db = _connect(file, create=False, read_only=True)
    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        per_tool = dict(db.execute("SELECT tool, COUNT(*) FROM replies GROUP BY tool ORDER BY tool").fetchall())
        per_source = dict(db.execute("SELECT source, COUNT(*) FROM replies GROUP BY source ORDER BY source")
                          .fetchall())
        first, last, empty = db.execute(
            "SELECT MIN(recorded_at), MAX(recorded_at), SUM(n_items = 0) FROM replies").fetchone()
    finally:
        db.close()
    return {"file": str(file), "bytes": file.stat().st_size, "format": meta["format"], "version": int(meta["version"]),
            "created_at": float(meta.get("created_at", 0.0)), "replies": sum(per_tool.values()),
            "replies_per_tool": per_tool, "replies_per_source": per_source, "empty_replies": int(empty or 0),
            "first_recorded_at": first, "last_recorded_at": last}


def merge(out: str | Path, inputs: list[str | Path]) -> dict[str, int]:
    """Add every reply of `inputs` (in the order given) to the snapshot `out` (created when missing); where two hold
    the same request, the one already in `out`, else the earlier input, wins. Returns {input: replies added}."""
    target = snapshot_file(out)
    sources = [snapshot_file(p) for p in inputs]
    for source in sources:
        _connect(source, create=False, read_only=True).close()  # all inputs are snapshots before anything is written
        if source.resolve() == target.resolve():
            raise SnapshotError(f"cannot merge {source} into itself")
    db = _connect(target, create=True)
    added: dict[str, int] = {}
    try:
        for source in sources:
            db.execute("ATTACH DATABASE ? AS src", (f"{source.resolve().as_uri()}?mode=ro",))
            try:
                db.execute("BEGIN IMMEDIATE")
                before = db.total_changes
                db.execute(f"INSERT OR IGNORE INTO main.replies ({_COLUMNS}) SELECT {_COLUMNS} FROM src.replies")
                added[str(source)] = db.total_changes - before
                db.execute("COMMIT")
            finally:
                db.execute("DETACH DATABASE src")
    finally:
        db.close()
    return added


def item_json(item: ToolItem) -> dict[str, Any]:
    """An item as JSON: `image` as base64 (or null)."""
    return {"title": item.title, "url": item.url, "text": item.text,
            "image": base64.b64encode(item.image).decode("ascii") if item.image is not None else None}


def export(path: str | Path, out: str | Path, fmt: str | None = None, tool: str | None = None) -> int:
    """Write every reply (of `tool`) to `out` as JSONL (one object per reply: tool, request as an object, items with
    base64 images, recorded_at, source) or parquet (tool, request as JSON text, items as a list of structs with
    binary images, recorded_at, source); `fmt` defaults to `out`'s suffix. Returns the number of replies."""
    out = Path(out)
    fmt = fmt or {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(out.suffix, "")
    if fmt not in ("jsonl", "parquet"):
        raise SnapshotError(f"export format {fmt!r} of {out}: use jsonl or parquet (or name the file .jsonl/.parquet)")
    out.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    if fmt == "jsonl":
        with open(out, "w", encoding="utf-8") as handle:
            for row in rows(path, tool):
                handle.write(json.dumps({"tool": row.tool, "request": json.loads(row.request),
                                         "items": [item_json(i) for i in row.items], "recorded_at": row.recorded_at,
                                         "source": row.source}, ensure_ascii=False) + "\n")
                count += 1
        return count
    import pyarrow as pa
    import pyarrow.parquet as pq

    item_type = pa.struct([("title", pa.string()), ("url", pa.string()), ("text", pa.string()),
                           ("image", pa.binary())])
    schema = pa.schema([("tool", pa.string()), ("request", pa.string()), ("items", pa.list_(item_type)),
                        ("recorded_at", pa.float64()), ("source", pa.string())])
    with pq.ParquetWriter(out, schema) as writer:
        chunk: list[dict[str, Any]] = []
        for row in rows(path, tool):
            chunk.append({"tool": row.tool, "request": row.request, "recorded_at": row.recorded_at,
                          "source": row.source, "items": [msgspec.structs.asdict(i) for i in row.items]})
            if len(chunk) == 4096:
                writer.write_table(pa.Table.from_pylist(chunk, schema))
                count += len(chunk)
                chunk = []
        if chunk or not count:
            writer.write_table(pa.Table.from_pylist(chunk, schema))
            count += len(chunk)
    return count
