"""A remote search API's latency, put on any backend: each reply is held back by a seeded log-normal draw.

The server draws one delay per admitted request and sends its reply no earlier than receipt + delay (the backend's
own time runs inside that window, as a remote API's compute is part of its latency). Replies wait on the event
loop's timers, each until its own time, so many requests wait at once: the model delays, it does not queue.
Off by default; conf/tool_servers/*.yaml `<tool>.latency` turns it on per tool.
"""
from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

# Median delay of each tool when its section leaves `median_s` null: image search (a reverse-image API such as
# Google Lens) answers slower than text search.
DEFAULT_MEDIAN_S: dict[str, float] = {"image_search": 1.0, "text_search": 0.5}
FALLBACK_MEDIAN_S = 0.5  # a tool not named above


@dataclass(frozen=True)
class LatencyConfig:
    """conf/tool_servers `<tool>.latency`: a log-normal delay with median `median_s` and log-space spread `sigma`."""

    enabled: bool = False
    median_s: Optional[float] = None  # null = DEFAULT_MEDIAN_S of the tool
    sigma: float = 0.5  # standard deviation of log(delay); 0 = every delay is median_s
    seed: int = 0  # mixed with the tool's name and the replica's index: replicas and tools draw apart
    cached: bool = True  # also delay replies from the result cache or a replayed snapshot (false: backend's only)

    def __post_init__(self) -> None:
        if self.median_s is not None and not self.median_s > 0:
            raise ValueError(f"latency.median_s must be > 0 (or null for the tool's default), got {self.median_s!r}")
        if not self.sigma >= 0:
            raise ValueError(f"latency.sigma must be >= 0, got {self.sigma!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"latency.seed must be a non-negative int, got {self.seed!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "LatencyConfig":
        """From a conf mapping (None = off); unknown keys raise ValueError naming them."""
        values = dict(values or {})
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown latency knobs {sorted(unknown)}; accepted: "
                             f"{sorted(f.name for f in dataclasses.fields(cls))}")
        return cls(**values)


def lognormal_delays(rng: np.random.Generator, median_s: float, sigma: float, n: int) -> np.ndarray:
    """`n` delays in seconds, log-normal: log(delay) ~ Normal(log(median_s), sigma), so their median is median_s
    and their mean median_s * exp(sigma**2 / 2)."""
    return median_s * np.exp(sigma * rng.standard_normal(n))


class LatencyModel:
    """One tool's delays on one replica: a reproducible stream of draws, one per admitted request, in arrival order.

    Not thread-safe: the server draws on its event loop only.
    """

    def __init__(self, config: LatencyConfig, tool: str, replica: int = 0) -> None:
        self.config = config
        self.tool = tool
        self.median_s = config.median_s if config.median_s is not None else DEFAULT_MEDIAN_S.get(tool,
                                                                                                 FALLBACK_MEDIAN_S)
        self._rng = np.random.default_rng([config.seed, zlib.crc32(tool.encode()), replica])

    @property
    def cached(self) -> bool:
        return self.config.cached

    def draw(self) -> float:
        """The next delay, in seconds."""
        return float(lognormal_delays(self._rng, self.median_s, self.config.sigma, 1)[0])


def latency_model(tool: str, section: Mapping[str, Any], replica: int = 0) -> LatencyModel | None:
    """The LatencyModel of a conf tool section's `latency:` mapping; None when it is absent or not enabled."""
    config = LatencyConfig.from_mapping(section.get("latency"))
    return LatencyModel(config, tool, replica) if config.enabled else None
