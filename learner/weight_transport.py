"""The weight transport interface (docs/architecture.md, "one weight update"): what every way of getting a version's
weights from learner rank 0 to the engines implements (`WeightPublisher`), and what the other transports see of rank
0's weights endpoint (`WeightEndpoint`: the ROUTER actors always poll, which serves zmq buckets itself and posts the
fs and nccl announcements). learner/weights.py has the zmq and fs transports and the factory; learner/weights_nccl.py
the nccl one. Both import this module and not each other.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Protocol

import torch

from protocol import WeightQuery
from protocol.metrics import Metrics

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Answers a query itself (e.g. nccl's per-actor announcement) or returns None to fall back to the posted frames.
QueryHook = Callable[[WeightQuery], Optional[list[bytes]]]


class WeightPublisher(Protocol):
    """Makes a version's full state dict (checkpoint naming, CPU tensors) available to the engines."""

    def publish(self, version: int, state_dict: Mapping[str, torch.Tensor]) -> None: ...

    def close(self) -> None: ...


class WeightEndpoint(WeightPublisher, Protocol):
    """Rank 0's weights ROUTER as another transport uses it: post the frames that answer a `WeightQuery` for a
    version, or hook the queries to answer them itself; its bucket size, publish dtype and metrics are shared."""

    bucket_bytes: int
    dtype: str
    metrics: Metrics
    query_hook: Optional[QueryHook]

    def post(self, version: int, frames: list[bytes]) -> None: ...


def cast_for_publish(tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    """A contiguous CPU copy; floating tensors in the publish dtype, others unchanged."""
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
        tensor = tensor.to(TORCH_DTYPES[dtype])
    return tensor.contiguous()
