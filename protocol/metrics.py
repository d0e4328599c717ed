"""The one metrics module: counters, gauges and sample summaries that every role keeps and snapshots.

Roles own a `Metrics` registry, count events on it (`inc`), set levels (`set`) and record samples (`observe`,
e.g. latencies). `snapshot()` flattens everything into `{name: float}` (samples as count/mean/p50/p90/p99/max),
which is what crosses process boundaries and lands in metrics.jsonl. Thread-safe; no I/O.
"""
from __future__ import annotations

import threading
from collections import defaultdict, deque

import numpy as np


class Metrics:
    """A small registry of named counters, gauges and bounded sample windows."""

    def __init__(self, prefix: str = "", window: int = 4096) -> None:
        self._prefix = prefix
        self._window = window
        self._lock = threading.Lock()
        self._counters: dict[str, float] = defaultdict(float)
        self._gauges: dict[str, float] = {}
        self._samples: dict[str, deque[float]] = {}

    def inc(self, name: str, amount: float = 1.0) -> None:
        with self._lock:
            self._counters[name] += amount

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self._gauges[name] = float(value)

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            window = self._samples.get(name)
            if window is None:
                window = self._samples[name] = deque(maxlen=self._window)
            window.append(float(value))

    def counter(self, name: str) -> float:
        with self._lock:
            return self._counters.get(name, 0.0)

    def snapshot(self, reset_samples: bool = False) -> dict[str, float]:
        """All values as one flat dict; samples summarised. `reset_samples` starts new windows afterwards."""
        with self._lock:
            out: dict[str, float] = {}
            for name, value in self._counters.items():
                out[self._prefix + name] = value
            for name, value in self._gauges.items():
                out[self._prefix + name] = value
            for name, window in self._samples.items():
                out.update({self._prefix + k: v for k, v in summarize(name, list(window)).items()})
                if reset_samples:
                    window.clear()
            return out


def summarize(name: str, values: list[float]) -> dict[str, float]:
    """count, mean, p50, p90, p99 and max of `values` under `name_*` keys (count only when empty)."""
    if not values:
        return {f"{name}_count": 0.0}
    array = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(array, [50, 90, 99])
    return {
        f"{name}_count": float(array.size),
        f"{name}_mean": float(array.mean()),
        f"{name}_p50": float(p50),
        f"{name}_p90": float(p90),
        f"{name}_p99": float(p99),
        f"{name}_max": float(array.max()),
    }
