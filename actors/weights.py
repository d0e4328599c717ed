"""Weights in: bringing each new policy version into the actor's engine while episodes run (`WeightPoller`), whatever
transport the learner uses (`WeightApplier`).

zmq: the reassembled state dict is written as one safetensors file in the actor's own folder. fs: the announced
version's files are hard-linked (copied across filesystems) into that folder first, so the learner pruning old
versions cannot pull them from under a load. Both then go through `VllmEngine.update_weights(version, files)`.
nccl: `VllmEngine.update_weights_nccl` joins the learner's broadcast (GPU only). The newest applied version's
files are kept, so an engine restarted after a crash comes back at the same version; older ones are deleted.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from actors.engine import EngineError
from actors.engine_slot import EngineSlot
from actors.transport import TransportClosed, WeightUpdate
from protocol import ProtocolError
from protocol.files import write_atomic_with
from protocol.metrics import Metrics
from protocol.weights import read_fs_manifest

log = logging.getLogger(__name__)

_CASTS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FS_READ_ATTEMPTS = 3  # a version pruned while we link it: read the manifest again this many times


class WeightApplier:
    """Stages a WeightUpdate as files in `folder` and applies it to an engine (VllmEngine: `update_weights(version,
    files)` / `update_weights_nccl`); remembers the newest applied version."""

    def __init__(self, folder: str | Path, engine_dtype: str = "float32", metrics: Metrics | None = None) -> None:
        self.folder = Path(folder)
        self.cast = _CASTS.get(engine_dtype)  # None ("auto"): tensors go in as the learner sent them
        self.metrics = metrics or Metrics()
        self.applied: tuple[int, list[Path]] | None = None  # (version, files) of the newest applied version
        self.transport = ""

    async def apply(self, engine: Any, update: WeightUpdate) -> tuple[int, float]:
        """Apply `update` to `engine`; return (version applied, seconds the engine was paused). fs may apply a
        version newer than announced (the manifest moved on meanwhile)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.transport = update.transport
        started = time.perf_counter()
        if update.transport == "nccl":
            if update.announce is None:
                raise ProtocolError(f"nccl weights version {update.version} without its announcement")
            a = update.announce
            seconds = await engine.update_weights_nccl(
                update.version, a.init, {"names": a.names, "dtype_names": a.dtype_names, "shapes": a.shapes})
            self.applied = (update.version, [])
            return update.version, seconds
        loop = asyncio.get_running_loop()
        if update.transport == "zmq":
            if update.state is None:
                raise ProtocolError(f"zmq weights version {update.version} without tensors")
            version = update.version
            files = await loop.run_in_executor(None, self._write, version, update.state)
        elif update.transport == "fs":
            if update.announce is None or not update.announce.location:
                raise ProtocolError(f"fs weights version {update.version} announced without a location")
            version, files = await loop.run_in_executor(None, self._link_fs, update.announce.location,
                                                        update.version)
        else:
            raise ProtocolError(f"unknown weight transport {update.transport!r} (zmq, fs, nccl)")
        self.metrics.observe("weight_stage_s", time.perf_counter() - started)
        try:
            seconds = await engine.update_weights(version, files)
        except BaseException:
            self._delete(files)
            raise
        previous, self.applied = self.applied, (version, files)
        if previous is not None:
            self._delete(previous[1])
        return version, seconds

    async def reapply(self, engine: Any) -> float | None:
        """Load the newest applied version into a freshly started engine (after a crash); None when there is
        none (the engine's start-up weights are current)."""
        if self.applied is None:
            return None
        version, files = self.applied
        if self.transport == "nccl":
            raise EngineError(f"a restarted engine cannot rejoin the learner's NCCL weight group (version {version}); "
                              f"restart the run or use the zmq/fs weight transport")
        return await engine.update_weights(version, files)

    def _write(self, version: int, state: dict[str, torch.Tensor]) -> list[Path]:
        from safetensors.torch import save_file

        if self.cast is not None:
            state = {k: v.to(self.cast) if v.is_floating_point() else v for k, v in state.items()}
        path = self.folder / f"v{version}.safetensors"
        tensors = {k: v.contiguous() for k, v in state.items()}
        write_atomic_with(path, lambda tmp: save_file(tensors, str(tmp)), durable=False)  # rebuilt after a crash
        return [path]

    def _link_fs(self, directory: str, announced: int) -> tuple[int, list[Path]]:
        """Link the current manifest's files into our folder; retry when the version vanished mid-way."""
        from safetensors import safe_open

        last_error: Exception | None = None
        for _ in range(FS_READ_ATTEMPTS):
            manifest = read_fs_manifest(directory)
            if manifest is None or manifest.version < announced:
                raise ProtocolError(f"{directory}: manifest at version {None if manifest is None else manifest.version}"
                                    f", learner announced {announced}")
            files: list[Path] = []
            try:
                for i, name in enumerate(manifest.files):
                    dst = self.folder / f"v{manifest.version}-{i:05d}.safetensors"
                    _link_or_copy(Path(directory) / manifest.folder / name, dst)
                    files.append(dst)
            except FileNotFoundError as exc:  # pruned while linking: the manifest has moved on
                self._delete(files)
                self.metrics.inc("weight_fs_retries")
                last_error = exc
                continue
            count = 0
            for path in files:
                with safe_open(str(path), framework="pt") as handle:
                    count += len(list(handle.keys()))
            if count != manifest.num_tensors:
                self._delete(files)
                raise ProtocolError(f"{directory}/{manifest.folder}: {count} tensors, manifest says "
                                    f"{manifest.num_tensors}")
            return manifest.version, files
        raise ProtocolError(f"{directory}: weights version kept vanishing while linking ({last_error})")

    @staticmethod
    def _delete(files: list[Path]) -> None:
        for path in files:
            path.unlink(missing_ok=True)

    def clear(self) -> None:
        """Delete the kept files (the actor is stopping)."""
        if self.applied is not None:
            self._delete(self.applied[1])
            self.applied = None


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise FileNotFoundError(str(src)) from exc
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copyfile(src, dst)  # another filesystem (or no hard links): copy


class WeightPoller:
    """Weights in: every `poll_s` while the engine is up, ask the learner for a version newer than the engine's and
    apply it in place while episodes run (under the engine slot's lock). A live engine that fails to load leaves its
    weights in doubt: the poller dies, and `on_fatal` stops the actor. An engine that died loading is restarted at
    the previous version by the slot."""

    def __init__(self, actor_id: str, slot: EngineSlot, link: Any, applier: WeightApplier, poll_s: float,
                 metrics: Metrics, on_fatal: Callable[[BaseException], None]) -> None:
        self.actor_id, self.slot, self.link, self.applier = actor_id, slot, link, applier
        self.poll_s, self.metrics, self.on_fatal = poll_s, metrics, on_fatal
        self.task: asyncio.Task | None = None
        self.fatal: BaseException | None = None  # why the poller died (re-raised by the actor's run())

    def start(self) -> None:
        self.task = asyncio.create_task(self._poll(), name=f"{self.actor_id}-weights")
        self.task.add_done_callback(self._on_done)

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def reach_version(self, version: int) -> None:
        """Wait until the engine runs policy `version` (or newer) before playing a group granted at it: the
        admission rule bounds staleness from the granted version, and with max_staleness=0 (run.mode=sync) this is
        what makes actors wait for each new version. The poller brings it within a poll interval."""
        slot = self.slot
        assert slot.up is not None
        if slot.version >= version:
            return
        started = time.perf_counter()
        self.metrics.inc("version_waits")
        while slot.version < version or not slot.up.is_set():
            if not self.running:
                raise TransportClosed(f"{self.actor_id}: weight updates stopped before version {version} arrived")
            await asyncio.sleep(min(self.poll_s, 0.05))
        self.metrics.observe("version_wait_s", time.perf_counter() - started)

    def _on_done(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        self.fatal = task.exception()
        self.metrics.inc("weight_errors")
        log.error("%s: weight updates stopped: %r", self.actor_id, self.fatal)
        self.on_fatal(self.fatal)

    async def _poll(self) -> None:
        assert self.slot.up is not None
        while True:
            await self.slot.up.wait()
            try:
                update = await self.link.poll_weights(self.slot.version)
            except ProtocolError as exc:
                self.metrics.inc("weight_errors")
                log.error("%s: bad weights from the learner: %s", self.actor_id, exc)
                update = None
            if update is not None:
                await self._apply(update)
            await asyncio.sleep(self.poll_s)

    async def _apply(self, update: WeightUpdate) -> None:
        generation = self.slot.generation
        try:
            version, seconds = await self.slot.under_lock(lambda engine: self.applier.apply(engine, update))
        except ProtocolError as exc:  # nothing reached the engine (e.g. an fs version vanished): poll again
            self.metrics.inc("weight_errors")
            log.error("%s: could not stage weights version %d: %s", self.actor_id, update.version, exc)
            return
        except Exception as exc:
            if self.slot.healthy():
                raise  # a live engine that failed to load: its weights are in doubt (fatal, see _on_done)
            await self.slot.recover(generation, exc)  # it died loading: back at the previous version
            return
        self.metrics.observe("weight_update_s", seconds)
        self.metrics.inc("weight_updates")
        log.info("%s: now at policy version %d (%.2f s)", self.actor_id, version, seconds)
