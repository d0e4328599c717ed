"""The learner role: one `LearnerRank` per FSDP2 rank. Rank 0 also serves actors (admissions, groups) and weights.

Loop per step:  rank 0 takes groups_per_step groups (stale ones handled by algo.stale_policy, those a tool outage
left without contrast dropped) → broadcasts them (msgpack bytes in a uint8 tensor) → every rank trains its share
(tool_failed episodes left out) → optimiser step → version += 1 → weights gathered and published by rank 0 → metrics
row → a checkpoint every learner.checkpoint_every steps. When run() ends (max_steps or stop()), a final checkpoint
holds everything acked but not trained, and resuming (learner.resume_from) continues at the same version with those
groups first.
A plain class: the launcher wraps it as a Ray actor with max_concurrency >= 2 so `drain_metrics`/`stop` can be
called while `run` blocks. `publish_initial` and `run` are collectives: call them on every rank.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from learner.admission import AdmissionController, IdleClock, idle_cause
from learner.batch import (
    MIN_SCORED_EPISODES,
    StaleGroupError,
    apply_stale_policy,
    batch_stats,
    pack_groups,
    samples_from_groups,
    scored,
    split_stale,
    split_tool_failed,
    unpack_groups,
    validate_group,
)
from learner.checkpoint import LearnerState, resolve_checkpoint
from learner.config import AlgoConfig, LearnerConfig
from learner.journal import GroupJournal
from learner.service import TrajectoryService
from learner.trainer import BatchError, Trainer
from learner.weight_transport import WeightPublisher
from learner.weights import ZmqWeightPublisher, gather_full_state_dict, make_publisher, to_checkpoint_names
from protocol import TrajectoryGroup
from protocol.ledger import Ledger
from protocol.metrics import Metrics
from protocol.sockets import is_loopback_endpoint, token_from_env

log = logging.getLogger(__name__)

# Header codes of the per-step broadcast from rank 0.
_STOP, _GO, _STALE_ERROR = 0, 1, 2
IDLE_POLL_S = 0.05  # rank 0 waits for groups in slices this long, each put down to the admission state at its start

_COUNTERS = ("groups_received", "groups_duplicate", "groups_rejected", "groups_refused_closed", "bad_frames",
             "admissions_granted", "admissions_denied", "weights_served", "weights_bad_frames", "batches_skipped",
             "stale_groups", "stale_groups_dropped", "stale_groups_trained", "checkpoints_written",
             "journal_replayed", "journal_errors", "admission_repeats", "tool_failed_episodes",
             "tool_failed_groups_dropped")


class LearnerRank:
    """One rank of the learner world. `cfg` = {"learner": {...}, "algo": {...}} (see conf/learner, conf/algo)."""

    _ledger: Ledger = Ledger(None)  # rank 0's group ledger (learner.ledger); other ranks write none

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, model_path: str,
                 cfg: dict[str, Any], *, token: Optional[str] = None) -> None:
        """`token`: the endpoints' shared secret; None reads it from the variable `learner.token_env` names (the
        launcher reads it in its own process and hands it over, as ranks on other nodes lack that variable)."""
        self.learner = LearnerConfig.from_dict(cfg.get("learner"))
        self.algo = AlgoConfig.from_dict(cfg.get("algo"))
        if world_size != self.learner.world_size:
            raise ValueError(f"world_size={world_size} but learner.world_size={self.learner.world_size}")
        if token is None and rank == 0:
            token = learner_token(self.learner)  # before joining the world: a missing variable fails at once
        torch.set_num_threads(self.learner.threads)
        self.rank, self.world_size = rank, world_size
        device = rank_device(self.learner, rank)
        join_world(self.learner, master_addr, master_port, rank, world_size)
        self.trainer = Trainer(model_path, self.learner, self.algo, device)
        self.device = device
        self.version = 0
        self.trained_count = 0  # groups trained since the first run of this checkpoint lineage
        self._trained_ids: deque[str] = deque(maxlen=100_000)
        self._lock = threading.Lock()
        self._rows: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._running = False
        self._closed = False
        self.metrics = Metrics()

        restore: Optional[tuple[list[TrajectoryGroup], list[str]]] = None
        admission_state: Optional[dict[str, int]] = None
        replay_after: Optional[int] = -1 if self.learner.resume_from else None  # resuming with no checkpoint yet
        resume = resolve_checkpoint(self.learner.resume_from, self.learner.checkpoint_dir)
        if resume is not None:
            state, blob = self.trainer.load(resume)
            self.version, self.trained_count = state.version, state.trained_groups
            restore = (unpack_groups(blob) if blob else [], state.seen_group_ids)
            admission_state = state.admission
            replay_after = state.journal_seq
            log.info("rank %d resumed from %s at version %d (%d buffered group(s))", rank, resume, state.version,
                     len(restore[0]))
        self.service: Optional[TrajectoryService] = None
        self.publisher: Optional[WeightPublisher] = None
        self._endpoint: Optional[ZmqWeightPublisher] = None
        if rank == 0:
            self._ledger = Ledger(self.learner.ledger)
            # Before the endpoints serve: a reader rolls back what the previous process did after this version.
            self._ledger.write("open", version=self.version, resumed_from=str(resume) if resume else None,
                               restored=[g.group_id for g in restore[0]] if restore else [])
            endpoint = f"tcp://{self.learner.bind_host}:*"
            allow_remote = self.learner.bind_host not in ("127.0.0.1", "localhost", "::1")
            self.admission = AdmissionController(self.algo.groups_per_step, self.algo.max_staleness)
            if admission_state:
                self.admission.restore(admission_state)
            journal = None
            if self.learner.journal and self.learner.checkpoint_dir:
                journal = GroupJournal(os.path.join(self.learner.checkpoint_dir, "journal"))
            self.service = TrajectoryService(self.admission, self._validate, self.metrics, endpoint, allow_remote,
                                             restore=restore, version=self.version, journal=journal,
                                             replay_after=replay_after, token=token, ledger=self._ledger)
            self._endpoint = ZmqWeightPublisher(endpoint, self.learner.weight_bucket_mb, self.learner.publish_dtype,
                                                self.metrics, allow_remote, token=token)
            self.publisher = make_publisher(
                self.learner.weight_transport, self._endpoint, weight_dir=self.learner.weight_dir,
                keep=self.learner.weight_keep_versions, nccl_master_addr=self.learner.bind_host,
                nccl_master_port=self.learner.nccl_master_port, nccl_engine_ranks=self.learner.nccl_engine_ranks,
                device=device)

    # ------------------------------------------------------------------------------------------- public
    def endpoints(self) -> dict[str, str]:
        """Rank 0: {"trajectories", "weights", "weights_transport"} (+ "weights_dir" for fs); other ranks: {}."""
        if self.service is None or self._endpoint is None:
            return {}
        out = {"trajectories": self.service.endpoint, "weights": self._endpoint.endpoint,
               "weights_transport": self.learner.weight_transport}
        if self.learner.weight_transport == "fs":
            out["weights_dir"] = str(getattr(self.publisher, "directory", self.learner.weight_dir))
        return out

    def publish_initial(self) -> None:
        """Publish the loaded (or resumed) weights as the current version (collective)."""
        self._publish()

    def run(self, max_steps: int) -> None:
        """Train until `max_steps` steps are done or `stop()` is called (collective); then, with a checkpoint
        directory configured, write the final checkpoint (collective) before returning."""
        with self._lock:
            if self._closed:
                raise RuntimeError("LearnerRank was stopped; create a new one")
            self._running = True
        if self.service is not None:
            self.service.open_intake()
        finished = False  # the collectives are in step: a final checkpoint is safe to write
        try:
            for _ in range(max_steps):
                if not self._step():
                    break
            finished = True
        except StaleGroupError:  # raised on every rank at the same point
            finished = True
            raise
        finally:
            try:
                if finished and self.learner.checkpoint_dir:
                    self._checkpoint(final=True)
            finally:
                with self._lock:
                    self._running = False
                if self._stop.is_set():
                    self._close()

    def drain_metrics(self) -> list[dict[str, float]]:
        """Per-step metrics rows since the last call (rank 0; other ranks return [])."""
        with self._lock:
            rows, self._rows = self._rows, []
        return rows

    def trained_group_ids(self) -> list[str]:
        """Rank 0: ids of the groups trained by this process, in training order (the newest 100k)."""
        with self._lock:
            return list(self._trained_ids)

    def stop(self) -> None:
        """Stop granting admissions (replies carry stopping=True) and end `run` after the current step (it then
        writes the final checkpoint); sockets and the process group close when `run` returns (at once if it is not
        running). Does not block."""
        self._stop.set()
        if self.service is not None:
            self.service.stop_admissions()
        with self._lock:
            running = self._running
        if not running:
            self._close()

    # ------------------------------------------------------------------------------------------- the step
    def _step(self) -> bool:
        idle = IdleClock()  # rank 0: why this step waited for groups (learner/admission.py IDLE_CAUSES)
        start = time.perf_counter()
        status, groups, note = _GO, None, ""
        if self.rank == 0:
            try:
                groups = self._take_groups(idle)
            except StaleGroupError as exc:
                status, note = _STALE_ERROR, str(exc)
            if groups is None and status == _GO:
                status = _STOP
        waited = time.perf_counter() - start
        broadcast_start = time.perf_counter()
        status, groups = self._broadcast(status, groups)
        broadcast_s = time.perf_counter() - broadcast_start
        if status == _STALE_ERROR:
            raise StaleGroupError(note or "a stale group reached rank 0 (algo.stale_policy=error); see its log")
        if status == _STOP:
            return False
        train_start = time.perf_counter()
        updated = self.version
        samples = samples_from_groups(groups, self.algo)
        try:
            train = self.trainer.train_step(samples)
        except BatchError as exc:  # raised on every rank alike, so all ranks skip this batch together
            log.error("skipping a batch of groups %s: %s", [g.group_id for g in groups], exc)
            self.metrics.inc("batches_skipped")
            for group in groups:
                self._ledger.write("dropped", group_id=group.group_id, actor=group.actor_id, reason="batch_skipped",
                                   version=self.version)
            return True
        self.version += 1
        self.trained_count += len(groups)
        train_s = time.perf_counter() - train_start
        publish_s = self._publish()
        if self.rank == 0:
            with self._lock:
                self._trained_ids.extend(g.group_id for g in groups)
            for group in groups:  # before any checkpoint of this step: a line never lags the state it describes
                self._ledger.write("trained", group_id=group.group_id, actor=group.actor_id, version=updated,
                                   step=self.version)
            train["seq_tokens"] = float(sum(s.num_tokens for s in samples))
            train["loss_trajectories"] = float(len(samples))  # = trajectories − tool_failed_masked
            train["broadcast_s"] = broadcast_s
            self._record(groups, updated, train, waited, train_s, publish_s, idle)
        if self.learner.checkpoint_every and self.version % self.learner.checkpoint_every == 0:
            self._checkpoint(final=False)
        return True

    def _take_groups(self, idle: IdleClock) -> Optional[list[TrajectoryGroup]]:
        """groups_per_step groups within max_staleness of the current version, stale ones handled by
        algo.stale_policy and those left with too few episodes by a tool outage dropped (counted and logged, never
        silently); None once stop() was called."""
        assert self.service is not None
        chosen: list[TrajectoryGroup] = []
        need = self.algo.groups_per_step
        poll = min(IDLE_POLL_S, self.learner.take_timeout_s)
        while not self._stop.is_set():
            cause = idle_cause(self.admission.capacity(self.version), self.admission.running,
                               self.service.retry_pending())
            started = time.perf_counter()
            got = self.service.take(need - len(chosen), poll)
            idle.add(cause, time.perf_counter() - started)
            if not got:
                continue
            stale = split_stale(got, self.version, self.algo.max_staleness)[1]
            self.metrics.inc("stale_groups", len(stale))
            try:
                keep, dropped = apply_stale_policy(got, self.version, self.algo.max_staleness, self.algo.stale_policy)
            except StaleGroupError:
                self.service.requeue(chosen + got)  # kept for the checkpoint a restart would resume from
                raise
            if dropped:
                self.metrics.inc("stale_groups_dropped", len(dropped))
                for group in dropped:
                    self.admission.on_group_dropped()
                    self._ledger.write("dropped", group_id=group.group_id, actor=group.actor_id, reason="stale",
                                       version=self.version)
                log.warning("dropped %d group(s) beyond max_staleness=%d at version %d: %s", len(dropped),
                            self.algo.max_staleness, self.version, [g.group_id for g in dropped])
            elif stale:
                self.metrics.inc("stale_groups_trained", len(stale))
                log.warning("training %d group(s) beyond max_staleness=%d at version %d: %s", len(stale),
                            self.algo.max_staleness, self.version, [g.group_id for g in stale])
            self.metrics.inc("tool_failed_episodes", sum(len(g.trajectories) - len(scored(g)) for g in got))
            keep, outage = split_tool_failed(keep)
            if outage:
                self.metrics.inc("tool_failed_groups_dropped", len(outage))
                for group in outage:
                    self.admission.on_group_dropped()
                    self._ledger.write("dropped", group_id=group.group_id, actor=group.actor_id, reason="tool_failed",
                                       version=self.version)
                log.warning("dropped %d group(s) whose episodes a tool outage cut short (fewer than %d left): %s",
                            len(outage), MIN_SCORED_EPISODES, [g.group_id for g in outage])
            chosen += keep
            if len(chosen) == need:
                return chosen
        self.service.requeue(chosen)  # stopping: untrained groups go back for the final checkpoint
        return None

    def _broadcast(self, status: int, groups: Optional[list[TrajectoryGroup]]
                   ) -> tuple[int, Optional[list[TrajectoryGroup]]]:
        """Rank 0's status and groups to every rank, as our own msgpack bytes (never pickle)."""
        if self.world_size == 1:
            return status, groups
        blob = pack_groups(groups) if self.rank == 0 and status == _GO and groups is not None else b""
        header = torch.tensor([len(blob), status], dtype=torch.int64, device=self.device)
        dist.broadcast(header, src=0)
        size, status = (int(x) for x in header.tolist())
        if status != _GO:
            return status, None
        if self.rank == 0:
            payload = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(self.device)
        else:
            payload = torch.empty(size, dtype=torch.uint8, device=self.device)
        dist.broadcast(payload, src=0)
        return status, groups if self.rank == 0 else unpack_groups(payload.cpu().numpy().tobytes())

    def _publish(self) -> float:
        """Gather the full weights on rank 0 and publish them as `self.version`; returns seconds spent."""
        start = time.perf_counter()
        state = gather_full_state_dict(self.trainer.model)
        if self.publisher is not None:
            self.publisher.publish(self.version, to_checkpoint_names(self.trainer.model, state))
            self.service.set_version(self.version)
        elapsed = time.perf_counter() - start
        self.metrics.observe("publish_s", elapsed)
        return elapsed

    def _checkpoint(self, final: bool) -> None:
        """Collective. The final one closes the intake first, so every acked group is either trained or saved."""
        start = time.perf_counter()
        state, blob = None, None
        if self.service is not None:
            if final:
                self.service.close_intake()
            groups, seen, admission, journal_seq = self.service.snapshot()
            state = LearnerState(version=self.version, steps=self.trainer.steps, admission=admission,
                                 seen_group_ids=seen, trained_groups=self.trained_count, world_size=self.world_size,
                                 journal_seq=journal_seq)
            blob = pack_groups(groups)
        path = self.trainer.save(self.learner.checkpoint_dir, self.version, state, blob, self.learner.checkpoint_keep)
        if self.service is not None and state is not None:
            self.service.checkpointed(state.journal_seq)  # the checkpoint is complete (renamed): entries can go
            self._ledger.write("checkpoint", version=self.version, final=final, path=str(path),
                               buffered=[g.group_id for g in groups])
        self.metrics.inc("checkpoints_written")
        self.metrics.observe("checkpoint_s", time.perf_counter() - start)
        if self.rank == 0:
            log.info("%s checkpoint at version %d: %s (%d buffered group(s))", "final" if final else "periodic",
                     self.version, path, len(groups))

    def _validate(self, group: TrajectoryGroup, version: int) -> None:
        validate_group(group, vocab_size=self.trainer.vocab_size, image_token_id=self.trainer.image_token_id,
                       max_version=version, max_image_pixels=self.learner.max_image_pixels)

    def _record(self, groups: list[TrajectoryGroup], updated: int, train: dict[str, float], waited: float,
                train_s: float, publish_s: float, idle: IdleClock) -> None:
        assert self.service is not None
        row: dict[str, float] = {"step": float(self.version), "policy_version": float(self.version)}
        row.update(batch_stats(groups, updated, self.algo.max_staleness))
        row.update(train)
        total = waited + train_s + publish_s
        row.update({
            "learner_idle_s": waited,
            "learner_idle_frac": waited / total if total > 0 else 0.0,
            **idle.row(),
            **{f"learner_idle_{cause}_frac": seconds / total if total > 0 else 0.0
               for cause, seconds in idle.seconds.items()},
            "step_time_s": train_s,
            "publish_s": publish_s,
            "tokens_per_s": train["seq_tokens"] / train_s if train_s > 0 else 0.0,
            "pad_frac": 1.0 - train["seq_tokens"] / train["model_tokens"] if train["model_tokens"] else 0.0,
            "buffered_groups": float(self.service.buffered()),
            "admission_running": float(self.admission.running),
            "admission_accepted": float(self.admission.accepted),
            "trained_groups": float(self.trained_count),
        })
        snapshot = self.metrics.snapshot()
        for name in _COUNTERS:
            row[name] = snapshot.get(name, 0.0)
        with self._lock:
            self._rows.append(row)
        log.info("step %d: loss %.4f reward %.3f staleness %.2f idle %.0f%% step %.2fs publish %.2fs",
                 int(row["step"]), row["loss"], row["reward_mean"], row["staleness_mean"],
                 100 * row["learner_idle_frac"], train_s, publish_s)

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.service is not None:
            self.service.close()
        if self.publisher is not None:
            self.publisher.close()
        self._ledger.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def learner_token(learner: LearnerConfig) -> Optional[str]:
    """The endpoints' shared token from the environment variable `learner.token_env` names (None when it names
    none); a named variable that is unset or empty is a ValueError naming it."""
    return token_from_env(learner.token_env, "learner.token_env")


def rank_device(learner: LearnerConfig, rank: int) -> torch.device:
    """CPU for gloo; for nccl the rank's GPU ($LOCAL_RANK, else rank modulo the visible GPUs), made current."""
    if learner.backend != "nccl":
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    torch.cuda.set_device(device)
    return device


def join_world(learner: LearnerConfig, master_addr: str, master_port: int, rank: int, world_size: int) -> None:
    """Initialise the default process group through a TCPStore that rank 0 serves on `master_addr` only.

    torch's TCPStore binds every interface unless handed a listening socket, so rank 0 binds one itself and hands
    its descriptor over (the store closes it). On a loopback master, gloo is pinned to `lo` too."""
    timeout = timedelta(seconds=learner.collective_timeout_s)
    if learner.backend == "gloo" and is_loopback_endpoint(f"tcp://{master_addr}:{master_port}"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    listen = None
    if rank == 0:
        family = socket.AF_INET6 if ":" in master_addr else socket.AF_INET
        listen = socket.socket(family, socket.SOCK_STREAM)
        listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listen.bind((master_addr, master_port))
            listen.listen(128)
        except OSError as exc:
            listen.close()
            raise OSError(f"learner rank 0 cannot listen on {master_addr}:{master_port}: {exc}") from exc
    try:
        store = dist.TCPStore(master_addr, master_port, world_size, rank == 0, timeout,
                              master_listen_fd=listen.fileno() if listen is not None else None)
    except BaseException:
        if listen is not None:
            listen.close()
        raise
    if listen is not None:
        # The store owns the descriptor from here on and closes it when it is destroyed; closing it from Python as
        # well would close whatever file reused that number meanwhile (seen: a later open() failing with EBADF).
        listen.detach()
    dist.init_process_group(learner.backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
