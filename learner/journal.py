"""Rank 0's intake journal: every accepted group's frame is on disk (fsync) before its ack, numbered in arrival
order, until a checkpoint covers it. A learner that crashes between checkpoints loses no acked group: resuming
replays the journal entries newer than the checkpoint (trained after it — their effect died with the process — or
still buffered), and a checkpoint truncates the journal up to the sequence number its snapshot saw.

    <checkpoint_dir>/journal/000000000042.msgpack    the protocol-encoded TrajectoryGroup accepted 42nd
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from protocol.files import write_atomic

log = logging.getLogger(__name__)

_ENTRY = re.compile(r"^(\d{12})\.msgpack$")


class GroupJournal:
    """Append-only numbered frames in `folder`; not thread-safe (the service calls it under its lock)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".*.tmp"):  # an append interrupted by a crash: never acked
            stale.unlink(missing_ok=True)
        seqs = self._seqs()
        self.last_seq = seqs[-1] if seqs else -1

    def _seqs(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := _ENTRY.match(p.name)))

    def _path(self, seq: int) -> Path:
        return self.folder / f"{seq:012d}.msgpack"

    def append(self, frame: bytes) -> int:
        """Write `frame` durably (temp file, fsync, rename, fsync of the folder); returns its sequence number."""
        seq = self.last_seq + 1
        path = self._path(seq)
        write_atomic(path, frame, sync_dir=True)
        self.last_seq = seq
        return seq

    def entries_after(self, seq: int) -> list[tuple[int, bytes]]:
        """(sequence number, frame) of every entry newer than `seq`, in order."""
        return [(s, self._path(s).read_bytes()) for s in self._seqs() if s > seq]

    def truncate(self, upto: int) -> int:
        """Delete the entries with sequence number <= `upto` (a checkpoint holds them); returns how many."""
        gone = [s for s in self._seqs() if s <= upto]
        for s in gone:
            self._path(s).unlink(missing_ok=True)
        return len(gone)

    def count(self) -> int:
        return len(self._seqs())
