"""Checkpoints of the learner world with torch.distributed.checkpoint (DCP): sharded model and optimiser state
(resumable on another world size), every rank's RNG state, and rank 0's bookkeeping (version, step, admission
counters, remembered group ids) plus the acked-but-untrained groups as opaque bytes from the role.

Layout under `root` (a directory every rank can write; shared storage on a multi-host run):
    root/step_00000007/.metadata, __*_*.distcp    DCP: {"model": ..., "optim": ...}
    root/step_00000007/rng_rank{r}.safetensors     torch (and CUDA) RNG state of rank r
    root/step_00000007/learner_state.json          rank 0: LearnerState below
    root/step_00000007/groups.msgpack              rank 0: buffered groups (learner.batch.pack_groups)
A checkpoint is written into `root/.step_00000007.tmp` and renamed by rank 0 once every rank has finished, so a
directory named step_* is always complete; "latest" is the highest such step. The newest `keep` are kept.
`export_checkpoint` turns one into a Hugging Face model folder (what eval serves on vLLM).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

STATE_FILE = "learner_state.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")  # of a model folder
GROUPS_FILE = "groups.msgpack"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be found, read or written; the message names the path."""


@dataclass
class LearnerState:
    """Rank 0's bookkeeping in a checkpoint (plain values, JSON)."""

    version: int
    steps: int
    admission: dict[str, int] = field(default_factory=dict)
    seen_group_ids: list[str] = field(default_factory=list)
    trained_groups: int = 0
    world_size: int = 1
    journal_seq: int = -1  # the intake journal's last entry this checkpoint holds (trained or buffered); -1: none


def step_dir(root: str | os.PathLike, version: int) -> Path:
    return Path(root) / f"step_{version:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    base = Path(root)
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def resolve_checkpoint(resume_from: Optional[str], root: Optional[str]) -> Optional[Path]:
    """`resume_from` as a checkpoint directory: None/"" → None (fresh start); "latest" → the newest complete one
    under `root`, or None when there is none yet; a path → that directory (CheckpointError if it is not one)."""
    if not resume_from:
        return None
    if resume_from == "latest":
        if not root:
            raise CheckpointError('resume_from="latest" needs learner.checkpoint_dir')
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file() or not (path / ".metadata").is_file():
        raise CheckpointError(f"{path} is not a learner checkpoint (no {STATE_FILE} or .metadata)")
    return path


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_checkpoint(root: str | os.PathLike, version: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: Optional[LearnerState], groups_blob: Optional[bytes], keep: int = 2) -> Path:
    """Collective: every rank calls it with the same `version`; `state` and `groups_blob` are read on rank 0 only.
    Returns the checkpoint directory."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank = dist.get_rank() if dist.is_initialized() else 0
    final = step_dir(root, version)
    tmp = final.with_name(f".{final.name}.tmp")
    if rank == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp_save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    save_file(_rng_state(), str(tmp / f"rng_rank{rank}.safetensors"))
    if rank == 0:
        assert state is not None
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state)))
        (tmp / GROUPS_FILE).write_bytes(groups_blob or b"")
    _barrier()
    if rank == 0:
        if final.exists():  # a shutdown checkpoint at the version of a periodic one: the newer wins
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[: -keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint of version %d written to %s", version, final)
    _barrier()
    return final


def load_checkpoint(path: str | os.PathLike, model: nn.Module,
                    optimizer: torch.optim.Optimizer) -> tuple[LearnerState, bytes]:
    """Collective: restore model, optimiser and this rank's RNG from `path`; returns (LearnerState, groups blob)
    (read on every rank; only rank 0 uses the blob)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    try:
        state = LearnerState(**json.loads((path / STATE_FILE).read_text()))
        blob = (path / GROUPS_FILE).read_bytes()
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot read the learner state of {path}: {exc}") from exc
    model_state, optim_state = get_state_dict(model, optimizer)
    loaded = {"model": model_state, "optim": optim_state}
    dcp_load(loaded, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = path / f"rng_rank{rank}.safetensors"
    if rng_file.is_file():
        _set_rng_state(load_file(str(rng_file)))
    else:  # resumed on more ranks than were saved: the new ranks keep their seeded RNG
        log.warning("%s has no RNG state for rank %d; keeping this rank's seeded RNG", path, rank)
    return state, blob


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------- export

def find_checkpoint(path: str | os.PathLike) -> Path:
    """A learner checkpoint directory (step_NNNNNNNN/) as is, or a checkpoint root's newest complete checkpoint."""
    candidate = Path(path)
    if (candidate / STATE_FILE).is_file() and (candidate / ".metadata").is_file():
        return candidate
    found = list_checkpoints(candidate)
    if not found:
        raise FileNotFoundError(f"{path}: neither a learner checkpoint (step_NNNNNNNN/ with {STATE_FILE} and "
                                f".metadata) nor a folder holding one")
    return found[-1]


def export_checkpoint(checkpoint: str | os.PathLike, base_model: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """An HF model folder at `out_dir`: the model weights of a learner checkpoint (DCP, any world size) on top of
    `base_model`'s architecture, with the base folder's tokenizer, processor and chat-template files. Returns it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from transformers import AutoModelForImageTextToText

    checkpoint, base, out = Path(checkpoint), Path(base_model), Path(out_dir)
    started = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(str(base), dtype=torch.float32)  # as the learner loads it
    state = {"model": get_model_state_dict(model)}
    with warnings.catch_warnings():  # no process group on purpose: DCP reads every rank's shard in this process
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, checkpoint_id=str(checkpoint))
    set_model_state_dict(model, state["model"])
    out.mkdir(parents=True, exist_ok=True)
    for item in base.iterdir():  # tokenizer, processor, chat template, generation config, build notes
        if item.is_file() and item.name not in WEIGHT_FILES and not item.name.startswith("model-"):
            shutil.copy2(item, out / item.name)
    model.save_pretrained(out)
    (out / "forage_checkpoint.json").write_text(json.dumps({"checkpoint": str(checkpoint), "base": str(base)}) + "\n")
    log.info("exported %s onto %s -> %s in %.1fs", checkpoint, base, out, time.perf_counter() - started)
    return out
