"""Getting a new policy version into the engine: zmq state dicts, fs directories (incl. a version pruned while it
is being linked), nccl announcements through VllmEngine's vLLM weight-transfer calls, and re-applying the newest
version to a restarted engine."""
from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from actors import engine as engine_module
from actors.config import EngineConfig
from actors.engine import EngineError, VllmEngine
from actors.transport import WeightUpdate
from actors.weights import WeightApplier
from protocol import ProtocolError, WeightAnnounce
from protocol.weights import FsManifest, write_fs_manifest


class FileEngine:
    """Records the files of every update (loaded at once, as the worker would)."""

    def __init__(self) -> None:
        self.version = 0
        self.loads: list[tuple[int, dict]] = []

    async def update_weights(self, version, paths):
        state = {}
        for path in paths:
            state.update(load_file(str(path)))
        self.loads.append((version, state))
        self.version = version
        return 0.01


def _publish_fs(directory: Path, version: int, tensors: dict[str, torch.Tensor], files: int = 2) -> FsManifest:
    """What learner/weights.FsWeightPublisher writes: vNNNNNNNN/model-*.safetensors, then manifest.json."""
    folder = directory / f"v{version:08d}"
    folder.mkdir(parents=True)
    names = sorted(tensors)
    parts = [names[i::files] for i in range(files)]
    file_names = []
    for i, part in enumerate(parts):
        save_file({n: tensors[n] for n in part}, str(folder / f"model-{i:05d}.safetensors"))
        file_names.append(f"model-{i:05d}.safetensors")
    manifest = FsManifest(version=version, folder=folder.name, files=file_names, num_tensors=len(tensors),
                          dtype="bfloat16")
    write_fs_manifest(directory, manifest)
    return manifest


def _tensors(scale: float) -> dict[str, torch.Tensor]:
    return {"model.a.weight": torch.full((2, 3), scale, dtype=torch.bfloat16),
            "model.b.bias": torch.arange(4, dtype=torch.float32) * scale,
            "model.c.idx": torch.arange(3, dtype=torch.int64)}


def test_zmq_state_is_cast_to_the_engine_dtype_and_only_the_newest_file_is_kept(tmp_path):
    async def main():
        engine = FileEngine()
        applier = WeightApplier(tmp_path / "w", engine_dtype="float32")
        version, _ = await applier.apply(engine, WeightUpdate(version=3, transport="zmq", state=_tensors(1.5)))
        assert version == 3 and engine.version == 3
        loaded = engine.loads[0][1]
        assert loaded["model.a.weight"].dtype == torch.float32 and loaded["model.a.weight"][0, 0] == 1.5
        assert loaded["model.c.idx"].dtype == torch.int64  # integer tensors are not cast
        await applier.apply(engine, WeightUpdate(version=4, transport="zmq", state=_tensors(2.0)))
        assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["v4.safetensors"]
        # an engine restarted after a crash comes back at the newest version
        fresh = FileEngine()
        await applier.reapply(fresh)
        assert fresh.version == 4 and torch.equal(fresh.loads[0][1]["model.b.bias"], torch.arange(4.0) * 2)
        applier.clear()
        assert not list((tmp_path / "w").iterdir())
        assert await applier.reapply(FileEngine()) is None  # nothing applied: start-up weights are current

    asyncio.run(main())


def test_failed_load_leaves_no_files_and_keeps_the_previous_version(tmp_path):
    class Failing(FileEngine):
        async def update_weights(self, version, paths):
            raise RuntimeError("worker raised")

    async def main():
        applier = WeightApplier(tmp_path / "w")
        await applier.apply(FileEngine(), WeightUpdate(version=1, transport="zmq", state=_tensors(1.0)))
        with pytest.raises(RuntimeError, match="worker raised"):
            await applier.apply(Failing(), WeightUpdate(version=2, transport="zmq", state=_tensors(2.0)))
        assert applier.applied[0] == 1 and [p.name for p in (tmp_path / "w").iterdir()] == ["v1.safetensors"]

    asyncio.run(main())


def test_fs_version_is_linked_and_loaded(tmp_path):
    shared = tmp_path / "shared"
    _publish_fs(shared, 7, _tensors(3.0))

    async def main():
        engine = FileEngine()
        applier = WeightApplier(tmp_path / "w")
        announce = WeightAnnounce(version=7, transport="fs", location=str(shared))
        version, _ = await applier.apply(engine, WeightUpdate(version=7, transport="fs", announce=announce))
        assert version == 7 and set(engine.loads[0][1]) == set(_tensors(1.0))
        assert engine.loads[0][1]["model.a.weight"].dtype == torch.bfloat16  # as published; vLLM casts on load
        linked = sorted((tmp_path / "w").iterdir())
        assert len(linked) == 2
        # hard links: the learner pruning its folder does not pull the files from under a load or a restart
        for path in (shared / "v00000007").iterdir():
            path.unlink()
        fresh = FileEngine()
        await applier.reapply(fresh)
        assert fresh.version == 7 and set(fresh.loads[0][1]) == set(_tensors(1.0))

        # the manifest moved on to a newer version since the announcement: the newer one is applied
        _publish_fs(shared, 9, _tensors(4.0))
        version, _ = await applier.apply(engine, WeightUpdate(version=8, transport="fs", announce=announce))
        assert version == 9 and engine.version == 9

    asyncio.run(main())


def test_fs_faults(tmp_path):
    shared = tmp_path / "shared"
    manifest = _publish_fs(shared, 2, _tensors(1.0))

    async def main():
        applier = WeightApplier(tmp_path / "w")
        engine = FileEngine()
        stale = WeightAnnounce(version=5, transport="fs", location=str(shared))
        with pytest.raises(ProtocolError, match="manifest at version 2"):
            await applier.apply(engine, WeightUpdate(version=5, transport="fs", announce=stale))
        # the manifest claims more tensors than its files hold
        write_fs_manifest(shared, FsManifest(version=3, folder=manifest.folder, files=manifest.files,
                                             num_tensors=99))
        with pytest.raises(ProtocolError, match="manifest says 99"):
            await applier.apply(engine, WeightUpdate(version=3, transport="fs",
                                                     announce=WeightAnnounce(version=3, transport="fs",
                                                                             location=str(shared))))
        # the version's files vanish for good (pruned, never republished): retried, then an error
        write_fs_manifest(shared, FsManifest(version=4, folder="v00000004", files=["model-00000.safetensors"],
                                             num_tensors=1))
        with pytest.raises(ProtocolError, match="vanishing"):
            await applier.apply(engine, WeightUpdate(version=4, transport="fs",
                                                     announce=WeightAnnounce(version=4, transport="fs",
                                                                             location=str(shared))))
        assert applier.metrics.counter("weight_fs_retries") == 3
        assert engine.loads == [] and not list((tmp_path / "w").iterdir())
        with pytest.raises(ProtocolError, match="without a location"):
            await applier.apply(engine, WeightUpdate(version=6, transport="fs",
                                                     announce=WeightAnnounce(version=6, transport="fs")))
        with pytest.raises(ProtocolError, match="unknown weight transport"):
            await applier.apply(engine, WeightUpdate(version=6, transport="carrier-pigeon"))

    asyncio.run(main())


class FakeLLM:
    """Stands in for vLLM's AsyncLLM: records the weight-transfer calls in order."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.errored = False

    def __getattr__(self, name):
        async def call(*args, **kwargs):
            self.calls.append((name, *args))
            return True
        return call


@dataclass
class InitRequest:  # the shape of vLLM's WeightTransferInitRequest (checked against vLLM in test_vllm_engine.py)
    init_info: dict


@dataclass
class UpdateRequest:
    update_info: dict


def test_nccl_update_follows_vllms_weight_transfer_sequence(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({}))
    monkeypatch.setattr(engine_module, "weight_transfer_requests", lambda: (InitRequest, UpdateRequest))

    async def main():
        engine = VllmEngine(tmp_path / "model", EngineConfig(), tmp_path / "run", weight_transfer="nccl")
        engine._llm = FakeLLM()  # what start() would build (CUDA vLLM with weight_transfer_config nccl)
        init = {"master_address": "127.0.0.1", "master_port": 29555, "world_size": 2, "rank_offset": 1,
                "packed": True, "packed_buffer_size_bytes": 1 << 20, "packed_num_buffers": 2}
        announce = WeightAnnounce(version=1, transport="nccl", init=init, names=["w"], dtype_names=["bfloat16"],
                                  shapes=[[2, 2]])
        applier = WeightApplier(tmp_path / "w")
        version, _ = await applier.apply(engine, WeightUpdate(version=1, transport="nccl", announce=announce))
        await applier.apply(engine, WeightUpdate(version=2, transport="nccl", announce=WeightAnnounce(
            version=2, transport="nccl", init=init, names=["w"], dtype_names=["bfloat16"], shapes=[[2, 2]])))
        names = [c[0] for c in engine._llm.calls]
        assert names == ["init_weight_transfer_engine",  # joins the group once
                         "pause_generation", "start_weight_update", "update_weights", "finish_weight_update",
                         "reset_prefix_cache", "reset_encoder_cache", "update_weight_version", "resume_generation",
                         "pause_generation", "start_weight_update", "update_weights", "finish_weight_update",
                         "reset_prefix_cache", "reset_encoder_cache", "update_weight_version", "resume_generation"]
        assert engine._llm.calls[0][1].init_info == init
        assert engine._llm.calls[3][1].update_info == {"names": ["w"], "dtype_names": ["bfloat16"], "shapes": [[2, 2]]}
        assert engine.version == 2 and engine._llm.calls[7][1] == "1"
        with pytest.raises(EngineError, match="cannot rejoin"):
            await applier.reapply(engine)
        with pytest.raises(EngineError, match="not 'nccl'|weight files"):
            await engine.update_weights(3, [tmp_path / "x.safetensors"])

        plain = VllmEngine(tmp_path / "model", EngineConfig(), tmp_path / "run")
        plain._llm = FakeLLM()
        with pytest.raises(EngineError, match="not 'nccl'"):
            await plain.update_weights_nccl(1, init, {})
        with pytest.raises(ValueError, match="weight_transfer"):
            VllmEngine(tmp_path / "model", EngineConfig(), tmp_path / "run", weight_transfer="rdma")

    asyncio.run(main())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_nccl_on_cpu_is_refused_with_a_clear_error(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    engine = VllmEngine(tmp_path / "model", EngineConfig(), tmp_path / "run", weight_transfer="nccl")
    saved = dict(os.environ)
    try:
        with pytest.raises(EngineError, match="needs CUDA"):
            asyncio.run(engine.start())
    finally:
        os.environ.clear()
        os.environ.update(saved)
