"""The metrics loop of a training run: each learner step's row, joined with the actors' and tool servers' view,
rollout throughput and peak memory, goes to every sink and the progress display; the loop ends at max_steps, on a
role failure or on timeout.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from launcher.logs import STAGES
from launcher.progress import ProgressDisplay
from launcher.sinks import Sinks

log = logging.getLogger(__name__)
stage = logging.getLogger(STAGES)

PERCENTILES = ("p50", "p90", "p99")
# Per-actor counters summed over actors (as actor_<name>); the supervisor carries a dead process's last values over to
# its restarted successor, so the totals never go down (launcher.supervise.Supervisor.actor_metrics).
ACTOR_COUNTERS = ("weight_updates", "weight_errors", "episodes", "tool_errors", "tool_failed_episodes", "groups_played",
                  "tokens_generated", "engine_restarts", "group_failures", "admissions_denied", "spool_resent",
                  "spool_replayed")


class MemorySampler:
    """Peak proportional set size (PSS) of this process and all its descendants: Ray, roles, vLLM engines."""

    def __init__(self, every_s: float) -> None:
        import psutil

        self._psutil = psutil
        self.peak_gib = 0.0
        self.current_gib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(every_s,), name="memory-sampler", daemon=True)
        self._thread.start()

    def _loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.sample()

    def sample(self) -> float:
        me = self._psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied, self._psutil.ZombieProcess):
                continue
        self.current_gib = total / 2**30
        self.peak_gib = max(self.peak_gib, self.current_gib)
        return self.current_gib

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def summarize_actors(snapshots: list[Mapping[str, float]],
                     supervision: Mapping[str, float] | None = None) -> dict[str, float]:
    """The actors' side of a metrics row: how many report, the policy versions they run, totals of their counters,
    and the slowest actor's view of tool latency (client side: queueing + network + search); plus the supervisor's
    counts (`Supervisor.actor_supervision`: actor_restarts, actors_restarting, actor_snapshots_missed). A restarted
    actor's counters (ACTOR_COUNTERS) include its dead predecessors' last reported values (Supervisor.actor_metrics)."""
    view: dict[str, float] = dict(supervision or {})
    if not snapshots:
        return {**view, "actors_reporting": 0.0} if view else {}
    view |= {
        "actors_reporting": float(len(snapshots)),
        "actor_policy_version_min": min(s.get("actor_policy_version", -1) for s in snapshots),
        "actor_policy_version_max": max(s.get("actor_policy_version", -1) for s in snapshots),
    }
    for key in ACTOR_COUNTERS:
        view[f"actor_{key}"] = sum(s.get(f"actor_{key}", 0.0) for s in snapshots)
    update_p50 = [s["actor_weight_update_s_p50"] for s in snapshots if "actor_weight_update_s_p50" in s]
    if update_p50:
        view["actor_weight_update_s_p50"] = max(update_p50)
    for snapshot in snapshots:
        for key, value in snapshot.items():
            if key.startswith("actor_tool_client_") and "_latency_ms_" in key and key.endswith(PERCENTILES):
                name = "tool_client_" + key[len("actor_tool_client_"):]  # tool_client_<tool>_latency_ms_p50
                view[name] = max(view.get(name, 0.0), float(value))
    return view


SUMMED_TOOL_COUNTERS = ("snapshot_hits", "snapshot_misses", "snapshot_records", "snapshot_record_dropped",
                        "latency_injected_s", "latency_injected_count", "latency_past_deadline")


def summarize_tools(stats: Iterable[tuple[str, Mapping[str, float]]]) -> dict[str, float]:
    """Tool servers' side: per tool, replicas answering, requests, errors and server-side latency percentiles
    (the worst replica's, over each replica's recent window), and the counters summed over replicas of search
    snapshots (tool_servers.record / replay) and the latency model (`SUMMED_TOOL_COUNTERS`), when a replica has
    them."""
    view: dict[str, float] = {}
    for tool, snapshot in stats:
        view[f"tool_{tool}_replicas"] = view.get(f"tool_{tool}_replicas", 0.0) + 1
        view[f"tool_{tool}_requests"] = view.get(f"tool_{tool}_requests", 0.0) + snapshot.get("requests", 0.0)
        errors = sum(v for k, v in snapshot.items() if k.startswith("error_"))
        view[f"tool_{tool}_errors"] = view.get(f"tool_{tool}_errors", 0.0) + errors
        for name in SUMMED_TOOL_COUNTERS:
            if name in snapshot:
                view[f"tool_{tool}_{name}"] = view.get(f"tool_{tool}_{name}", 0.0) + float(snapshot[name])
        for p in PERCENTILES:
            if f"latency_ms_{p}" in snapshot:
                key = f"tool_{tool}_latency_ms_{p}"
                view[key] = max(view.get(key, 0.0), float(snapshot[f"latency_ms_{p}"]))
    return view


def with_throughput(row: dict[str, Any], previous_wall_s: float, wall_s: float) -> dict[str, Any]:
    """Rollout throughput: tokens and groups the learner consumed per second of its step cycle (waiting for groups +
    training + publishing); the wall-clock interval since the previous row when the row lacks those timings."""
    cycle = sum(float(row.get(k, 0.0)) for k in ("learner_idle_s", "step_time_s", "publish_s"))
    interval = cycle if cycle > 0 else max(wall_s - previous_wall_s, 1e-9)
    row["rollout_tokens_per_s"] = float(row.get("tokens_generated", 0.0)) / interval
    row["rollout_groups_per_s"] = float(row.get("groups", 0.0)) / interval
    return row


def stream_metrics(run: Mapping[str, Any], run_dir: Path, supervisor: Any, memory: MemorySampler,
                   config: Mapping[str, Any], tracker: Any = None) -> int:
    """Write one row per learner step (joined with the roles' views the `supervisor` collects) to every sink until
    max_steps (exit code 0), a role failure (raised) or run.timeout_s (exit code 1). With a `tracker`
    (launcher/heldout.py), its held-out passes are scheduled as steps come in, their rows go to the sinks too, and
    at max_steps its final pass and the report are made before the sinks close."""
    started = time.monotonic()
    deadline = started + float(run["timeout_s"])
    max_steps = int(run["max_steps"])
    sinks = Sinks(run_dir, run, config)
    display = ProgressDisplay(max_steps, enabled=bool(run["progress"]))
    stage.info("training: metrics -> %s", ", ".join(sinks.names))
    steps, last_wall = 0, 0.0
    try:
        while True:
            finished = supervisor.check_failures()  # also restarts actors whose process died
            rows = supervisor.drain_learner_metrics()
            if rows:
                context = summarize_actors(supervisor.actor_metrics(), supervisor.actor_supervision())
                context.update(summarize_tools(supervisor.tool_stats()))
            for row in rows:
                wall = round(time.monotonic() - started, 3)
                row.update(context)
                row.update(wall_time_s=wall, peak_mem_gib=round(memory.peak_gib, 3))
                with_throughput(row, last_wall, wall)
                last_wall = wall
                sinks.write(row)
                display.update(row)
                steps = int(row["step"])
                if tracker is not None:
                    tracker.on_step(steps)
            if tracker is not None:
                tracker.poll()
                for row in tracker.drain_rows():
                    sinks.write(row)
            if finished and steps >= max_steps:
                stage.info("reached %d steps in %.0fs", steps, time.monotonic() - started)
                if tracker is not None:
                    tracker.report = tracker.finish(steps)
                    for row in tracker.drain_rows():
                        sinks.write(row)
                return 0
            if time.monotonic() > deadline:
                log.error("timed out after %.0fs at step %d of %d", run["timeout_s"], steps, max_steps)
                return 1
            time.sleep(0.5)
    finally:
        display.close()
        sinks.close()
