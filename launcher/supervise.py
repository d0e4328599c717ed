"""Keeping the started roles going until the run ends: their run() calls, health (a learner rank's error fails the
run at once; a rollout actor whose process dies is restarted by Ray and started and run again here, up to
`run.actor_max_restarts` times), their live views for the metrics loop (learner rows, actor snapshots with dead
predecessors' counters carried over, tool server stats), and `stop()`, which ends exactly the roles this run
started, in the order that loses no data.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from launcher.logs import STAGES
from launcher.metrics import ACTOR_COUNTERS
from launcher.placement import where_am_i
from launcher.start import Roles, actor_restart_options

log = logging.getLogger(__name__)
stage = logging.getLogger(STAGES)  # a restart's end is a console line, as its start (an error) is

PROBE_EVERY_S = 1.0  # how often a restarting actor is asked whether Ray has brought its process back


class ActorFailed(RuntimeError):
    """A rollout actor failed for good: its code raised, or its process died with no restart left."""


@dataclass
class ActorWatch:
    """Supervision state of one rollout actor (see `Supervisor.supervise_actors`)."""

    actor_id: str
    phase: str = "running"  # running | restarting (Ray brings the process back) | starting (start() again) | done
    pending: Any = None  # the probe or start() call of a restart in progress
    restarts: int = 0  # process deaths seen, each one a restart Ray makes
    died_at: float = 0.0  # time.monotonic() of the last death
    probe_at: float = 0.0  # when the next liveness probe may go out
    cause: str = ""  # why the process died last (Ray's error, first line)
    last: dict = field(default_factory=dict)  # the current process's latest metrics() snapshot
    carried: dict = field(default_factory=dict)  # counters its dead predecessors had reported (added to its own)


class Supervisor:
    """Runs, watches and stops the roles of `roles` (see the module docstring)."""

    def __init__(self, roles: Roles) -> None:
        self._ray = roles._ray
        self.roles = roles
        self.cfg = roles.cfg
        self.learner_run: list[Any] = []
        self.actor_runs: list[Any] = []
        self.actor_watch: list[ActorWatch] = []
        self.actor_snapshots_missed = 0  # metrics() calls skipped or failed (actor restarting or just died)

    def start_training(self, max_steps: int) -> None:
        """Call run() on every learner rank (until `max_steps`) and rollout actor, and start watching them."""
        self.learner_run = [rank.run.remote(max_steps) for rank in self.roles.learner_ranks]
        self.actor_runs = [a.run.remote() for a in self.roles.actors]
        self.actor_watch = [ActorWatch(f"actor{i}") for i in range(len(self.roles.actors))]

    def drain_learner_metrics(self) -> list[dict]:
        return self._ray.get(self.roles.learner_ranks[0].drain_metrics.remote()) if self.roles.learner_ranks else []

    def actor_metrics(self) -> list[dict]:
        """metrics() of every actor that answers within 30 s. An actor being restarted is not asked, and one whose
        process just died (not yet noticed by `supervise_actors`) fails the call: both are skipped for this row and
        counted (`actor_snapshots_missed`). An error raised by metrics() itself still fails the run."""
        from ray.exceptions import RayActorError

        ray = self._ray
        asked = [i for i in range(len(self.roles.actors)) if self._actor_phase(i) in ("running", "done")]
        refs = [self.roles.actors[i].metrics.remote() for i in asked]
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=30)[0]) if refs else set()
        snapshots = []
        for i, ref in zip(asked, refs):
            if ref not in ready:
                log.warning("actor%d did not report its metrics within 30 s; left out of this row", i)
                continue
            try:
                snapshot = ray.get(ref)
            except RayActorError as exc:
                log.warning("actor%d could not report its metrics (its process died?): %s", i, _first_line(exc))
                continue
            if i < len(self.actor_watch):  # counters of dead predecessors carried over: totals never go down
                watch = self.actor_watch[i]
                watch.last = dict(snapshot)
                for key, value in watch.carried.items():
                    snapshot[key] = snapshot.get(key, 0.0) + value
            snapshots.append(snapshot)
        self.actor_snapshots_missed += len(self.roles.actors) - len(snapshots)
        return snapshots

    def actor_supervision(self) -> dict[str, float]:
        """The supervisor's side of a metrics row: process restarts so far (all actors), actors being restarted now,
        and metrics snapshots missed so far."""
        return {"actor_restarts": float(sum(w.restarts for w in self.actor_watch)),
                "actors_restarting": float(sum(w.phase in ("restarting", "starting") for w in self.actor_watch)),
                "actor_snapshots_missed": float(self.actor_snapshots_missed)}

    def tool_stats(self) -> list[tuple[str, dict]]:
        """(tool, server stats) per replica; a replica that does not answer in 10 s is left out (and logged)."""
        refs = [server.stats.remote() for server in self.roles.tool_servers]
        ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=10)
        out = []
        for tool, ref in zip(self.roles.tool_names, refs):
            if ref in ready:
                try:
                    out.append((tool, self._ray.get(ref)))
                except Exception as exc:  # a dead replica shows up in check_failures/tool errors; keep the loop
                    log.warning("tool server stats of %s failed: %s", tool, exc)
        return out

    def check_failures(self) -> bool:
        """Raise a learner rank's error at once (whatever it is), supervise the rollout actors (`supervise_actors`:
        raises ActorFailed for an actor that cannot go on); True once every learner rank returned."""
        done = []
        if self.learner_run:
            done, _ = self._ray.wait(self.learner_run, num_returns=len(self.learner_run), timeout=0)
        for ref in done:
            self._ray.get(ref)  # re-raises a rank's exception here, with its traceback
        self.supervise_actors()
        return bool(self.learner_run) and len(done) == len(self.learner_run)

    def supervise_actors(self) -> None:
        """One pass over the rollout actors that never blocks (the metrics loop calls it every half second).

        running: a run() that returned is done; one that failed because the actor's *process* died (Ray's
        RayActorError: ActorDiedError, ActorUnavailableError) starts a restart: Ray re-creates the process with the
        same constructor arguments, up to `run.actor_max_restarts` times. Any other error (raised by the actor's
        code), or a death with no restart left, raises ActorFailed naming the actor.
        restarting: probe the actor until Ray has the process back (a probe to a restarting actor fails with
        ActorUnavailableError; to one Ray gave up on, with ActorDiedError), then call start() again.
        starting: once start() returned, call run() again; the new process's spool resends the groups the dead one
        left unacked and re-plays its admitted groups from scratch, so nothing is lost or shipped partial.
        """
        now = time.monotonic()
        for i, watch in enumerate(self.actor_watch):
            if watch.phase == "running":
                finished, _, exc = self._outcome(self.actor_runs[i])
                if not finished:
                    continue
                if exc is None:
                    watch.phase = "done"
                    log.info("%s: run() returned", watch.actor_id)
                elif self._is_death(exc):
                    self._actor_died(watch, exc, now)
                else:
                    raise ActorFailed(f"rollout actor {watch.actor_id} failed: {exc}") from exc
            elif watch.phase == "restarting":
                self._probe_restarted(i, watch, now)
            elif watch.phase == "starting":
                finished, _, exc = self._outcome(watch.pending)
                if not finished:
                    continue
                watch.pending = None
                if exc is None:
                    self.actor_runs[i] = self.roles.actors[i].run.remote()
                    watch.phase = "running"
                    stage.info("%s: back %.0f s after its process died (restart %d of %d); its spool resends what "
                             "the dead process left", watch.actor_id, now - watch.died_at, watch.restarts,
                             actor_restart_options(self.cfg["run"])["max_restarts"])
                elif self._is_death(exc):
                    self._actor_died(watch, exc, now)
                else:
                    raise ActorFailed(f"rollout actor {watch.actor_id} failed to start again after its process "
                                      f"died ({watch.cause}): {exc}") from exc

    def _actor_died(self, watch: ActorWatch, exc: BaseException, now: float) -> None:
        watch.cause = _first_line(exc)
        limit = actor_restart_options(self.cfg["run"])["max_restarts"]
        if watch.restarts >= limit:
            raise ActorFailed(f"rollout actor {watch.actor_id}: its process died ({watch.cause}) with no restart "
                              f"left ({watch.restarts} of run.actor_max_restarts={limit} used)") from exc
        watch.restarts += 1
        watch.phase, watch.pending, watch.died_at, watch.probe_at = "restarting", None, now, now
        for name in ACTOR_COUNTERS:  # as of its last report: counts since then died with the process
            key = f"actor_{name}"
            if key in watch.last:
                watch.carried[key] = watch.carried.get(key, 0.0) + float(watch.last[key])
        watch.last = {}
        log.error("%s: its process died (%s); Ray restarts it (restart %d of %d)", watch.actor_id, watch.cause,
                  watch.restarts, limit)

    def _probe_restarted(self, i: int, watch: ActorWatch, now: float) -> None:
        """Restarting: is the process back? Then start() it (the probe also records where it landed)."""
        from ray.exceptions import ActorUnavailableError

        timeout = float(self.cfg["run"]["placement_timeout_s"])
        if now - watch.died_at > timeout:
            raise ActorFailed(f"rollout actor {watch.actor_id}: Ray did not bring its process back within "
                              f"{timeout:.0f} s (run.placement_timeout_s) after it died ({watch.cause})")
        if watch.pending is None:
            if now >= watch.probe_at:
                watch.pending = self.roles.actors[i].__ray_call__.remote(where_am_i)
            return
        finished, place, exc = self._outcome(watch.pending)
        if not finished:
            return
        watch.pending = None
        if isinstance(exc, ActorUnavailableError):  # still restarting
            watch.probe_at = now + PROBE_EVERY_S
        elif exc is not None:  # ActorDiedError: Ray gave up (e.g. the constructor raised) or the node is gone
            raise ActorFailed(f"rollout actor {watch.actor_id}: its process died ({watch.cause}) and Ray could not "
                              f"restart it: {exc}") from exc
        else:
            before = self.roles.where["actors"][i] if i < len(self.roles.where["actors"]) else {}
            if (before.get("node_id"), before.get("pid")) == (place["node_id"], place["pid"]):
                # Unreachable for a moment, not dead: its run() may still be going; starting it twice would not do.
                raise ActorFailed(f"rollout actor {watch.actor_id}: its run() call was lost ({watch.cause}) but its "
                                  f"process (pid {place['pid']}) never died; not restarting a live actor")
            if before:
                self.roles.where["actors"][i] = {**place, "actor_id": watch.actor_id, "restarts": watch.restarts}
            log.info("%s: process back (pid %s); starting it again", watch.actor_id, place.get("pid"))
            watch.pending = self.roles.actors[i].start.remote()
            watch.phase = "starting"

    def _actor_phase(self, i: int) -> str:
        return self.actor_watch[i].phase if i < len(self.actor_watch) else "running"

    def _outcome(self, ref: Any) -> tuple[bool, Any, BaseException | None]:
        """(finished, value, error) of a call, without blocking."""
        if not self._ray.wait([ref], timeout=0)[0]:
            return False, None, None
        try:
            return True, self._ray.get(ref), None
        except Exception as exc:  # the role's own exception (RayTaskError) or Ray's error about its process
            return True, None, exc

    @staticmethod
    def _is_death(exc: BaseException) -> bool:
        """The actor's process died or became unreachable (not an exception its code raised)."""
        from ray.exceptions import RayActorError

        return isinstance(exc, RayActorError)

    def stop(self) -> None:
        """Actors stop taking admissions and flush their finished groups (the learner still acks them); the learner
        stops and writes its final checkpoint; tool servers drain; then every handle is killed and the placement
        groups removed. Nothing else in the cluster is touched."""
        ray, roles = self._ray, self.roles
        learner_done = bool(self.learner_run) and not ray.wait(
            self.learner_run, num_returns=len(self.learner_run), timeout=0)[1]
        # After max_steps the learner's intake is closed: no ack can come, so actors spool at once instead of waiting.
        self._call_all(self._actors_to_stop(90), "stop", 90, 0.0 if learner_done else None)
        self._call_all(roles.learner_ranks, "stop", 30)
        if self.learner_run:  # run() returns after the final checkpoint
            _, pending = ray.wait(self.learner_run, num_returns=len(self.learner_run), timeout=120)
            if pending:
                log.warning("%d learner rank(s) still running after 120 s; the final checkpoint may be missing",
                            len(pending))
        self._call_all(roles.tool_servers, "stop", 15)
        for handle in roles.actors + roles.learner_ranks + roles.tool_servers:
            try:
                ray.kill(handle, no_restart=True)
            except Exception as exc:
                log.warning("could not kill a role: %s", exc)
        roles.placement.remove()

    def _actors_to_stop(self, timeout: float) -> list[Any]:
        """Actors that can take stop(): not one whose process Ray is still bringing back (it has no engine; the
        kill ends it). One being started again after a restart gets up to `timeout` s to finish start(), so that its
        stop() closes a whole engine rather than racing its start-up."""
        starting = [w.pending for w in self.actor_watch if w.phase == "starting" and w.pending is not None]
        if starting:
            log.info("waiting up to %.0f s for %d restarted actor(s) to finish start() before stopping them",
                     timeout, len(starting))
            self._ray.wait(starting, num_returns=len(starting), timeout=timeout)
        return [a for i, a in enumerate(self.roles.actors) if self._actor_phase(i) != "restarting"]

    def _call_all(self, handles: list[Any], method: str, timeout: float, *args: Any) -> None:
        """`method` on every role, waiting for all of them (up to `timeout`) even when one fails at once: ray.get of
        a list raises at the first error, which would cut the others' flush short."""
        refs = [getattr(h, method).remote(*args) for h in handles]
        if not refs:
            return
        ready, pending = self._ray.wait(refs, num_returns=len(refs), timeout=timeout)
        failed = []
        for ref in ready:
            try:
                self._ray.get(ref)
            except Exception as exc:  # a role that already died must not keep the rest alive
                failed.append(_first_line(exc))
        if failed or pending:
            log.warning("%s() did not finish cleanly on %d of %d role(s) (%d still running after %.0f s): %s",
                        method, len(failed) + len(pending), len(refs), len(pending), timeout, failed)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
