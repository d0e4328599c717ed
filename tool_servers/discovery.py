"""Discovery file: where the replicas of each tool listen, as JSON `{"text_search": ["tcp://...", ...], ...}`.

`python -m tool_servers serve --discovery FILE` adds its endpoint when it starts and removes it when it stops;
`ToolClient.from_discovery(FILE, tool)` reads it and re-reads it when it changes. Writes are atomic (temp file +
rename) under an exclusive lock on FILE.lock, so replicas starting together on a shared filesystem do not lose
each other's entries. A replica that crashed leaves its entry behind: clients skip it as unreachable.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from pathlib import Path

from protocol.files import write_atomic


def read_discovery(path: str | Path) -> dict[str, list[str]]:
    """{tool: [endpoint, ...]} from the file; ValueError names the file and what is wrong with it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"discovery file {path}: not JSON: {exc}") from exc
    if not isinstance(data, dict) or not all(
        isinstance(tool, str) and isinstance(endpoints, list) and all(isinstance(e, str) for e in endpoints)
        for tool, endpoints in data.items()
    ):
        raise ValueError(f"discovery file {path}: expected {{tool: [endpoint, ...]}}, got {data!r:.200}")
    return data


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write(path: Path, data: dict[str, list[str]]) -> None:
    write_atomic(path, json.dumps({tool: endpoints for tool, endpoints in sorted(data.items()) if endpoints},
                                  indent=1))


def register(path: str | Path, tool: str, endpoint: str) -> None:
    """Add `endpoint` to `tool`'s replicas in the file (created if missing)."""
    path = Path(path)
    with _locked(path):
        data = read_discovery(path) if path.exists() else {}
        endpoints = data.setdefault(tool, [])
        if endpoint not in endpoints:
            endpoints.append(endpoint)
        _write(path, data)


def unregister(path: str | Path, tool: str, endpoint: str) -> None:
    """Remove `endpoint` from `tool`'s replicas (no-op when absent)."""
    path = Path(path)
    with _locked(path):
        if not path.exists():
            return
        data = read_discovery(path)
        data[tool] = [e for e in data.get(tool, []) if e != endpoint]
        _write(path, data)
