"""The learner role: one `LearnerRank` per FSDP2 rank. Rank 0 also serves actors (admissions, groups) and weights.

Loop per step:  rank 0 takes groups_per_step groups → broadcasts them (msgpack bytes in a uint8 tensor) → every
rank trains its share → optimiser step → version += 1 → weights gathered and published by rank 0 → metrics row.
A plain class: the launcher wraps it as a Ray actor with max_concurrency >= 2 so `drain_metrics`/`stop` can be
called while `run` blocks. `publish_initial` and `run` are collectives: call them on every rank.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from learner.admission import AdmissionController
from learner.batch import batch_stats, pack_groups, samples_from_groups, unpack_groups, validate_group
from learner.config import AlgoConfig, LearnerConfig
from learner.service import TrajectoryService
from learner.trainer import BatchError, Trainer
from learner.weights import ZmqWeightPublisher, gather_full_state_dict, to_checkpoint_names
from protocol import TrajectoryGroup
from protocol.metrics import Metrics
from protocol.sockets import is_loopback_endpoint

log = logging.getLogger(__name__)


class LearnerRank:
    """One rank of the learner world. `cfg` = {"learner": {...}, "algo": {...}} (see conf/learner, conf/algo)."""

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, model_path: str,
                 cfg: dict[str, Any]) -> None:
        self.learner = LearnerConfig.from_dict(cfg.get("learner"))
        self.algo = AlgoConfig.from_dict(cfg.get("algo"))
        if world_size != self.learner.world_size:
            raise ValueError(f"world_size={world_size} but learner.world_size={self.learner.world_size}")
        torch.set_num_threads(self.learner.threads)
        self.rank, self.world_size = rank, world_size
        device = torch.device("cpu")
        if self.learner.backend == "nccl":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
            torch.cuda.set_device(device)
        self._listen_socket = join_world(self.learner, master_addr, master_port, rank, world_size)
        self.trainer = Trainer(model_path, self.learner, self.algo, device)
        self.device = device
        self.version = 0
        self._lock = threading.Lock()
        self._rows: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._running = False
        self._closed = False
        self.metrics = Metrics()
        self.service: Optional[TrajectoryService] = None
        self.publisher: Optional[ZmqWeightPublisher] = None
        if rank == 0:
            endpoint = f"tcp://{self.learner.bind_host}:*"
            allow_remote = self.learner.bind_host not in ("127.0.0.1", "localhost", "::1")
            self.admission = AdmissionController(self.algo.groups_per_step, self.algo.max_staleness)
            self.service = TrajectoryService(self.admission, self._validate, self.metrics, endpoint, allow_remote)
            self.publisher = ZmqWeightPublisher(endpoint, self.learner.weight_bucket_mb, self.learner.publish_dtype,
                                                self.metrics, allow_remote)

    # ------------------------------------------------------------------------------------------- public
    def endpoints(self) -> dict[str, str]:
        """Rank 0: {"trajectories": ..., "weights": ...}; other ranks: {}."""
        if self.service is None or self.publisher is None:
            return {}
        return {"trajectories": self.service.endpoint, "weights": self.publisher.endpoint}

    def publish_initial(self) -> None:
        """Publish the loaded weights as version 0 (collective)."""
        self._publish()

    def run(self, max_steps: int) -> None:
        """Train until `max_steps` steps are done or `stop()` is called (collective)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("LearnerRank was stopped; create a new one")
            self._running = True
        try:
            for _ in range(max_steps):
                if not self._step():
                    break
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

    def stop(self) -> None:
        """Stop granting admissions (replies carry stopping=True) and end `run` after the current step; sockets
        and the process group close when `run` returns (at once if it is not running). Does not block."""
        self._stop.set()
        if self.service is not None:
            self.service.stop_admissions()
        with self._lock:
            running = self._running
        if not running:
            self._close()

    # ------------------------------------------------------------------------------------------- the step
    def _step(self) -> bool:
        start = time.perf_counter()
        groups = self._take_groups() if self.rank == 0 else None
        waited = time.perf_counter() - start
        groups = self._broadcast(groups)
        if groups is None:
            return False
        train_start = time.perf_counter()
        updated = self.version
        samples = samples_from_groups(groups, self.algo)
        try:
            train = self.trainer.train_step(samples)
        except BatchError as exc:  # raised on every rank alike, so all ranks skip this batch together
            log.error("skipping a batch of groups %s: %s", [g.group_id for g in groups], exc)
            self.metrics.inc("batches_skipped")
            return True
        self.version += 1
        train_s = time.perf_counter() - train_start
        publish_s = self._publish()
        if self.rank == 0:
            self._record(groups, updated, train, waited, train_s, publish_s)
        return True

    def _take_groups(self) -> Optional[list[TrajectoryGroup]]:
        assert self.service is not None
        while not self._stop.is_set():
            groups = self.service.take(self.algo.groups_per_step, self.learner.take_timeout_s)
            if groups:
                return groups
        return None

    def _broadcast(self, groups: Optional[list[TrajectoryGroup]]) -> Optional[list[TrajectoryGroup]]:
        """Rank 0's groups to every rank as our own msgpack bytes (never pickle); None means stop."""
        if self.world_size == 1:
            return groups
        blob = pack_groups(groups) if self.rank == 0 and groups is not None else b""
        header = torch.tensor([len(blob), int(groups is not None)], dtype=torch.int64, device=self.device)
        dist.broadcast(header, src=0)
        size, go = (int(x) for x in header.tolist())
        if not go:
            return None
        if self.rank == 0:
            payload = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(self.device)
        else:
            payload = torch.empty(size, dtype=torch.uint8, device=self.device)
        dist.broadcast(payload, src=0)
        return groups if self.rank == 0 else unpack_groups(payload.cpu().numpy().tobytes())

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

    def _validate(self, group: TrajectoryGroup, version: int) -> None:
        validate_group(group, vocab_size=self.trainer.vocab_size, image_token_id=self.trainer.image_token_id,
                       max_version=version, max_image_pixels=self.learner.max_image_pixels)

    def _record(self, groups: list[TrajectoryGroup], updated: int, train: dict[str, float], waited: float,
                train_s: float, publish_s: float) -> None:
        assert self.service is not None
        row: dict[str, float] = {"step": float(self.version), "policy_version": float(self.version)}
        row.update(batch_stats(groups, updated))
        row.update(train)
        total = waited + train_s + publish_s
        row.update({
            "learner_idle_s": waited,
            "learner_idle_frac": waited / total if total > 0 else 0.0,
            "step_time_s": train_s,
            "publish_s": publish_s,
            "buffered_groups": float(self.service.buffered()),
            "admission_running": float(self.admission.running),
            "admission_accepted": float(self.admission.accepted),
        })
        snapshot = self.metrics.snapshot()
        for name in ("groups_received", "groups_duplicate", "groups_rejected", "bad_frames", "admissions_granted",
                     "admissions_denied", "weights_served", "weights_bad_frames", "batches_skipped"):
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
        if dist.is_initialized():
            dist.destroy_process_group()
        if self._listen_socket is not None:
            self._listen_socket.close()


def join_world(learner: LearnerConfig, master_addr: str, master_port: int, rank: int,
                world_size: int) -> Optional[socket.socket]:
    """Initialise the default process group through a TCPStore that rank 0 serves on `master_addr` only.

    torch's TCPStore binds every interface unless handed a listening socket, so rank 0 binds one itself (and
    returns it: it must stay open while the store lives). On a loopback master, gloo is pinned to `lo` too."""
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
    store = dist.TCPStore(master_addr, master_port, world_size, rank == 0, timeout,
                          master_listen_fd=listen.fileno() if listen is not None else None)
    dist.init_process_group(learner.backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return listen
