"""The rollout actor's one inference engine, kept alive: the engine in use, whether it is up (cleared while it
restarts), a lock that serialises weight updates and restarts, and crash recovery: a dead or hung engine is closed
and replaced at the newest applied weight version, at most `max_engine_restarts` times. The episode loop
(actors/groups.py) and weights in (actors/weights.py) share it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Protocol

from actors.engine import EngineError, EngineHung
from protocol.metrics import Metrics

log = logging.getLogger(__name__)


class Reapplier(Protocol):
    """actors.weights.WeightApplier's side of a restart: put the newest applied version into a fresh engine."""

    async def reapply(self, engine: Any) -> float | None: ...


class EngineSlot:
    """`engine` is the one in use; `generation` counts restarts, so that a failure seen on an engine that was since
    replaced restarts nothing. Events and locks are made in `start()`, on the actor's event loop."""

    def __init__(self, actor_id: str, make_engine: Callable[[], Any], weights: Reapplier, max_restarts: int,
                 metrics: Metrics) -> None:
        self.actor_id = actor_id
        self._make_engine = make_engine
        self._weights = weights
        self._max_restarts = max_restarts
        self._metrics = metrics
        self.engine: Any = None
        self.generation = 0
        self.up: asyncio.Event | None = None  # cleared while the engine restarts
        self.lock: asyncio.Lock | None = None  # weight updates and restarts, one at a time

    async def start(self) -> None:
        self.up, self.lock = asyncio.Event(), asyncio.Lock()
        self.engine = self._make_engine()
        await self.engine.start()
        self.up.set()

    @property
    def version(self) -> int:
        return int(self.engine.version)

    def healthy(self) -> bool:
        check = getattr(self.engine, "is_healthy", None)
        return True if check is None else bool(check())

    async def under_lock(self, apply: Callable[[Any], Awaitable[Any]]) -> Any:
        """`apply(engine)` while no restart or other update runs."""
        assert self.lock is not None
        async with self.lock:
            return await apply(self.engine)

    async def recover(self, generation: int, exc: BaseException) -> None:
        """After a failure seen on engine `generation`: restart the engine if it died (once, however many groups
        saw it die), at the newest applied weight version. A live engine is left alone (the group just re-runs)."""
        assert self.lock is not None and self.up is not None
        async with self.lock:
            hung = isinstance(exc, EngineHung)  # alive to is_healthy(), but answering nothing: restart it too
            if generation != self.generation or (not hung and self.healthy()):
                return
            restarts = self._metrics.counter("engine_restarts")
            if restarts >= self._max_restarts:
                raise EngineError(f"{self.actor_id}: engine died again after {restarts:.0f} restart(s) "
                                  f"(max_engine_restarts={self._max_restarts}): {exc!r}") from exc
            self._metrics.inc("engine_restarts")
            log.error("%s: engine %s (%r); restarting it", self.actor_id, "hung" if hung else "died", exc)
            self.up.clear()
            started = time.perf_counter()
            try:
                try:
                    await self.engine.close()
                except Exception as close_error:  # a dead engine may not close cleanly; a new one replaces it
                    log.warning("%s: closing the dead engine raised %r", self.actor_id, close_error)
                self.engine = self._make_engine()
                await self.engine.start()
                await self._weights.reapply(self.engine)
                self.generation += 1
            finally:
                self.up.set()
            self._metrics.observe("engine_restart_s", time.perf_counter() - started)
            log.info("%s: engine restarted at version %d in %.1f s", self.actor_id, self.engine.version,
                     time.perf_counter() - started)

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.close()
