"""The supervised warm start inside the FSDP2 learner (`algo=sft`): scripted oracle episodes of the synthetic world
as the very trajectories an actor would record (data/trajectories.py tokenises them piece by piece with the actors'
episode tokenizer, images expanded as the engine expands them; the learner never imports actors/), trained by the
learner's own Trainer on the negative log-likelihood of the generated tokens; rank 0 then writes a Hugging Face
folder that RL starts from (the launcher caches it: launcher/warm_start.py).

Every rank draws the same batches from the same seed (no broadcast needed); the Trainer's plan gives each rank its
share, so a step on R ranks equals a step on one process. `run_sft_local` spawns the ranks on this machine (tests,
`python -m learner --sft`, the launcher's default runner); launch.py places them with Ray (launcher/warm_start.py).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing as mp
import os
import queue as queue_module
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist

from data.oracle import OracleConfig
from data.trajectories import OracleStream
from data.world import WorldPaths, load_world
from episode.tokenizer import EpisodeTokenizer
from learner.config import AlgoConfig, LearnerConfig, _from_dict
from learner.packing import Sample
from learner.role import join_world, rank_device
from learner.trainer import Trainer
from learner.weights import gather_full_state_dict, to_checkpoint_names
from protocol import Trajectory, from_ndarray
from protocol.sockets import free_port

log = logging.getLogger(__name__)

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "model.safetensors.index.json", "forage_build.json")
SHARD_BYTES = 4 * 2**30  # safetensors shard size of the saved folder (HF's loaders read an index across shards)
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class SftConfig:
    """conf/algo/sft.yaml: the warm start's data mixture and schedule (optimiser knobs override conf/learner)."""

    name: str = "sft"
    steps: int = 1400  # optimiser steps in all, the vision steps included
    # The first steps train on search-free pixel questions answered directly (short, cheap episodes), mixed with
    # copy drills. Measured: from a random init, the full mixture (many result thumbnails per episode) never
    # started reading the question image within 800 steps, while pixel episodes alone do within ~200; the drills
    # form in-context copying over the same steps (data/drills.py).
    vision_steps: int = 600
    vision_drills: float = 0.6  # share of copy drills in the vision steps' batches
    drills: float = 0.25  # share of copy drills in the later batches (the oracle's full mixture)
    batch_size: int = 32  # episodes per optimiser step (over all ranks)
    lr: float = 1e-3  # peak AdamW lr: linear warm-up, then cosine to min_lr_ratio · lr at the last step
    warmup_steps: int = 10
    min_lr_ratio: float = 0.2
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_tokens: int = 1024  # forward/backward token budget (replaces conf/learner's for the warm start:
    # on CPU 1024 ran ~20% faster than 4096 for these short sequences)
    threads: int = 2  # torch threads per rank (replaces conf/learner's): the warm start runs before any other role,
    # and on an idle 2-core box one rank with 2 threads ran 1.46x faster than with 1
    seed: int = 0  # episode sampling (the same on every rank)
    split: str = "train"  # the world's question split the oracle plays
    pixel_search_fraction: float = 0.7  # search-free questions whose oracle still searches first (RL undoes it)
    fresh_name_fraction: float = 1.0  # search episodes with entity names swapped for fresh ones
    fact_shuffle_fraction: float = 1.0  # search episodes whose facts are redrawn (answers only readable, not known)
    fresh_value_fraction: float = 0.5  # of redrawn cities and makers (and drill values): made-up ones
    rag_fraction: float = 0.15  # episodes played as the RAG workflow (image search, text search, answer), hinted
    never_hint_fraction: float = 0.5  # search-free episodes answered directly that show the never_search hint
    # What the oracle's simulated tools return; must match the tool servers the RL run uses (conf/algo/sft.yaml
    # interpolates them from conf/tool_servers).
    image_results: int = 1
    text_results: int = 1
    snippet_sentences: int = 1
    text_chars: int = 300

    def __post_init__(self) -> None:
        if self.name != "sft":
            raise ValueError(f"SftConfig.name={self.name!r}; expected 'sft'")
        if (self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip <= 0
                or self.weight_decay < 0 or not 0 <= self.vision_steps <= self.steps
                or not 0.0 <= self.min_lr_ratio <= 1.0 or self.micro_batch_tokens < 1 or self.threads < 1
                or not 0.0 <= self.vision_drills <= 1.0 or not 0.0 <= self.drills <= 1.0):
            raise ValueError(
                f"bad sft schedule: steps={self.steps} vision_steps={self.vision_steps} batch_size={self.batch_size} "
                f"lr={self.lr} warmup_steps={self.warmup_steps} min_lr_ratio={self.min_lr_ratio} "
                f"grad_clip={self.grad_clip} weight_decay={self.weight_decay} "
                f"micro_batch_tokens={self.micro_batch_tokens} vision_drills={self.vision_drills} "
                f"drills={self.drills}")
        self.oracle().validate()

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "SftConfig":
        return _from_dict(cls, values)

    def oracle(self) -> OracleConfig:
        return OracleConfig(pixel_search_fraction=self.pixel_search_fraction,
                            fresh_name_fraction=self.fresh_name_fraction,
                            fact_shuffle_fraction=self.fact_shuffle_fraction,
                            fresh_value_fraction=self.fresh_value_fraction, rag_fraction=self.rag_fraction,
                            never_hint_fraction=self.never_hint_fraction,
                            image_results=self.image_results,
                            text_results=self.text_results, snippet_sentences=self.snippet_sentences,
                            text_chars=self.text_chars)

    def learner_config(self, base: LearnerConfig) -> LearnerConfig:
        """`base` (world size, backend, precision, micro-batch budget, threads) with this schedule; no checkpoints
        (the result is the saved folder)."""
        return dataclasses.replace(
            base, lr=self.lr, warmup_steps=self.warmup_steps, lr_schedule="cosine",
            micro_batch_tokens=self.micro_batch_tokens, threads=self.threads,
            decay_steps=max(1, self.steps - 1 - self.warmup_steps), min_lr_ratio=self.min_lr_ratio,
            weight_decay=self.weight_decay, grad_clip=self.grad_clip, checkpoint_every=0, resume_from=None,
            checkpoint_dir=None)

    @staticmethod
    def algo_config() -> AlgoConfig:
        """The Trainer's AlgoConfig for the NLL objective: no proximal pass, no reference, temperature 1."""
        return AlgoConfig(correction="bypass", kl_coef=0.0, entropy_coef=0.0, temperature=1.0, agg="token_mean")


# ----------------------------------------------------------------------------------------------- samples

def sample_from_trajectory(trajectory: Trajectory, sample_id: str) -> Sample:
    """A learner Sample of an oracle trajectory: its generated tokens are the SFT targets."""
    return Sample(group_id=sample_id, input_ids=from_ndarray(trajectory.token_ids).astype(np.int64),
                  loss_mask=from_ndarray(trajectory.loss_mask).astype(bool),
                  behav_logp=from_ndarray(trajectory.behaviour_logprobs).astype(np.float32),
                  versions=from_ndarray(trajectory.versions).astype(np.int32), advantage=1.0,
                  images=list(trajectory.images))


# ----------------------------------------------------------------------------------------------- saving

def save_hf_folder(names_to_tensors: Mapping[str, torch.Tensor], base_dir: Path | str, out_dir: Path | str,
                   dtype: str) -> list[str]:
    """Write weights (checkpoint names) as safetensors in `dtype` beside a copy of `base_dir`'s config, tokenizer
    and processor files, so that transformers and vLLM load `out_dir` like the base. Returns the files written."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    if dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(SAVE_DTYPES)}")
    base, out = Path(base_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for item in base.iterdir():
        if item.is_file() and not any(item.match(pattern) for pattern in WEIGHT_FILES):
            shutil.copy2(item, out / item.name)
    config = AutoConfig.from_pretrained(base)
    config.dtype = dtype
    config.save_pretrained(out)
    cast = {name: (t.to(SAVE_DTYPES[dtype]) if t.is_floating_point() else t).contiguous()
            for name, t in names_to_tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(cast):
        nbytes = cast[name].numel() * cast[name].element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = cast[name]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        files.append(file)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in cast.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return files


# ----------------------------------------------------------------------------------------------- the role

class SftRank:
    """One rank of the warm-start world. `cfg` = {"learner": conf/learner, "sft": conf/algo/sft}. Like LearnerRank
    a plain class: `run` is a collective (call it on every rank); `drain_metrics`/`stop` may be called meanwhile."""

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, model_path: str,
                 world_root: str, cfg: Mapping[str, Any]) -> None:
        self.sft = SftConfig.from_dict(cfg.get("sft"))
        self.learner = self.sft.learner_config(LearnerConfig.from_dict(cfg.get("learner")))
        if world_size != self.learner.world_size:
            raise ValueError(f"world_size={world_size} but learner.world_size={self.learner.world_size}")
        torch.set_num_threads(self.learner.threads)
        self.rank, self.world_size, self.model_path = rank, world_size, model_path
        self.device = rank_device(self.learner, rank)
        join_world(self.learner, master_addr, master_port, rank, world_size)
        self.trainer = Trainer(model_path, self.learner, self.sft.algo_config(), self.device, objective="sft")
        tok = EpisodeTokenizer.from_pretrained(model_path)
        self.stream = OracleStream(load_world(WorldPaths(Path(world_root))), tok, self.sft.oracle(),
                                   split=self.sft.split, seed=self.sft.seed, batch_size=self.sft.batch_size,
                                   vision_steps=self.sft.vision_steps, vision_drills=self.sft.vision_drills,
                                   drills=self.sft.drills)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._rows: list[dict[str, float]] = []

    def run(self, out_dir: str, dtype: str = "float32") -> dict[str, Any]:
        """Train `sft.steps` steps, then save the model to `out_dir` (rank 0). Returns a report (rank 0's has the
        losses); `completed` is False when stop() ended it early — nothing is saved then."""
        started = time.perf_counter()
        losses: list[float] = []
        completed = True
        try:
            for step in range(self.sft.steps):
                if self._agree_stop():
                    completed = False
                    log.warning("warm start stopped at step %d of %d; nothing saved", step, self.sft.steps)
                    break
                t0 = time.perf_counter()
                batch = self.stream.next_batch()
                samples = [sample_from_trajectory(t, f"sft-{step}-{i}") for i, t in enumerate(batch)]
                metrics = self.trainer.train_step(samples)
                losses.append(metrics["loss"])
                if self.rank == 0:
                    self._record(step, metrics, samples, time.perf_counter() - t0, started)
            report: dict[str, Any] = {"completed": completed, "steps": len(losses),
                                      "seconds": time.perf_counter() - started, "world_size": self.world_size}
            if completed:
                state = gather_full_state_dict(self.trainer.model)  # a collective: every rank
                if self.rank == 0:
                    files = save_hf_folder(to_checkpoint_names(self.trainer.model, state), self.model_path, out_dir,
                                           dtype)
                    report["files"] = files
                    log.info("warm start saved to %s (%d steps, %.0fs)", out_dir, len(losses), report["seconds"])
            if losses:
                report.update(first_loss=losses[0], final_loss=float(np.mean(losses[-10:])))
            return report
        finally:
            self.close()

    def drain_metrics(self) -> list[dict[str, float]]:
        with self._lock:
            rows, self._rows = self._rows, []
        return rows

    def stop(self) -> None:
        """End `run` after the current step (ranks agree on the step); nothing is saved. Does not block."""
        self._stop.set()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def _agree_stop(self) -> bool:
        flag = torch.tensor([float(self._stop.is_set())], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _record(self, step: int, metrics: Mapping[str, float], samples: list[Sample], seconds: float,
                started: float) -> None:
        tokens = float(sum(s.num_tokens for s in samples))
        row = {"step": float(step + 1), "sft_steps": float(self.sft.steps), "loss": metrics["loss"],
               "grad_norm": metrics["grad_norm"], "lr": metrics["lr"], "loss_tokens": metrics["loss_tokens"],
               "seq_tokens": tokens, "model_tokens": metrics["model_tokens"], "micro_batches": metrics["micro_batches"],
               "entropy": metrics["entropy"], "skipped_nonfinite": metrics["skipped_nonfinite"],
               "vision_phase": float(step < self.sft.vision_steps), "step_time_s": seconds,
               "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
               "wall_time_s": time.perf_counter() - started}
        with self._lock:
            self._rows.append(row)
        if step % 50 == 0 or step == self.sft.steps - 1:
            log.info("warm start step %d/%d loss %.4f lr %.2e (%.1fs)", step + 1, self.sft.steps, row["loss"],
                     row["lr"], row["wall_time_s"])


# ----------------------------------------------------------------------------------------------- local runner

def _sft_rank(rank: int, world_size: int, port: int, model_path: str, world_root: str, cfg: dict, out_dir: str,
              dtype: str, out: Any, stop: Any) -> None:
    logging.basicConfig(level=os.environ.get("FORAGE_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s sft-rank{rank} %(name)s %(levelname)s %(message)s")
    role = SftRank(rank, world_size, "127.0.0.1", port, model_path, world_root, cfg)
    finished = threading.Event()

    def watch() -> None:  # the role's second caller (as Ray's would be): metrics out, the parent's stop in
        while not finished.is_set():
            if stop.wait(0.5):
                role.stop()
                return
            if rank == 0:
                for row in role.drain_metrics():
                    out.put(("row", row))

    watcher = threading.Thread(target=watch, name="sft-watch")
    watcher.start()
    try:
        report = role.run(out_dir, dtype)
    finally:
        finished.set()
        watcher.join()
    if rank == 0:
        for row in role.drain_metrics():
            out.put(("row", row))
        out.put(("report", report))


def run_sft_local(model_path: Path | str, world_root: Path | str, out_dir: Path | str, cfg: Mapping[str, Any],
                  dtype: str = "float32", on_row: Optional[Callable[[dict], None]] = None) -> dict[str, Any]:
    """Spawn `cfg["learner"]["world_size"]` SftRank processes (gloo on 127.0.0.1), train, save to `out_dir`.
    Returns rank 0's report; raises RuntimeError if a rank fails or the run was stopped (Ctrl-C: KeyboardInterrupt)."""
    cfg = {"learner": dict(cfg.get("learner") or {}), "sft": dict(cfg.get("sft") or {})}
    SftConfig.from_dict(cfg["sft"])  # fail here, not in every rank
    world_size = int(LearnerConfig.from_dict(cfg["learner"]).world_size)
    port = free_port()
    ctx = mp.get_context("spawn")
    out, stop = ctx.Queue(), ctx.Event()
    ranks = [ctx.Process(target=_sft_rank, name=f"sft-rank{r}",
                         args=(r, world_size, port, str(model_path), str(world_root), cfg, str(out_dir), dtype, out,
                               stop)) for r in range(world_size)]
    for process in ranks:
        process.start()
    report: Optional[dict] = None
    try:
        while report is None and any(p.is_alive() for p in ranks):
            try:
                kind, value = out.get(timeout=1.0)
            except queue_module.Empty:
                if any(p.exitcode not in (None, 0) for p in ranks):
                    break
                continue
            if kind == "row" and on_row is not None:
                on_row(value)
            elif kind == "report":
                report = value
    finally:
        stop.set()
        for process in ranks:
            process.join(120)
            if process.is_alive():
                log.error("warm-start rank %s did not exit; terminating it", process.name)
                process.terminate()
                process.join(10)
    failed = {p.name: p.exitcode for p in ranks if p.exitcode}
    if report is None or failed:
        raise RuntimeError(f"warm start failed: rank exit codes {failed or 'all 0'}, report {report}")
    if not report["completed"]:
        raise RuntimeError(f"warm start stopped after {report['steps']} of {cfg['sft'].get('steps')} steps")
    return report


def lr_schedule(cfg: SftConfig) -> list[float]:
    """The lr of every step (what `learner.trainer.lr_factor` gives for this config): for docs and tests."""
    from learner.trainer import lr_factor

    base = cfg.learner_config(LearnerConfig(world_size=1))
    return [cfg.lr * lr_factor(s, base.warmup_steps, base.lr_schedule, base.decay_steps, base.min_lr_ratio)
            for s in range(cfg.steps)]
