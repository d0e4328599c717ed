"""The group audit of a run folder: what became of every trajectory group the rollout actors started, read from the
group ledger (`<run>/ledger/`, protocol/ledger.py) and, for what is still in flight at the end, the learner's newest
checkpoint, its journal and the actors' spools.

    python -m launcher.audit RUN_DIR [--json]      # exit 0: clean; 1: a group lost or trained twice; 2: no ledger

Every group an actor started (`started`, one per group id) ends in exactly one class:

- trained: the learner trained it exactly once (its `trained` lines, after the roll-back below);
- dropped, by reason: the learner dropped it (`stale`, `tool_failed`, `batch_skipped`), refused it as invalid
  (`rejected`), or the actor gave it up (`given_up`: every attempt failed, or its spool was discarded);
- regenerated: an actor process died while playing it and its successor re-played the same admission (request id)
  under a new group id — the new group carries the admission on, the old one was never shipped;
- pending: neither trained nor dropped when the run stopped, and still held somewhere it will be resumed from: the
  final (newest) checkpoint's buffer, the learner's journal, an actor's spool (the finished group, or the grant it
  was being played for); listed with where;
- trained twice: a defect (the learner deduplicates by group id);
- conflicting: trained and dropped by the learner: a defect too (two outcomes);
- lost: none of the above: a defect. A group the learner accepted (journalled) counts as lost when it is in none of
  the learner's places, even if an actor still spools a copy: the learner would ack the resend as a duplicate.

Learner roll-back: a learner resumed from the checkpoint at version v (its `open` line says v) retrains or re-drops
whatever its predecessor did at versions >= v (the effect died with that process), so `trained`/`dropped` lines of
earlier processes with version >= v are rolled back (counted) before the new process's lines are read. A fresh
start (version 0) after an earlier process rolls back everything. `trained_by_step` is the version sequence this
leaves: the groups of each optimiser step, in the order they were trained.

Groups the learner trained or dropped that no actor ledger started (`unstarted`: a writer killed mid-line, or groups
sent by something other than a rollout actor) are listed, not counted as a defect; lines that do not parse (a torn
last line) are skipped and counted.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import msgspec
import yaml

from protocol.ledger import LEARNER_LEDGER, LEDGER_DIR

log = logging.getLogger(__name__)

LEARNER_DROP_REASONS = ("stale", "tool_failed", "batch_skipped")


class AuditError(RuntimeError):
    """The folder holds no ledger to audit (the message names the folder)."""


@dataclass
class Audit:
    """The audit of one run folder (see the module docstring for the classes)."""

    run_dir: str
    actors: list[str] = field(default_factory=list)
    started: int = 0
    trained: int = 0  # exactly once
    dropped: dict[str, list[str]] = field(default_factory=dict)  # reason -> group ids
    regenerated: list[str] = field(default_factory=list)
    pending: dict[str, str] = field(default_factory=dict)  # group id -> where
    trained_twice: dict[str, list[int]] = field(default_factory=dict)  # group id -> steps it was trained in
    conflicting: dict[str, str] = field(default_factory=dict)  # group id -> its outcomes
    lost: list[str] = field(default_factory=list)
    unstarted: list[str] = field(default_factory=list)
    trained_by_step: dict[int, list[str]] = field(default_factory=dict)
    duplicates_received: int = 0
    rolled_back: int = 0
    learner_opens: int = 0
    bad_lines: int = 0

    @property
    def clean(self) -> bool:
        """No group lost, trained twice or given two outcomes."""
        return not (self.lost or self.trained_twice or self.conflicting)

    @property
    def dropped_counts(self) -> dict[str, int]:
        return {reason: len(ids) for reason, ids in sorted(self.dropped.items())}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "clean": self.clean, "dropped_counts": self.dropped_counts}

    def text(self, show: int = 20) -> str:
        """The human report (at most `show` ids per list)."""
        def listed(ids: Sequence[str] | dict) -> str:
            items = [f"{k} ({v})" for k, v in ids.items()] if isinstance(ids, dict) else list(ids)
            more = f", … {len(items) - show} more" if len(items) > show else ""
            return ", ".join(items[:show]) + more

        dropped = sum(len(ids) for ids in self.dropped.values())
        reasons = ", ".join(f"{r} {n}" for r, n in self.dropped_counts.items())
        lines = [f"group audit of {self.run_dir}: {self.started} group(s) started by {len(self.actors)} actor(s); "
                 f"the learner opened {self.learner_opens} time(s)",
                 f"  trained exactly once  {self.trained}",
                 f"  dropped               {dropped}" + (f" ({reasons})" if reasons else ""),
                 f"  regenerated           {len(self.regenerated)}  (an actor restart re-played the admission)",
                 f"  pending at the end    {len(self.pending)}",
                 f"  trained twice         {len(self.trained_twice)}",
                 f"  conflicting           {len(self.conflicting)}",
                 f"  lost                  {len(self.lost)}",
                 f"  (duplicates received {self.duplicates_received}, learner lines rolled back "
                 f"{self.rolled_back}, unstarted {len(self.unstarted)}, unreadable lines {self.bad_lines})"]
        for title, ids in (("pending", self.pending), ("trained twice (steps)", self.trained_twice),
                           ("conflicting", self.conflicting), ("lost", self.lost), ("unstarted", self.unstarted)):
            if ids:
                lines.append(f"{title}: {listed(ids)}")
        lines.append("clean: no group lost, none trained twice" if self.clean else "NOT CLEAN")
        return "\n".join(lines)


@dataclass
class _Started:
    actor: str
    request_id: Optional[str]


def audit_run(run_dir: str | Path) -> Audit:
    """Audit the run folder `run_dir` (its ledger/, checkpoints and spools). AuditError when it has no ledger."""
    run = Path(run_dir)
    folder = run / LEDGER_DIR
    if not folder.is_dir():
        raise AuditError(f"{run} has no {LEDGER_DIR}/ folder: not a run folder, or a run from before the group ledger")
    audit = Audit(run_dir=str(run))

    # ---------------------------------------------------------------- the actors' lines
    started: dict[str, _Started] = {}
    by_request: dict[tuple[str, str], list[str]] = defaultdict(list)  # (actor, request id) -> group ids, in order
    given_up: dict[str, str] = {}  # group id -> reason
    given_up_requests: dict[tuple[str, str], str] = {}
    for path in sorted(folder.glob("*.jsonl")):
        if path.name == LEARNER_LEDGER:
            continue
        audit.actors.append(path.stem)
        for line in _lines(path, audit):
            actor = str(line.get("actor") or path.stem)
            event, group_id, request_id = line.get("event"), line.get("group_id"), line.get("request_id")
            if event == "started" and group_id:
                if group_id not in started:
                    started[group_id] = _Started(actor, request_id)
                    if request_id:
                        by_request[(actor, request_id)].append(group_id)
            elif event == "given_up":
                reason = str(line.get("reason") or "")
                if group_id:
                    given_up[group_id] = reason
                elif request_id:
                    given_up_requests[(actor, request_id)] = reason

    # ---------------------------------------------------------------- the learner's lines, with roll-back
    trained: dict[str, list[tuple[int, int]]] = defaultdict(list)  # group id -> [(version, step)]
    drops: dict[str, set[str]] = defaultdict(set)  # group id -> learner drop reasons (rolled back on resume)
    rejected: dict[str, str] = {}  # not rolled back: the actor forgot the group when told
    accepted: set[str] = set()
    learner_path = folder / LEARNER_LEDGER
    drop_lines: list[tuple[str, str, int]] = []  # (group id, reason, version) of the processes so far
    for line in (_lines(learner_path, audit) if learner_path.exists() else []):
        event, group_id = line.get("event"), line.get("group_id")
        if event == "open":
            audit.learner_opens += 1
            since = int(line.get("version") or 0)
            for gid in list(trained):
                kept = [entry for entry in trained[gid] if entry[0] < since]
                audit.rolled_back += len(trained[gid]) - len(kept)
                if kept:
                    trained[gid] = kept
                else:
                    del trained[gid]
            kept_drops = [d for d in drop_lines if d[2] < since]
            audit.rolled_back += len(drop_lines) - len(kept_drops)
            drop_lines = kept_drops
        elif not group_id:
            continue
        elif event == "trained":
            trained[group_id].append((int(line.get("version", -1)), int(line.get("step", -1))))
        elif event == "dropped":
            drop_lines.append((group_id, str(line.get("reason") or "unknown"), int(line.get("version", -1))))
        elif event == "rejected":
            rejected[group_id] = str(line.get("reason") or "")
        elif event == "duplicate":
            audit.duplicates_received += 1
        elif event in ("accepted", "replayed"):
            accepted.add(group_id)
    for gid, reason, _ in drop_lines:
        drops[gid].add(reason)
    for gid, entries in trained.items():
        for version, step in entries:
            audit.trained_by_step.setdefault(step, []).append(gid)
    audit.trained_by_step = dict(sorted(audit.trained_by_step.items()))

    # ---------------------------------------------------------------- where the unfinished ones are
    learner_places = _learner_places(run)
    spooled, granted = _spools(run)

    # ---------------------------------------------------------------- every started group, one class
    dropped: dict[str, list[str]] = defaultdict(list)
    for gid, info in started.items():
        learner_drops = drops.get(gid, set()) | ({"rejected"} if gid in rejected else set())
        times = len(trained.get(gid, []))
        if times > 1:
            audit.trained_twice[gid] = [step for _, step in trained[gid]]
        elif times == 1 and learner_drops:
            audit.conflicting[gid] = f"trained and dropped ({', '.join(sorted(learner_drops))})"
        elif times == 1:
            audit.trained += 1
        elif len(learner_drops) > 1:
            audit.conflicting[gid] = f"dropped for {', '.join(sorted(learner_drops))}"
        elif learner_drops:
            dropped[next(iter(learner_drops))].append(gid)
        elif info.request_id and by_request[(info.actor, info.request_id)][-1] != gid:
            audit.regenerated.append(gid)
        elif gid in given_up or (info.actor, info.request_id) in given_up_requests:
            dropped["given_up"].append(gid)
        else:
            where = list(learner_places.get(gid, []))
            if gid not in accepted:  # an actor's copy counts only while the learner would take it
                where += spooled.get(gid, [])
                if info.request_id and (info.actor, info.request_id) in granted:
                    where.append(granted[(info.actor, info.request_id)])
            if where:
                audit.pending[gid] = "; ".join(where)
            else:
                audit.lost.append(gid)
    audit.dropped = {reason: ids for reason, ids in sorted(dropped.items())}
    audit.started = len(started)
    # Trained twice or given two outcomes counts wherever the group came from.
    for gid, entries in trained.items():
        if gid not in started:
            audit.unstarted.append(gid)
            if len(entries) > 1:
                audit.trained_twice[gid] = [step for _, step in entries]
    audit.unstarted += sorted(gid for gid in {*drops, *rejected} if gid not in started and gid not in trained)
    return audit


def _lines(path: Path, audit: Audit) -> Iterator[dict[str, Any]]:
    """The JSON objects of a ledger file; an unreadable line (a torn last line of a killed writer) is counted."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                line = None
            if not isinstance(line, dict):
                audit.bad_lines += 1
                log.warning("%s:%d is not a ledger line; skipped", path, number)
                continue
            yield line


def _checkpoint_root(run: Path) -> Path:
    """The learner's checkpoint folder: learner.checkpoint_dir of the run's config.yaml, else <run>/checkpoints."""
    config = run / "config.yaml"
    if config.is_file():
        try:
            learner = (yaml.safe_load(config.read_text()) or {}).get("learner") or {}
        except yaml.YAMLError as exc:
            log.warning("cannot read %s (%s); looking for checkpoints in %s", config, exc, run / "checkpoints")
            learner = {}
        if learner.get("checkpoint_dir"):
            return Path(learner["checkpoint_dir"])
    return run / "checkpoints"


def _learner_places(run: Path) -> dict[str, list[str]]:
    """group id -> where the learner holds it untrained: the newest checkpoint's buffer, or a journal entry newer
    than that checkpoint (acked since; a resume replays it)."""
    from learner.batch import unpack_groups
    from learner.checkpoint import GROUPS_FILE, STATE_FILE, list_checkpoints

    from protocol import ProtocolError, TrajectoryGroup, decode

    root = _checkpoint_root(run)
    places: dict[str, list[str]] = defaultdict(list)
    journal_seq = -1
    checkpoints = list_checkpoints(root)
    if checkpoints:
        newest = checkpoints[-1]
        try:
            journal_seq = int(json.loads((newest / STATE_FILE).read_text()).get("journal_seq", -1))
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s (%s)", newest / STATE_FILE, exc)
        blob_path = newest / GROUPS_FILE
        if blob_path.is_file():
            try:
                for group in unpack_groups(blob_path.read_bytes()):
                    places[group.group_id].append(f"checkpoint {newest.name} buffer")
            except (ProtocolError, msgspec.DecodeError) as exc:
                log.warning("cannot read the buffered groups of %s (%s)", newest, exc)
    journal = root / "journal"
    for path in sorted(journal.glob("[0-9]*.msgpack")) if journal.is_dir() else []:
        if not path.stem.isdigit() or int(path.stem) <= journal_seq:
            continue
        try:
            group = decode(path.read_bytes(), TrajectoryGroup)
        except (OSError, ProtocolError) as exc:
            log.warning("cannot read journal entry %s (%s)", path, exc)
            continue
        places[group.group_id].append(f"learner journal {path.name}")
    return places


def _spools(run: Path) -> tuple[dict[str, list[str]], dict[tuple[str, str], str]]:
    """(group id -> "<actor> spool" for each finished group an actor spools unacked, (actor, request id) -> where
    for each grant an actor was playing when it stopped) from <run>/actors/<id>/spool/ (actors/spool.py)."""
    groups: dict[str, list[str]] = defaultdict(list)
    grants: dict[tuple[str, str], str] = {}
    for spool in sorted((run / "actors").glob("*/spool")):
        actor = spool.parent.name
        for path in spool.glob("groups/*.msgpack"):
            groups[path.stem.split("~", 1)[0]].append(f"{actor} spool (group)")
        for path in spool.glob("grants/*.json"):
            grants[(actor, path.stem)] = f"{actor} spool (grant {path.stem})"
    return groups, grants


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.audit",
                                     description="What became of every trajectory group of a run (its ledger/).")
    parser.add_argument("run_dir", help="a run folder (holds ledger/)")
    parser.add_argument("--json", action="store_true", help="print the audit as one JSON object")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        audit = audit_run(args.run_dir)
    except AuditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(audit.to_dict(), indent=2) if args.json else audit.text())
    return 0 if audit.clean else 1


if __name__ == "__main__":
    sys.exit(main())
