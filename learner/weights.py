"""Weights out of the learner: gather the FSDP2 shards on rank 0, rename to HF checkpoint naming, and publish each
version through a swappable transport behind one interface (learner/weight_transport.py: `WeightPublisher.publish(
version, state)`, `close()`):

    zmq   (default) versioned `WeightBucket`s served on rank 0's weights ROUTER; tensors larger than a bucket travel
          as row chunks (`NamedArray.row_offset/total_rows`), so no single message exceeds the bucket size
    fs    safetensors files + an atomically replaced manifest in a shared directory (format: protocol/weights.py)
    nccl  a broadcast from learner rank 0 to the engines' workers through vLLM's stateless process group
          (learner/weights_nccl.py)
Whatever the transport, the weights ROUTER answers `WeightQuery`: zmq with the buckets, fs and nccl with a
`WeightAnnounce` saying where/how to get the version; so actors always poll one endpoint.

Checkpoint naming is what `save_pretrained` writes into model.safetensors: transformers 5 loads Qwen-VL
checkpoints (`model.layers.*`, `visual.*`) into renamed modules (`model.language_model.layers.*`,
`model.visual.*`) and reverts the renaming on save, and tied weights (`lm_head.weight` when the embeddings are
tied) are not written. Engines load checkpoint names, so that is what we publish.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

from learner.router import RouterThread, worth_logging
from learner.weight_transport import (
    TORCH_DTYPES, QueryHook, WeightEndpoint, WeightPublisher, cast_for_publish,
)
from protocol import (
    ErrorReply,
    NamedArray,
    NDArray,
    ProtocolError,
    WeightAnnounce,
    WeightBucket,
    WeightNone,
    WeightQuery,
    decode,
    encode,
    to_ndarray,
)
from protocol.codec import DEFAULT_MAX_FRAME_BYTES
from protocol.metrics import Metrics
from protocol.weights import FsManifest, write_fs_manifest

log = logging.getLogger(__name__)

# Room for msgpack framing and names around a bucket's raw bytes when checking it fits in one frame.
FRAME_OVERHEAD_BYTES = 1 << 20


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
    tensor = cast_for_publish(tensor, dtype)
    if tensor.dtype == torch.bfloat16:
        return to_ndarray(tensor.view(torch.uint16).numpy(), dtype="bfloat16")
    return to_ndarray(tensor.numpy())


def make_buckets(version: int, state_dict: Mapping[str, torch.Tensor], bucket_bytes: int,
                 dtype: str = "float32") -> list[WeightBucket]:
    """Cut a state dict (sorted by name) into buckets of at most `bucket_bytes` of tensor data.

    Whole tensors are packed greedily in name order; a tensor larger than `bucket_bytes` is split along dim 0 into
    chunks of as many rows as fit (at least one row), each chunk in its own bucket. Only a single row (or a 0-d
    tensor) larger than `bucket_bytes` makes a bucket exceed it."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    groups: list[list[NamedArray]] = [[]]
    size = 0
    for name in sorted(state_dict):
        tensor = cast_for_publish(state_dict[name], dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes <= bucket_bytes or tensor.dim() == 0 or tensor.shape[0] <= 1:
            if size + nbytes > bucket_bytes and groups[-1]:
                groups.append([])
                size = 0
            groups[-1].append(NamedArray(name=name, array=tensor_to_wire(tensor, dtype)))
            size += nbytes
            continue
        rows = tensor.shape[0]
        row_bytes = nbytes // rows
        per_chunk = max(1, bucket_bytes // max(row_bytes, 1))
        for start in range(0, rows, per_chunk):
            if groups[-1]:
                groups.append([])
            chunk = tensor[start: start + per_chunk]
            groups[-1].append(NamedArray(name=name, array=tensor_to_wire(chunk, dtype), row_offset=start,
                                         total_rows=rows))
            size = chunk.numel() * chunk.element_size()
    groups = [g for g in groups if g]
    return [WeightBucket(version=version, index=i, num_buckets=len(groups), tensors=g) for i, g in enumerate(groups)]


# --------------------------------------------------------------------------------------- the weights endpoint

# Inbound frames on the weights endpoint are WeightQuery messages (~100 bytes): anything far bigger is never read.
MAX_QUERY_BYTES = 64 * 1024


class ZmqWeightPublisher:
    """Rank 0's weights ROUTER and the zmq transport: answers `WeightQuery(have_version)` with the frames posted for
    the latest version when it is newer (every bucket for zmq; one WeightAnnounce for fs), else `WeightNone(latest)`.
    Frames are encoded once per publish; serving only sends bytes. `max_frame_bytes` bounds the frames it sends;
    inbound frames are bounded by MAX_QUERY_BYTES. `token`: the shared secret every query must carry (required to
    bind beyond loopback)."""

    def __init__(self, endpoint: str = "tcp://127.0.0.1:*", bucket_mb: float = 64.0, dtype: str = "float32",
                 metrics: Optional[Metrics] = None, allow_remote: bool = False,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, *, token: Optional[str] = None) -> None:
        if dtype not in TORCH_DTYPES:
            raise ValueError(f"publish dtype {dtype!r} not in {sorted(TORCH_DTYPES)}")
        self.bucket_bytes = max(1, int(bucket_mb * 1024 * 1024))
        if self.bucket_bytes + FRAME_OVERHEAD_BYTES > max_frame_bytes:
            raise ValueError(f"weight buckets of {self.bucket_bytes} bytes cannot fit the {max_frame_bytes}-byte "
                             f"frame limit (keep learner.weight_bucket_mb below {max_frame_bytes >> 20} - 1)")
        self.dtype = dtype
        self.metrics = metrics or Metrics()
        self.max_frame_bytes = max_frame_bytes
        self.query_hook: Optional[QueryHook] = None
        self._lock = threading.Lock()
        self._latest: tuple[int, list[bytes]] = (-1, [])
        self._router = RouterThread("weights", self._handle, endpoint, allow_remote=allow_remote, token=token,
                                    metrics=self.metrics, max_frame_bytes=MAX_QUERY_BYTES)
        self.endpoint = self._router.endpoint

    @property
    def version(self) -> int:
        with self._lock:
            return self._latest[0]

    def publish(self, version: int, state_dict: Mapping[str, torch.Tensor]) -> None:
        start = time.perf_counter()
        self._check_newer(version)
        frames = [encode(b) for b in make_buckets(version, state_dict, self.bucket_bytes, self.dtype)]
        too_big = [len(f) for f in frames if len(f) > self.max_frame_bytes]
        if too_big:  # only a single row larger than a frame gets here
            raise ValueError(f"weight bucket frames of {too_big} bytes exceed the {self.max_frame_bytes}-byte limit "
                             f"(one row of a tensor is larger than a frame)")
        self.post(version, frames)
        self.metrics.observe("weights_encode_s", time.perf_counter() - start)
        self.metrics.set("weights_bytes", sum(len(f) for f in frames))
        self.metrics.set("weights_buckets", len(frames))
        log.info("published weights version %d: %d bucket(s), %d bytes", version, len(frames),
                 sum(len(f) for f in frames))

    def post(self, version: int, frames: list[bytes]) -> None:
        """Serve `frames` as version `version` from now on (other transports post their announcement here)."""
        with self._lock:
            if version <= self._latest[0]:
                raise ValueError(f"weights version {version} is not newer than the published {self._latest[0]}")
            self._latest = (version, frames)
        self.metrics.set("weights_version", version)

    def _check_newer(self, version: int) -> None:
        with self._lock:
            if version <= self._latest[0]:
                raise ValueError(f"weights version {version} is not newer than the published {self._latest[0]}")

    def _handle(self, payload: bytes) -> list[bytes]:
        try:
            query = decode(payload, WeightQuery, max_frame_bytes=MAX_QUERY_BYTES)
        except ProtocolError as exc:
            self.metrics.inc("weights_bad_frames")
            if worth_logging(self.metrics.counter("weights_bad_frames")):
                log.warning("weights endpoint: rejected a %d-byte frame (%d bad frames so far): %s", len(payload),
                            self.metrics.counter("weights_bad_frames"), exc)
            return [encode(ErrorReply(code="bad_request", message=str(exc)))]
        self.metrics.inc("weights_queries")
        if self.query_hook is not None:
            answer = self.query_hook(query)
            if answer is not None:
                return answer
        with self._lock:
            version, frames = self._latest
        if frames and version > query.have_version:  # before the first publish there is nothing to send
            self.metrics.inc("weights_served")
            return list(frames)
        return [encode(WeightNone(version=version))]

    def close(self) -> None:
        self._router.close()


# ------------------------------------------------------------------------------------------------- fs transport

class FsWeightPublisher:
    """Writes each version as safetensors files under `directory/vNNNNNNNN/`, then replaces `manifest.json`
    atomically (protocol/weights.py has the format and the reader), keeps the newest `keep` versions, and posts a
    `WeightAnnounce(transport="fs", location=directory)` on the weights endpoint when one is given."""

    def __init__(self, directory: str | os.PathLike, bucket_mb: float = 64.0, dtype: str = "float32", keep: int = 2,
                 endpoint: Optional[WeightEndpoint] = None, metrics: Optional[Metrics] = None) -> None:
        if dtype not in TORCH_DTYPES or keep < 1:
            raise ValueError(f"need dtype in {sorted(TORCH_DTYPES)} and keep >= 1; got {dtype!r}, {keep}")
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.bucket_bytes = max(1, int(bucket_mb * 1024 * 1024))
        self.dtype, self.keep = dtype, keep
        self.endpoint = endpoint
        self.metrics = metrics or Metrics()
        self.version = -1

    def publish(self, version: int, state_dict: Mapping[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if version <= self.version:
            raise ValueError(f"weights version {version} is not newer than the published {self.version}")
        start = time.perf_counter()
        name = f"v{version:08d}"
        tmp = self.directory / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        files, shard, size = [], {}, 0
        for key in sorted(state_dict):
            tensor = cast_for_publish(state_dict[key], self.dtype)
            nbytes = tensor.numel() * tensor.element_size()
            if shard and size + nbytes > self.bucket_bytes:
                files.append(self._write_shard(save_file, tmp, len(files), shard))
                shard, size = {}, 0
            shard[key] = tensor
            size += nbytes
        if shard or not files:
            files.append(self._write_shard(save_file, tmp, len(files), shard))
        folder = self.directory / name
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        write_fs_manifest(self.directory, FsManifest(version=version, folder=name, files=files,
                                                     num_tensors=len(state_dict), dtype=self.dtype,
                                                     created_unix=time.time()))
        self.version = version
        self._prune()
        if self.endpoint is not None:
            self.endpoint.post(version, [encode(WeightAnnounce(version=version, transport="fs",
                                                               location=str(self.directory)))])
        self.metrics.observe("weights_write_s", time.perf_counter() - start)
        log.info("wrote weights version %d to %s (%d file(s))", version, folder, len(files))

    @staticmethod
    def _write_shard(save_file, folder: Path, index: int, shard: dict[str, torch.Tensor]) -> str:
        name = f"model-{index:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        with open(folder / name, "rb") as handle:
            os.fsync(handle.fileno())
        return name

    def _prune(self) -> None:
        folders = sorted(p for p in self.directory.glob("v[0-9]*") if p.is_dir())
        for old in folders[: max(0, len(folders) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()


# ---------------------------------------------------------------------------------------------------- factory

def make_publisher(transport: str, endpoint: ZmqWeightPublisher, *, weight_dir: Optional[str] = None,
                   keep: int = 2, nccl_master_addr: str = "127.0.0.1", nccl_master_port: int = 0,
                   nccl_engine_ranks: int = 1, device: Optional[torch.device] = None) -> WeightPublisher:
    """The publisher for `learner.weight_transport`, all sharing rank 0's weights endpoint."""
    if transport == "zmq":
        return endpoint
    if transport == "fs":
        if not weight_dir:
            raise ValueError("weight_transport=fs needs weight_dir")
        return FsWeightPublisher(weight_dir, endpoint.bucket_bytes / (1024 * 1024), endpoint.dtype, keep, endpoint,
                                 endpoint.metrics)
    if transport == "nccl":
        from learner.weights_nccl import NcclWeightPublisher

        return NcclWeightPublisher(endpoint, nccl_master_addr, nccl_master_port, nccl_engine_ranks,
                                   bucket_bytes=endpoint.bucket_bytes, dtype=endpoint.dtype, device=device)
    raise ValueError(f"unknown weight transport {transport!r}; expected zmq, fs or nccl")
