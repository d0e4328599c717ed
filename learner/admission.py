"""Staleness control: which rollouts may start (AReaL's admission rule) and how stale the trained tokens were.

Admission. With B = groups_per_step, η = max_staleness and v the current policy version, a new group may start iff

    accepted + running < (η + v + 1) · B

where `accepted` counts groups received so far and `running` counts granted groups not yet received. A group
started at version v' is trained at the earliest step that consumes it; since at most (η + v' + 1)·B groups exist
by then, that step's version is at most v' + η, so no group is more than η versions stale when its first token
was sampled (later tokens of a multi-version episode are fresher).

Token staleness (pure helpers): for a step that updates the policy of version V, a generated token sampled by
version v_t has lag V − v_t ≥ 0. Prompt and tool tokens (mask 0, version −1) are excluded.
"""
from __future__ import annotations

import threading

import numpy as np


class AdmissionController:
    """Thread-safe counters implementing the admission rule above."""

    def __init__(self, groups_per_step: int, max_staleness: int) -> None:
        if groups_per_step < 1 or max_staleness < 0:
            raise ValueError(
                f"need groups_per_step>=1 and max_staleness>=0, got {groups_per_step}, {max_staleness}"
            )
        self.groups_per_step = groups_per_step
        self.max_staleness = max_staleness
        self._lock = threading.Lock()
        self.accepted = 0
        self.running = 0
        self.unexpected = 0  # groups that arrived without a matching grant (e.g. resent after a learner restart)

    def capacity(self, version: int) -> int:
        """How many more groups may start at `version` (may be negative after unexpected arrivals)."""
        with self._lock:
            return (self.max_staleness + version + 1) * self.groups_per_step - (self.accepted + self.running)

    def try_grant(self, version: int) -> bool:
        """Grant one group if the rule allows it; a grant counts as running until received or lost."""
        if version < 0:
            raise ValueError(f"policy version must be >= 0, got {version}")
        with self._lock:
            if self.accepted + self.running < (self.max_staleness + version + 1) * self.groups_per_step:
                self.running += 1
                return True
            return False

    def on_group_received(self) -> None:
        """A granted group arrived (and was accepted into the buffer)."""
        with self._lock:
            if self.running > 0:
                self.running -= 1
            else:
                self.unexpected += 1
            self.accepted += 1

    def on_group_lost(self) -> None:
        """A granted group will never arrive (rejected, or its actor gave it up): free its slot."""
        with self._lock:
            if self.running > 0:
                self.running -= 1

    def on_group_dropped(self) -> None:
        """An accepted group will not be trained (dropped as stale): the rule assumes every accepted group is
        consumed in order, B per step, so give its slot back or the pipeline would run one group short."""
        with self._lock:
            if self.accepted > 0:
                self.accepted -= 1

    def snapshot(self) -> dict[str, int]:
        """Counters for a checkpoint."""
        with self._lock:
            return {"accepted": self.accepted, "running": self.running, "unexpected": self.unexpected}

    def restore(self, state: dict[str, int]) -> None:
        """Resume from `snapshot()`. Grants of the previous incarnation are not carried over (running = 0): their
        groups may never come, and any that do are counted as `unexpected` and accepted (then bounded by the stale
        policy), so a lost actor cannot shrink the capacity for ever."""
        with self._lock:
            self.accepted = int(state["accepted"])
            self.unexpected = int(state.get("unexpected", 0))
            self.running = 0


# Why the learner waits for groups (issue 13 item 2). Each slice of rank 0's wait is put down to the admission state
# at its start, so the causes add up to `learner_idle_s`:
#   staleness_bound: no new group may start (accepted + running >= (η + v + 1)·B): every group the rule admits is in
#                    flight, and only a larger η (or faster episodes) would give the learner more to train;
#   admission_retry: the rule has room again, but an actor denied within the last retry_after_ms is still sleeping
#                    out that delay (actors that ask for more groups than the rule allows, and a version step that
#                    makes room meanwhile);
#   actor_limit:     the rule has room and groups are in flight, but the actors start no more: they are at their own
#                    limit (actors.max_groups_in_flight, engine concurrency) — more actors or more in flight help;
#   no_rollouts:     nothing in flight and room to start: no actor is asking (start-up, eval passes, weight loads,
#                    a dead or restarting actor).
IDLE_CAUSES = ("staleness_bound", "admission_retry", "actor_limit", "no_rollouts")


def idle_cause(capacity: int, running: int, retrying: bool = False) -> str:
    """The cause (one of IDLE_CAUSES) of a wait that starts with this admission state (`capacity` from
    AdmissionController.capacity at the current version, `running` its granted-not-received groups, `retrying`:
    an actor was denied within its retry delay, TrajectoryService.retry_pending)."""
    if capacity <= 0:
        return "staleness_bound"
    if retrying:
        return "admission_retry"
    return "actor_limit" if running > 0 else "no_rollouts"


class IdleClock:
    """Seconds of waiting per cause (IDLE_CAUSES), for one learner step; not thread-safe (rank 0's step loop)."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(IDLE_CAUSES, 0.0)

    def add(self, cause: str, seconds: float) -> None:
        if cause not in self.seconds:
            raise ValueError(f"unknown idle cause {cause!r}; known: {IDLE_CAUSES}")
        self.seconds[cause] += max(0.0, seconds)

    def row(self) -> dict[str, float]:
        """`learner_idle_<cause>_s` for every cause."""
        return {f"learner_idle_{cause}_s": value for cause, value in self.seconds.items()}


def token_staleness(current_version: int, versions: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Lag `current_version − version` of every generated token (mask == 1), in token order.

    Raises ValueError when a generated token carries a negative version or one newer than `current_version`.
    """
    versions = np.asarray(versions)
    generated = np.asarray(mask).astype(bool)
    if versions.shape != generated.shape:
        raise ValueError(f"versions shape {versions.shape} != mask shape {generated.shape}")
    token_versions = versions[generated].astype(np.int64)
    if token_versions.size and (token_versions.min() < 0 or token_versions.max() > current_version):
        raise ValueError(
            f"generated-token versions span [{token_versions.min()}, {token_versions.max()}], outside "
            f"[0, {current_version}] for the update of version {current_version}"
        )
    return current_version - token_versions


def spans_versions(versions: np.ndarray, mask: np.ndarray) -> bool:
    """True when the generated tokens of one trajectory were sampled by two or more policy versions."""
    token_versions = np.asarray(versions)[np.asarray(mask).astype(bool)]
    return bool(token_versions.size) and int(token_versions.min()) != int(token_versions.max())
