"""The nccl weight transport (GPU clusters): learner rank 0 is rank 0 of an NCCL group whose other ranks are the
inference engines' workers, formed with vLLM's stateless process group; each version is broadcast in vLLM's packed
format so that the actor side is vLLM's stock weight-transfer API (vllm 0.32, `weight_transfer_config` backend
"nccl"), with no custom worker code.

Protocol (control on rank 0's weights ROUTER, data over NCCL):
  1. An actor sends WeightQuery(actor_id, have_version). When the version being broadcast is newer, it gets
     WeightAnnounce(version, transport="nccl", init={master_address, master_port, world_size, rank_offset, packed,
     packed_buffer_size_bytes, packed_num_buffers}, names, dtype_names, shapes). rank_offset is assigned per
     actor_id in the order actors first ask (1, 1 + ranks_per_engine, ...).
  2. First announcement only: the actor calls `engine.init_weight_transfer_engine(WeightTransferInitRequest(
     init_info=init))`; it returns once every engine worker and the learner joined (TCPStore rendezvous).
  3. Each announcement: `pause_generation` → `start_weight_update()` → `update_weights(WeightTransferUpdateRequest(
     update_info={names, dtype_names, shapes}))` (blocks in the broadcast) → `finish_weight_update(str(version))`
     → `resume_generation()`.
The learner's sender thread opens the group (step 2's other side), then broadcasts each published version; the
announced version changes only after a broadcast completed on every rank, so all engines always join the same
broadcast. Versions published while a broadcast runs are coalesced (only the newest is sent; counted in
`weights_versions_skipped`). A broadcast waits for every engine: an engine that stops polling stalls publishing
(not training) until NCCL's timeout — the cost of a fixed-membership collective.

Without GPUs only the control flow is testable: `open_group` and `send` are injectable (tests pass fakes).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Optional

import torch

from learner.weight_transport import WeightEndpoint, cast_for_publish
from protocol import ErrorReply, WeightAnnounce, WeightNone, WeightQuery, encode
from protocol.sockets import free_port

log = logging.getLogger(__name__)

# (master_address, master_port, world_size) -> the trainer's communicator (rank 0)
OpenGroup = Callable[[str, int, int], Any]
# (communicator, iterator of (name, tensor) in announcement order, buffer bytes, number of buffers) -> None
Send = Callable[[Any, Iterator[tuple[str, torch.Tensor]], int, int], None]

DEFAULT_NUM_BUFFERS = 2


def vllm_open_group(master_address: str, master_port: int, world_size: int) -> Any:
    """Rank 0 of vLLM's stateless NCCL group (blocks until all `world_size` ranks joined)."""
    from vllm.distributed.weight_transfer.nccl_common import trainer_init

    return trainer_init({"master_address": master_address, "master_port": master_port, "world_size": world_size})


def vllm_packed_send(group: Any, items: Iterator[tuple[str, torch.Tensor]], buffer_bytes: int,
                     num_buffers: int) -> None:
    """vLLM's packed broadcast producer: tensors are copied to the GPU, packed into uint8 buffers and broadcast."""
    from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

    device = torch.device("cuda", torch.cuda.current_device())
    packed_nccl_broadcast_producer(iterator=items, group=group, src=0,
                                   post_iter_func=lambda item: item[1].to(device, non_blocking=True),
                                   buffer_size_bytes=buffer_bytes, num_buffers=num_buffers)
    torch.cuda.current_stream().synchronize()


def update_info(state: Mapping[str, torch.Tensor]) -> dict[str, list]:
    """vLLM's NCCLWeightTransferUpdateInfo fields for `state`, in broadcast (sorted-name) order."""
    names = sorted(state)
    return {
        "names": names,
        "dtype_names": [str(state[n].dtype).removeprefix("torch.") for n in names],
        "shapes": [list(state[n].shape) for n in names],
    }


class NcclWeightPublisher:
    """`publish` hands a version to the sender thread and returns; the thread broadcasts it (see module doc)."""

    def __init__(self, endpoint: WeightEndpoint, master_address: str, master_port: int, engine_ranks: int,
                 ranks_per_engine: int = 1, bucket_bytes: int = 1 << 30, dtype: str = "bfloat16",
                 device: Optional[torch.device] = None, open_group: OpenGroup = vllm_open_group,
                 send: Send = vllm_packed_send, num_buffers: int = DEFAULT_NUM_BUFFERS) -> None:
        if engine_ranks < 1 or ranks_per_engine < 1 or engine_ranks % ranks_per_engine:
            raise ValueError(f"need engine_ranks >= 1 divisible by ranks_per_engine >= 1; got {engine_ranks}, "
                             f"{ranks_per_engine}")
        if master_port == 0:
            master_port = free_port(master_address)
        self.endpoint, self.metrics = endpoint, endpoint.metrics
        self.init = {"master_address": master_address, "master_port": master_port, "world_size": engine_ranks + 1,
                     "packed": True, "packed_buffer_size_bytes": bucket_bytes, "packed_num_buffers": num_buffers}
        self.ranks_per_engine, self.engines = ranks_per_engine, engine_ranks // ranks_per_engine
        self.dtype, self.device = dtype, device
        self._open_group, self._send = open_group, send
        self._cond = threading.Condition()
        self._pending: Optional[tuple[int, dict[str, torch.Tensor]]] = None
        self._announced: Optional[tuple[int, dict[str, list]]] = None
        self._published = -1
        self._sent = -1
        self._offsets: dict[str, int] = {}
        self._closed = False
        self.error: Optional[BaseException] = None
        endpoint.query_hook = self._answer
        self._thread = threading.Thread(target=self._run, name="learner-nccl-sender", daemon=True)
        self._thread.start()

    @property
    def version(self) -> int:
        """The newest version fully broadcast to every engine."""
        with self._cond:
            return self._sent

    def publish(self, version: int, state_dict: Mapping[str, torch.Tensor]) -> None:
        with self._cond:
            if self.error is not None:
                raise RuntimeError(f"nccl weight sender failed earlier: {self.error!r}") from self.error
            if version <= self._published:
                raise ValueError(f"weights version {version} is not newer than the published {self._published}")
            if self._pending is not None:
                self.metrics.inc("weights_versions_skipped")
            state = {k: cast_for_publish(v, self.dtype) for k, v in state_dict.items()}
            self._pending, self._published = (version, state), version
            self._cond.notify_all()

    def wait_sent(self, version: int, timeout: float) -> bool:
        """Block until `version` (or a newer one) reached every engine; False on timeout or after a failure."""
        with self._cond:
            return self._cond.wait_for(lambda: self._sent >= version or self.error is not None or self._closed,
                                       timeout) and self._sent >= version

    def _answer(self, query: WeightQuery) -> list[bytes]:
        with self._cond:
            announced = self._announced
            if announced is None or announced[0] <= query.have_version:
                return [encode(WeightNone(version=self._sent))]
            if query.actor_id not in self._offsets:
                if len(self._offsets) >= self.engines:
                    self.metrics.inc("weights_nccl_refused")
                    return [encode(ErrorReply(code="overloaded", message=(
                        f"nccl weight group is full: {self.engines} engine(s) of {self.ranks_per_engine} rank(s) "
                        f"already joined ({sorted(self._offsets)}); {query.actor_id!r} cannot")))]
                self._offsets[query.actor_id] = 1 + len(self._offsets) * self.ranks_per_engine
            init = dict(self.init, rank_offset=self._offsets[query.actor_id])
        version, info = announced
        self.metrics.inc("weights_served")
        return [encode(WeightAnnounce(version=version, transport="nccl", init=init, **info))]

    def _run(self) -> None:
        try:
            if self.device is not None and self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            group = None
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._pending is not None or self._closed)
                    if self._closed:
                        return
                    version, state = self._pending
                    self._pending = None
                    self._announced = (version, update_info(state))
                if group is None:  # the first announcement tells the engines how to join
                    start = time.perf_counter()
                    group = self._open_group(self.init["master_address"], self.init["master_port"],
                                             self.init["world_size"])
                    self.metrics.observe("weights_nccl_join_s", time.perf_counter() - start)
                start = time.perf_counter()
                names = self._announced[1]["names"]
                self._send(group, ((n, state[n]) for n in names), self.init["packed_buffer_size_bytes"],
                           self.init["packed_num_buffers"])
                with self._cond:
                    self._sent = version
                    self._cond.notify_all()
                self.metrics.observe("weights_broadcast_s", time.perf_counter() - start)
                self.metrics.set("weights_version", version)
                log.info("broadcast weights version %d to %d engine(s)", version, self.engines)
        except BaseException as exc:  # surfaced to the training loop at the next publish
            log.exception("nccl weight sender failed")
            with self._cond:
                self.error = exc
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5.0)
        self.endpoint.query_hook = None
        self.endpoint.close()

