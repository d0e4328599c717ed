"""Weights out of the learner: gather the FSDP2 shards on rank 0, rename to HF checkpoint naming, cut into
versioned `WeightBucket`s and serve them behind a tiny swappable `WeightPublisher` interface (zmq for now;
nccl and fs transports implement the same two methods).

Checkpoint naming is what `save_pretrained` writes into model.safetensors: transformers 5 loads Qwen-VL
checkpoints (`model.layers.*`, `visual.*`) into renamed modules (`model.language_model.layers.*`,
`model.visual.*`) and reverts the renaming on save, and tied weights (`lm_head.weight` when the embeddings are
tied) are not written. Engines load checkpoint names, so that is what we publish.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Mapping, Optional, Protocol

import numpy as np
import torch
from torch import nn

from protocol import (
    ErrorReply,
    NamedArray,
    NDArray,
    ProtocolError,
    WeightBucket,
    WeightNone,
    WeightQuery,
    decode,
    encode,
    from_ndarray,
    to_ndarray,
)
from protocol.codec import DEFAULT_MAX_FRAME_BYTES
from protocol.metrics import Metrics
from learner.router import RouterThread

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class WeightPublisher(Protocol):
    """Makes a version's full state dict (checkpoint naming, CPU tensors) available to the engines."""

    def publish(self, version: int, state_dict: Mapping[str, torch.Tensor]) -> None: ...

    def close(self) -> None: ...


# ------------------------------------------------------------------------------------------ gather and rename

def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective over the FSDP2 world: every rank must call it. Rank 0 gets full CPU tensors, others `{}`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def to_checkpoint_names(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module names -> the names `save_pretrained` writes (tied copies dropped, load-time renamings reverted)."""
    from transformers.core_model_loading import revert_weight_conversion

    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    kept = {name: tensor for name, tensor in state_dict.items() if name not in tied}
    return dict(revert_weight_conversion(model, kept))


# ------------------------------------------------------------------------------------------------------ buckets

def tensor_to_wire(tensor: torch.Tensor, dtype: str = "float32") -> NDArray:
    """A CPU tensor as an NDArray; floating tensors are cast to `dtype` (bf16 travels as raw uint16 bits)."""
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
        tensor = tensor.to(_TORCH_DTYPES[dtype])
    tensor = tensor.contiguous()
    if tensor.dtype == torch.bfloat16:
        return to_ndarray(tensor.view(torch.uint16).numpy(), dtype="bfloat16")
    return to_ndarray(tensor.numpy())


def make_buckets(version: int, state_dict: Mapping[str, torch.Tensor], bucket_bytes: int,
                 dtype: str = "float32") -> list[WeightBucket]:
    """Cut a state dict (sorted by name) into buckets of at most `bucket_bytes` (a bigger tensor rides alone)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    groups: list[list[NamedArray]] = []
    size = 0
    for name in sorted(state_dict):
        named = NamedArray(name=name, array=tensor_to_wire(state_dict[name], dtype))
        nbytes = len(named.array.data)
        if not groups or (size + nbytes > bucket_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(named)
        size += nbytes
    return [WeightBucket(version=version, index=i, num_buckets=len(groups), tensors=g) for i, g in enumerate(groups)]


def buckets_to_state_dict(buckets: list[WeightBucket]) -> tuple[int, dict[str, torch.Tensor]]:
    """Reassemble one version from its buckets (any order). Raises ValueError on a missing, mixed or repeated part."""
    if not buckets:
        raise ValueError("no weight buckets")
    version, count = buckets[0].version, buckets[0].num_buckets
    indices = sorted(b.index for b in buckets)
    if any(b.version != version or b.num_buckets != count for b in buckets) or indices != list(range(count)):
        raise ValueError(
            f"inconsistent buckets: versions {sorted({b.version for b in buckets})}, counts "
            f"{sorted({b.num_buckets for b in buckets})}, indices {indices}"
        )
    state: dict[str, torch.Tensor] = {}
    for bucket in buckets:
        for named in bucket.tensors:
            array = np.array(from_ndarray(named.array, what=named.name))  # copy: the frame is read-only
            tensor = torch.from_numpy(array)
            state[named.name] = tensor.view(torch.bfloat16) if named.array.dtype == "bfloat16" else tensor
    return version, state


# ------------------------------------------------------------------------------------------------ zmq transport

class ZmqWeightPublisher:
    """A ROUTER answering `WeightQuery(have_version)` with every bucket of the latest version when it is newer,
    else `WeightNone(latest)`. Buckets are encoded once per publish; serving only sends bytes."""

    def __init__(self, endpoint: str = "tcp://127.0.0.1:*", bucket_mb: float = 64.0, dtype: str = "float32",
                 metrics: Optional[Metrics] = None, allow_remote: bool = False,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if dtype not in _TORCH_DTYPES:
            raise ValueError(f"publish dtype {dtype!r} not in {sorted(_TORCH_DTYPES)}")
        self.bucket_bytes = max(1, int(bucket_mb * 1024 * 1024))
        self.dtype = dtype
        self.metrics = metrics or Metrics()
        self.max_frame_bytes = max_frame_bytes
        self._lock = threading.Lock()
        self._latest: tuple[int, list[bytes]] = (-1, [])
        self._router = RouterThread("weights", self._handle, endpoint, allow_remote=allow_remote)
        self.endpoint = self._router.endpoint

    @property
    def version(self) -> int:
        with self._lock:
            return self._latest[0]

    def publish(self, version: int, state_dict: Mapping[str, torch.Tensor]) -> None:
        start = time.perf_counter()
        with self._lock:
            if version <= self._latest[0]:
                raise ValueError(f"weights version {version} is not newer than the published {self._latest[0]}")
        frames = [encode(b) for b in make_buckets(version, state_dict, self.bucket_bytes, self.dtype)]
        too_big = [len(f) for f in frames if len(f) > self.max_frame_bytes]
        if too_big:
            # TODO(transport): split single tensors larger than a frame (a 7B model's embedding in bf16 is ~1 GB).
            raise ValueError(f"weight bucket frames of {too_big} bytes exceed the {self.max_frame_bytes}-byte limit")
        with self._lock:
            self._latest = (version, frames)
        self.metrics.observe("weights_encode_s", time.perf_counter() - start)
        self.metrics.set("weights_version", version)
        self.metrics.set("weights_bytes", sum(len(f) for f in frames))
        log.info("published weights version %d: %d bucket(s), %d bytes", version, len(frames),
                 sum(len(f) for f in frames))

    def _handle(self, payload: bytes) -> list[bytes]:
        try:
            query = decode(payload, WeightQuery)
        except ProtocolError as exc:
            self.metrics.inc("weights_bad_frames")
            log.warning("weights endpoint: %s", exc)
            return [encode(ErrorReply(code="bad_request", message=str(exc)))]
        with self._lock:
            version, frames = self._latest
        if version > query.have_version:
            self.metrics.inc("weights_served")
            return list(frames)
        return [encode(WeightNone(version=version))]

    def close(self) -> None:
        self._router.close()
