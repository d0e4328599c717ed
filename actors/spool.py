"""The actor's bounded local spool: every admitted group holds one slot from its admission until the learner acks
it, so a slow or dead learner stops new admissions (back-pressure) instead of growing memory. On disk under the
actor's run folder, so nothing is lost when the actor itself restarts:

    spool/requests/<request_id>       an admission asked for whose answer is not recorded yet
    spool/grants/<request_id>.json    a granted admission whose group is still being played (question, version)
    spool/groups/<group_id>~<request_id>.msgpack   a finished group (protocol-encoded) not yet acked, and the
                                      admission it was played for

A new actor with the same folder resends the leftover groups, re-plays the leftover grants and gives back
(AdmissionRelease) the admissions asked for whose answer the dead process never recorded, so a crash at any point
neither loses a granted slot nor plays a group twice. Files are written atomically (temporary name, fsync,
rename), so a crash leaves either the whole file or none.
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import msgspec

from protocol import ProtocolError, TrajectoryGroup, decode
from protocol.files import write_atomic
from protocol.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Grant:
    """An admission the learner granted, recorded until its group is spooled."""

    request_id: str
    question_id: str
    version: int


class GroupSpool:
    """At most `max_groups` admitted-but-unacked groups; `acquire()` waits for a free slot."""

    def __init__(self, folder: str | Path, max_groups: int, metrics: Metrics | None = None) -> None:
        if max_groups < 1:
            raise ValueError(f"max_groups must be >= 1, got {max_groups}")
        self.folder = Path(folder)
        self.requests_dir = self.folder / "requests"
        self.grants_dir = self.folder / "grants"
        self.groups_dir = self.folder / "groups"
        self.max_groups = max_groups
        self.metrics = metrics or Metrics()
        self._slots: asyncio.Semaphore | None = None  # made on the actor's loop at first use
        self._held = 0
        for folder_ in (self.requests_dir, self.grants_dir, self.groups_dir):
            folder_.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- slots (back-pressure)
    def _semaphore(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_groups)
        return self._slots

    async def acquire(self) -> None:
        """Wait for a slot (blocks while `max_groups` groups are admitted and unacked)."""
        semaphore = self._semaphore()
        if semaphore.locked():
            self.metrics.inc("spool_full_waits")
        await semaphore.acquire()
        self._held += 1
        self.metrics.set("spool_slots_held", self._held)

    def release(self) -> None:
        self._semaphore().release()
        self._held -= 1
        self.metrics.set("spool_slots_held", self._held)

    @property
    def held(self) -> int:
        return self._held

    # ---------------------------------------------------------------- files
    def record_request(self, request_id: str) -> None:
        """Before an AdmissionRequest goes out: if the process dies before the answer is recorded, the next one
        releases it (`unanswered_requests`)."""
        write_atomic(self.requests_dir / request_id, b"")

    def drop_request(self, request_id: str) -> None:
        """The answer is recorded (a grant file) or needs none (denied)."""
        (self.requests_dir / request_id).unlink(missing_ok=True)

    def unanswered_requests(self) -> list[str]:
        """Request ids a previous actor asked for without recording the answer (a grant may be held for them at
        the learner); files whose grant was recorded are just cleaned up. The caller releases the returned ids."""
        unanswered = []
        for path in sorted(self.requests_dir.iterdir(), key=_mtime):
            if path.name.startswith("."):
                path.unlink(missing_ok=True)  # a temp file of an interrupted write
            elif (self.grants_dir / f"{path.name}.json").exists() or self._group_files(f"*~{path.name}"):
                path.unlink(missing_ok=True)
            else:
                unanswered.append(path.name)
        return unanswered

    def record_grant(self, grant: Grant) -> None:
        write_atomic(self.grants_dir / f"{grant.request_id}.json", msgspec.json.encode(grant.__dict__))

    def drop_grant(self, request_id: str) -> None:
        (self.grants_dir / f"{request_id}.json").unlink(missing_ok=True)

    def put(self, group: TrajectoryGroup, frame: bytes, request_id: str | None = None) -> None:
        """Store a finished group (its encoded `frame`; the file name carries the admission's request id), then
        forget its grant: it is either a grant or a group, even when a crash falls between the two steps
        (`leftovers` skips a grant whose group is on disk)."""
        name = group.group_id if request_id is None else f"{group.group_id}~{request_id}"
        write_atomic(self.groups_dir / f"{name}.msgpack", frame)
        if request_id is not None:
            self.drop_grant(request_id)
        self.metrics.set("spool_groups", self.count())

    def remove(self, group_id: str) -> None:
        for path in [self.groups_dir / f"{group_id}.msgpack", *self._group_files(f"{group_id}~*")]:
            path.unlink(missing_ok=True)
        self.metrics.set("spool_groups", self.count())

    def _group_files(self, stem_pattern: str) -> list[Path]:
        return list(self.groups_dir.glob(f"{stem_pattern}.msgpack"))

    def count(self) -> int:
        return sum(1 for _ in self.groups_dir.glob("*.msgpack"))

    def leftovers(self) -> tuple[list[Grant], list[TrajectoryGroup]]:
        """Grants and groups a previous actor left (oldest first). Unreadable files are moved to `bad/`."""
        spooled = {p.stem.split("~", 1)[1] for p in self.groups_dir.glob("*~*.msgpack")}
        grants: list[Grant] = []
        for path in sorted(self.grants_dir.glob("*.json"), key=_mtime):
            if path.stem in spooled:  # its group was stored; the crash fell before the grant was dropped
                path.unlink(missing_ok=True)
                self.metrics.inc("spool_grants_already_spooled")
                continue
            try:
                grants.append(Grant(**msgspec.json.decode(path.read_bytes())))
            except (msgspec.DecodeError, TypeError) as exc:
                self._quarantine(path, exc)
        groups: list[TrajectoryGroup] = []
        for path in sorted(self.groups_dir.glob("*.msgpack"), key=_mtime):
            try:
                groups.append(decode(path.read_bytes(), TrajectoryGroup))
            except ProtocolError as exc:
                self._quarantine(path, exc)
        return grants, groups

    def discard_leftovers(self) -> int:
        """Delete whatever a previous actor left; return how many files."""
        paths = [*self.requests_dir.iterdir(), *self.grants_dir.glob("*.json"), *self.groups_dir.glob("*.msgpack")]
        for path in paths:
            path.unlink(missing_ok=True)
        return len(paths)

    def _quarantine(self, path: Path, exc: Exception) -> None:
        bad = self.folder / "bad"
        bad.mkdir(exist_ok=True)
        os.replace(path, bad / path.name)
        self.metrics.inc("spool_bad_files")
        log.error("spool file %s is unreadable (%s); moved to %s", path, exc, bad)


def _mtime(path: Path) -> float:
    return path.stat().st_mtime
