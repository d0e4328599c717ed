"""Test support for tests/learner: a tiny Qwen2.5-VL built from config (no downloads), synthetic trajectory groups,
and the process entry points of the multi-process tests (importable by spawned children)."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from protocol import Trajectory, TrajectoryGroup, to_ndarray

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]


def build_tiny_vlm(path: Path) -> dict[str, int]:
    """Write a ~180k-parameter Qwen2.5-VL (tied embeddings, 2+2 layers) with a local BPE tokenizer and a
    56×56-friendly image processor into `path`; return the special-token ids."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["the red square is a shape", "search for the blue circle answer reason"] * 10,
                                  trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {s: tokenizer.token_to_id(s) for s in SPECIALS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           window_size=56, fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    fast.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56 * 4).save_pretrained(path)
    ids["vocab_size"] = tokenizer.get_vocab_size()
    return ids


def png(color: tuple[int, int, int], side: int = 56) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), color).save(buffer, format="PNG")
    return buffer.getvalue()


def make_trajectory(rng: np.random.Generator, ids: dict[str, int], *, reward: float, with_image: bool = True,
                    prompt_len: int = 6, gen_len: int = 5, versions: Optional[Sequence[int]] = None,
                    searches: tuple[int, int] = (0, 0), accuracy: float = 0.0) -> Trajectory:
    """prompt [vision_start, 4×image_pad, vision_end]? + text, then `gen_len` generated tokens."""
    text_lo = len(SPECIALS)
    vocab = ids["vocab_size"]
    prompt = [ids["<|im_start|>"]]
    if with_image:
        prompt += [ids["<|vision_start|>"]] + [ids["<|image_pad|>"]] * 4 + [ids["<|vision_end|>"]]
    prompt += rng.integers(text_lo, vocab, prompt_len).tolist()
    generated = rng.integers(text_lo, vocab, gen_len).tolist()
    tokens = np.array(prompt + generated, dtype=np.int32)
    mask = np.array([0] * len(prompt) + [1] * gen_len, dtype=np.uint8)
    logp = np.where(mask == 1, -rng.uniform(0.5, 6.0, len(tokens)), 0.0).astype(np.float32)
    token_versions = np.full(len(tokens), -1, dtype=np.int32)
    token_versions[len(prompt):] = list(versions) if versions is not None else [0] * gen_len
    return Trajectory(
        token_ids=to_ndarray(tokens), loss_mask=to_ndarray(mask), behaviour_logprobs=to_ndarray(logp),
        versions=to_ndarray(token_versions),
        images=[png(tuple(rng.integers(0, 255, 3).tolist()))] if with_image else [],
        reward=reward, reward_parts={"accuracy": accuracy}, image_searches=searches[0], text_searches=searches[1],
    )


def make_group(group_id: str, ids: dict[str, int], seed: int = 0, rewards: Sequence[float] = (1.0, 0.0, 0.0, 1.0),
               with_image: bool = True, gen_len: int = 5) -> TrajectoryGroup:
    rng = np.random.default_rng(seed)
    trajectories = [
        make_trajectory(rng, ids, reward=r, with_image=with_image and i % 2 == 0, gen_len=gen_len + i,
                        accuracy=float(r > 0.5), searches=(i % 2, 0))
        for i, r in enumerate(rewards)
    ]
    return TrajectoryGroup(group_id=group_id, actor_id="test-actor", prompt_id=f"p-{group_id}",
                           trajectories=trajectories)


def quiet_child() -> None:
    """Settings for spawned test processes: one thread, offline, no tokenizer parallelism."""
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


# ------------------------------------------------------------------------------------ multi-process entry points

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, world_size: int, port: int, model_path: str, cfg: dict, queue, done) -> None:
    """One LearnerRank: publish v0, then `run(cfg['steps'])`. Rank 0 streams metrics rows to `queue` from a
    second thread (as the Ray wrapper would) and calls `stop()` there once the test sets `done`."""
    quiet_child()
    import threading

    from learner.role import LearnerRank

    try:
        learner = LearnerRank(rank, world_size, "127.0.0.1", port, model_path, cfg)
        learner.publish_initial()
        if rank == 0:
            queue.put(("endpoints", learner.endpoints()))

            def watch() -> None:
                skipped = 0.0
                while not done.wait(0.05):
                    rows = learner.drain_metrics()
                    if rows:
                        queue.put(("metrics", rows))
                    if learner.metrics.counter("batches_skipped") > skipped:
                        skipped = learner.metrics.counter("batches_skipped")
                        queue.put(("skipped", skipped))
                learner.stop()

            threading.Thread(target=watch, daemon=True).start()
        learner.run(cfg.get("steps", 1))
        if rank == 0:
            queue.put(("stopped", learner.version))
        learner.stop()
    except BaseException as exc:  # report to the test instead of hanging it
        queue.put(("error", f"rank {rank}: {type(exc).__name__}: {exc}"))
        raise


def reference_main(port: int, model_path: str, cfg: dict, blob: bytes, out_path: str) -> None:
    """A 1-process FSDP world trains the same groups in one step; saves the checkpoint-named weights."""
    quiet_child()
    import torch.distributed as dist
    from safetensors.torch import save_file

    from learner.batch import samples_from_groups, unpack_groups
    from learner.config import AlgoConfig, LearnerConfig
    from learner.role import join_world
    from learner.trainer import Trainer
    from learner.weights import gather_full_state_dict, to_checkpoint_names

    learner_cfg = LearnerConfig.from_dict({**cfg["learner"], "world_size": 1})
    listen = join_world(learner_cfg, "127.0.0.1", port, 0, 1)
    try:
        algo = AlgoConfig.from_dict(cfg["algo"])
        trainer = Trainer(model_path, learner_cfg, algo)
        trainer.train_step(samples_from_groups(unpack_groups(blob), algo))
        state = to_checkpoint_names(trainer.model, gather_full_state_dict(trainer.model))
        save_file({k: v.contiguous() for k, v in state.items()}, out_path)
    finally:
        dist.destroy_process_group()
        listen.close()
