"""Result cache of a tool server: an in-memory LRU plus an optional on-disk store (SQLite), shared by replicas.

Keys are a hash of the backend's namespace, the tool and the normalised arguments (`request_text`: strings
NFKC-normalised, case-folded and whitespace-collapsed; bytes such as images by content hash), so "Who built  Harrow?"
and "who built harrow?" share an entry and an image hits however it is named. Snapshots (tool_servers/snapshot.py)
key their replies by the same `request_text`. Values are the msgpack-encoded hits,
so the memory bound is exact and every hit hands out fresh objects. Only ok results are cached, never errors.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from protocol import ToolItem

log = logging.getLogger(__name__)

_encoder = msgspec.msgpack.Encoder()
_items_decoder = msgspec.msgpack.Decoder(list[ToolItem])


def normalise_query(text: str) -> str:
    """NFKC, case-folded, runs of whitespace collapsed to one space, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def normalised_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """A request's arguments as the cache and snapshots key them: strings by `normalise_query`, bytes (images) as
    {"blake2b": their content hash}, numbers and booleans unchanged (1, 1.0 and true stay apart on purpose:
    backends may treat them differently)."""
    out: dict[str, Any] = {}
    for name, value in args.items():
        if isinstance(value, str):
            out[name] = normalise_query(value)
        elif isinstance(value, bytes):
            out[name] = {"blake2b": content_hash(value)}
        else:
            out[name] = value
    return out


def request_text(args: Mapping[str, Any]) -> str:
    """The normalised request as canonical JSON (keys sorted, no spaces, UTF-8 kept): the snapshots' key, e.g.
    `{"query":"who built harrow?"}` or `{"image":{"blake2b":"9f3c..."}}`."""
    return json.dumps(normalised_args(args), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def cache_key(namespace: str, tool: str, args: Mapping[str, Any]) -> str:
    """The cache key of one request: a hash of the namespace, the tool and `request_text(args)`."""
    return hashlib.blake2b(_encoder.encode([namespace, tool, request_text(args)]), digest_size=20).hexdigest()


@dataclass(frozen=True)
class CacheConfig:
    """The knobs of a `cache:` section in conf/tool_servers/*.yaml."""

    enabled: bool = True
    max_entries: int = 4096  # in-memory LRU entries
    max_bytes: int = 64 * 1024 * 1024  # in-memory bound on the encoded hits
    directory: str | None = None  # on-disk store (SQLite file inside it); null = memory only
    max_disk_entries: int = 1_000_000  # oldest entries are pruned beyond this
    ttl_s: float | None = None  # entries older than this are misses (web results go stale); null = forever

    def __post_init__(self) -> None:
        if self.max_entries < 1 or self.max_bytes < 1 or self.max_disk_entries < 1:
            raise ValueError(f"cache sizes must be >= 1, got {self}")
        if self.ttl_s is not None and self.ttl_s <= 0:
            raise ValueError(f"cache ttl_s must be > 0 or null, got {self.ttl_s!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "CacheConfig":
        values = dict(values or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown cache knobs {unknown}; known: {sorted(known)}")
        return cls(**values)


class _DiskStore:
    """key -> (created, value) in one SQLite file; safe across threads (one lock) and processes (WAL)."""

    def __init__(self, directory: str | Path, max_entries: int) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / "tool_cache.sqlite3"
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._puts = 0
        self._db = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # a crash may lose recent entries, never corrupt the file
        self._db.execute("CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, created REAL, value BLOB)")

    def get(self, key: str) -> tuple[float, bytes] | None:
        with self._lock:
            row = self._db.execute("SELECT created, value FROM entries WHERE key = ?", (key,)).fetchone()
        return None if row is None else (row[0], row[1])

    def put(self, key: str, created: float, value: bytes) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO entries VALUES (?, ?, ?)", (key, created, value))
            self._puts += 1
            if self._puts % 1000 == 0:  # pruning costs a count; do it now and then, not on every put
                (count,) = self._db.execute("SELECT COUNT(*) FROM entries").fetchone()
                if count > self.max_entries:
                    self._db.execute("DELETE FROM entries WHERE key IN (SELECT key FROM entries ORDER BY created "
                                     "LIMIT ?)", (count - self.max_entries,))

    def close(self) -> None:
        with self._lock:
            self._db.close()


class ResultCache:
    """LRU of encoded hits in memory, optionally backed by a SQLite store that survives restarts.

    Thread-safe: the server looks up memory on its event loop and reads/writes the disk store from its
    executor threads. Counting hits and misses is the caller's job (the server counts them in its metrics).
    """

    def __init__(self, config: CacheConfig | None = None, namespace: str = "") -> None:
        self.config = config or CacheConfig()
        self.namespace = namespace
        self._memory: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._disk = _DiskStore(self.config.directory, self.config.max_disk_entries) if self.config.directory \
            else None

    @property
    def has_disk(self) -> bool:
        return self._disk is not None

    def key(self, tool: str, args: Mapping[str, Any]) -> str:
        return cache_key(self.namespace, tool, args)

    def get_memory(self, key: str) -> list[ToolItem] | None:
        with self._lock:
            entry = self._memory.get(key)
            if entry is None:
                return None
            if self._expired(entry[0]):
                self._drop(key)
                return None
            self._memory.move_to_end(key)
            value = entry[1]
        return _items_decoder.decode(value)

    def get_disk(self, key: str) -> list[ToolItem] | None:
        """Look the key up on disk (blocking I/O: call from a thread); a hit is promoted to memory."""
        if self._disk is None:
            return None
        entry = self._disk.get(key)
        if entry is None or self._expired(entry[0]):
            return None
        self._remember(key, *entry)
        return _items_decoder.decode(entry[1])

    def put(self, key: str, items: list[ToolItem], *, disk: bool = True) -> None:
        """Store ok results in memory and, when `disk` and a store exists, on disk (blocking I/O)."""
        created = time.time()
        value = _encoder.encode(items)
        self._remember(key, created, value)
        if disk and self._disk is not None:
            try:
                self._disk.put(key, created, value)
            except sqlite3.Error as exc:  # a full or locked disk must not fail the request that was answered
                log.warning("cache store %s: put failed: %s", self._disk.path, exc)

    def sizes(self) -> tuple[int, int]:
        """(entries, bytes) in memory."""
        with self._lock:
            return len(self._memory), self._bytes

    def close(self) -> None:
        if self._disk is not None:
            self._disk.close()

    def _expired(self, created: float) -> bool:
        return self.config.ttl_s is not None and time.time() - created > self.config.ttl_s

    def _remember(self, key: str, created: float, value: bytes) -> None:
        if len(value) > self.config.max_bytes:
            return  # one huge result must not flush everything else
        with self._lock:
            if key in self._memory:
                self._drop(key)
            self._memory[key] = (created, value)
            self._bytes += len(value)
            while len(self._memory) > self.config.max_entries or self._bytes > self.config.max_bytes:
                self._drop(next(iter(self._memory)))

    def _drop(self, key: str) -> None:
        _, value = self._memory.pop(key)
        self._bytes -= len(value)
