"""From TrajectoryGroups to model inputs: validation on receipt, samples with advantages, the rank/micro-batch plan,
and collation (padding, image processing, `mm_token_type_ids`).

Token ids are exactly what the engine consumed and produced, with each image's placeholder already expanded to
grid_t·grid_h·grid_w / merge² `<|image_pad|>` tokens (4 for a 56×56 image), so collation never re-tokenises:
it only runs the image processor and checks that the placeholder counts agree with the processed grids.
Every micro-batch carries at least one image (a masked dummy row when it has none) because FSDP2 needs every
rank to run the same modules — the vision tower included — in every forward.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Sequence

import msgspec
import numpy as np
import torch
from PIL import Image

from learner.admission import spans_versions, token_staleness
from learner.advantages import grpo_advantages
from learner.config import AlgoConfig
from protocol import ProtocolError, TrajectoryGroup, decode, encode, from_ndarray


class InvalidGroup(ValueError):
    """A received group cannot be trained on; the message says which trajectory and why."""


class ImageTokenMismatch(ValueError):
    """The number of image placeholder tokens disagrees with what the image processor made of the images."""


@dataclass
class Sample:
    """One trajectory ready for collation; per-token arrays share length T."""

    group_id: str
    input_ids: np.ndarray  # int64 [T]
    loss_mask: np.ndarray  # bool [T]
    behav_logp: np.ndarray  # float32 [T]
    versions: np.ndarray  # int32 [T]
    advantage: float
    images: list[bytes] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class MicroBatch:
    """Padded tensors of one forward/backward. Rows beyond `num_samples` are the masked dummy-image row."""

    input_ids: torch.Tensor  # long [B, T]
    attention_mask: torch.Tensor  # long [B, T]
    mm_token_type_ids: torch.Tensor  # int [B, T], 1 on image tokens
    pixel_values: torch.Tensor  # float [patches, C·t·p·p]
    image_grid_thw: torch.Tensor  # long [images, 3]
    loss_mask: torch.Tensor  # bool [B, T]
    behav_logp: torch.Tensor  # float [B, T]
    advantages: torch.Tensor  # float [B]
    num_samples: int

    def model_inputs(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids.to(device),
            "attention_mask": self.attention_mask.to(device),
            "mm_token_type_ids": self.mm_token_type_ids.to(device),
            "pixel_values": self.pixel_values.to(device, dtype),
            "image_grid_thw": self.image_grid_thw.to(device),
        }


@dataclass(frozen=True)
class StepPlan:
    """What one rank trains on in one step; identical micro-batch counts on every rank (FSDP2 lock-step)."""

    micro_batches: list[list[int]]  # sample indices per micro-batch ([] = dummy-only micro-batch)
    total_tokens: int  # loss-mask tokens in the whole batch (all ranks): the token_mean denominator
    total_seqs: int  # trajectories with >= 1 loss token in the whole batch: the seq_mean denominator


# ------------------------------------------------------------------------------------------- receipt and samples

def validate_group(
    group: TrajectoryGroup,
    *,
    vocab_size: int,
    image_token_id: int,
    max_version: int,
    max_image_pixels: int,
) -> None:
    """Check what the codec cannot: ids in vocabulary, a 0/1 mask, finite log-probs <= 0 on generated tokens,
    versions in [0, max_version] there, one placeholder run per image and readable images. Raises InvalidGroup."""
    if not group.trajectories:
        raise InvalidGroup(f"group {group.group_id}: no trajectories")
    for i, traj in enumerate(group.trajectories):
        where = f"group {group.group_id} trajectory {i}"
        try:
            ids = from_ndarray(traj.token_ids, what=f"{where} token_ids")
            mask = from_ndarray(traj.loss_mask, what=f"{where} loss_mask")
            logp = from_ndarray(traj.behaviour_logprobs, what=f"{where} behaviour_logprobs")
            versions = from_ndarray(traj.versions, what=f"{where} versions")
        except ProtocolError as exc:
            raise InvalidGroup(str(exc)) from exc
        lengths = {a.shape for a in (ids, mask, logp, versions)}
        if len(lengths) != 1 or ids.ndim != 1:
            raise InvalidGroup(f"{where}: per-token arrays differ in length or are not 1-D: {sorted(lengths)}")
        if ids.size == 0:
            raise InvalidGroup(f"{where}: empty token_ids")
        if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= vocab_size:
            raise InvalidGroup(
                f"{where}: token ids ({ids.dtype}) span [{ids.min()}, {ids.max()}], vocabulary is [0, {vocab_size})"
            )
        if not np.isin(mask, (0, 1)).all():
            raise InvalidGroup(f"{where}: loss_mask holds values {sorted(set(np.unique(mask).tolist()))}, not 0/1")
        generated = mask.astype(bool)
        if generated[0]:
            raise InvalidGroup(f"{where}: the first token is marked generated; it has no context to score it")
        gen_logp = logp[generated].astype(np.float64)
        if not np.isfinite(gen_logp).all() or (gen_logp > 1e-4).any():
            raise InvalidGroup(f"{where}: behaviour log-probs must be finite and <= 0 on generated tokens")
        gen_versions = versions[generated]
        if gen_versions.size and (gen_versions.min() < 0 or gen_versions.max() > max_version):
            raise InvalidGroup(
                f"{where}: generated-token versions span [{gen_versions.min()}, {gen_versions.max()}], "
                f"expected within [0, {max_version}]"
            )
        is_pad = ids == image_token_id
        runs = int(is_pad[0]) + int(np.count_nonzero(is_pad[1:] & ~is_pad[:-1]))
        if runs != len(traj.images):
            raise InvalidGroup(f"{where}: {runs} image placeholder run(s) but {len(traj.images)} image(s)")
        if (generated & is_pad).any():
            raise InvalidGroup(f"{where}: image placeholder tokens are marked generated")
        for j, data in enumerate(traj.images):
            try:
                with Image.open(io.BytesIO(data)) as image:
                    width, height = image.size
            except Exception as exc:  # PIL raises many types for bad bytes
                raise InvalidGroup(f"{where} image {j}: unreadable ({type(exc).__name__}: {exc})") from exc
            if width * height > max_image_pixels:
                raise InvalidGroup(f"{where} image {j}: {width}x{height} exceeds {max_image_pixels} pixels")


def samples_from_groups(groups: Sequence[TrajectoryGroup], algo: AlgoConfig) -> list[Sample]:
    """Flatten groups into samples (group order, then trajectory order) with GRPO advantages."""
    rewards, group_index, samples = [], [], []
    for g, group in enumerate(groups):
        for traj in group.trajectories:
            rewards.append(traj.reward)
            group_index.append(g)
            samples.append(
                Sample(
                    group_id=group.group_id,
                    input_ids=from_ndarray(traj.token_ids).astype(np.int64),
                    loss_mask=from_ndarray(traj.loss_mask).astype(bool),
                    behav_logp=from_ndarray(traj.behaviour_logprobs).astype(np.float32),
                    versions=from_ndarray(traj.versions).astype(np.int32),
                    advantage=0.0,
                    images=list(traj.images),
                )
            )
    if samples:
        advantages = grpo_advantages(
            torch.tensor(rewards, dtype=torch.float64), torch.tensor(group_index), algo.eps, algo.std_normalize
        )
        for sample, advantage in zip(samples, advantages.tolist()):
            sample.advantage = advantage
    return samples


# ---------------------------------------------------------------------------------------------------- the plan

def assign_to_ranks(lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Longest-first greedy: each sample goes to the rank with the fewest tokens so far (ties: lowest rank).

    Deterministic, so every rank computes the same assignment from the same batch."""
    loads = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        shares[rank].append(index)
        loads[rank] += lengths[index]
    return shares


def plan_micro_batches(indices: Sequence[int], lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Pack samples (longest first) so that rows × longest row <= max_tokens; a longer sample rides alone."""
    batches: list[list[int]] = []
    for index in sorted(indices, key=lambda i: (-lengths[i], i)):
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def plan_step(samples: Sequence[Sample], world_size: int, rank: int, micro_batch_tokens: int) -> StepPlan:
    """This rank's micro-batches, padded with empty ones to the largest count of any rank."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    lengths = [s.num_tokens for s in samples]
    shares = assign_to_ranks(lengths, world_size)
    per_rank = [plan_micro_batches(share, lengths, micro_batch_tokens) for share in shares]
    count = max(1, max(len(p) for p in per_rank))
    mine = per_rank[rank] + [[] for _ in range(count - len(per_rank[rank]))]
    return StepPlan(
        micro_batches=mine,
        total_tokens=int(sum(int(s.loss_mask.sum()) for s in samples)),
        total_seqs=int(sum(1 for s in samples if s.loss_mask.any())),
    )


# ---------------------------------------------------------------------------------------------------- collation

def dummy_image_bytes(side: int = 56) -> bytes:
    """A black square PNG used to keep the vision tower in every forward (its tokens are never scored)."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


class Collator:
    """Turns samples into a MicroBatch with the model's image processor and special-token ids."""

    def __init__(self, image_processor: Any, image_token_id: int, pad_token_id: int) -> None:
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.pad_token_id = pad_token_id
        self.merge = int(getattr(image_processor, "merge_size", 2))
        self._dummy = dummy_image_bytes()
        self._dummy_tokens = int(self._process([self._dummy])[1].prod(-1).sum()) // self.merge**2

    def _process(self, images: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
        pil = []
        for data in images:
            with Image.open(io.BytesIO(data)) as image:
                pil.append(image.convert("RGB"))
        out = self.image_processor(images=pil, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"].to(torch.long)

    def __call__(self, samples: Sequence[Sample]) -> MicroBatch:
        rows = [s.input_ids for s in samples]
        images = [image for s in samples for image in s.images]
        if images:
            pixel_values, grid_thw = self._process(images)
            tokens_per_image = (grid_thw.prod(-1) // self.merge**2).tolist()
            self._check_placeholders(samples, tokens_per_image)
        else:
            pixel_values, grid_thw = self._process([self._dummy])
            rows = rows + [np.full(self._dummy_tokens, self.image_token_id, dtype=np.int64)]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        behav = torch.zeros((len(rows), width), dtype=torch.float32)
        advantages = torch.zeros(len(rows), dtype=torch.float32)
        for r, row in enumerate(rows):
            input_ids[r, : len(row)] = torch.from_numpy(row)
            attention[r, : len(row)] = 1
        for r, s in enumerate(samples):
            loss_mask[r, : s.num_tokens] = torch.from_numpy(s.loss_mask)
            behav[r, : s.num_tokens] = torch.from_numpy(s.behav_logp)
            advantages[r] = s.advantage
        mm_token_type_ids = ((input_ids == self.image_token_id) & attention.bool()).to(torch.int32)
        return MicroBatch(input_ids, attention, mm_token_type_ids, pixel_values, grid_thw, loss_mask, behav,
                          advantages, num_samples=len(samples))

    def _check_placeholders(self, samples: Sequence[Sample], tokens_per_image: list[int]) -> None:
        cursor = 0
        for s in samples:
            expected = tokens_per_image[cursor: cursor + len(s.images)]
            cursor += len(s.images)
            found = int((s.input_ids == self.image_token_id).sum())
            if found != sum(expected):
                raise ImageTokenMismatch(
                    f"group {s.group_id}: {found} image placeholder tokens but the image processor made "
                    f"{expected} tokens for its {len(s.images)} image(s) (grid_thw.prod()/{self.merge}^2 each)"
                )


# --------------------------------------------------------------------------------- wire form of a step's batch

def pack_groups(groups: Sequence[TrajectoryGroup]) -> bytes:
    """One msgpack blob (a list of encoded groups) to broadcast from rank 0; no pickle."""
    return msgspec.msgpack.encode([encode(g) for g in groups])


def unpack_groups(blob: bytes) -> list[TrajectoryGroup]:
    return [decode(frame, TrajectoryGroup) for frame in msgspec.msgpack.decode(blob, type=list[bytes])]


# ------------------------------------------------------------------------------------------------ batch metrics

def batch_stats(groups: Sequence[TrajectoryGroup], version: int) -> dict[str, float]:
    """Rollout statistics of one step's groups; staleness is relative to `version`, the policy being updated."""
    trajectories = [t for g in groups for t in g.trajectories]
    n = max(len(trajectories), 1)
    lags: list[np.ndarray] = []
    multi_version = 0
    tokens = 0
    for traj in trajectories:
        mask = from_ndarray(traj.loss_mask)
        versions = from_ndarray(traj.versions)
        tokens += int(mask.astype(bool).sum())
        lags.append(token_staleness(version, versions, mask))
        multi_version += int(spans_versions(versions, mask))
    lag = np.concatenate(lags) if lags else np.zeros(0, dtype=np.int64)
    stats = {
        "groups": float(len(groups)),
        "trajectories": float(len(trajectories)),
        "tokens_generated": float(tokens),
        "reward_mean": float(sum(t.reward for t in trajectories) / n),
        "accuracy": float(sum(t.reward_parts.get("accuracy", 0.0) for t in trajectories) / n),
        "search_ratio": float(sum(1 for t in trajectories if t.image_searches + t.text_searches > 0) / n),
        "image_searches": float(sum(t.image_searches for t in trajectories)),
        "text_searches": float(sum(t.text_searches for t in trajectories)),
        "tool_errors": float(sum(t.tool_errors for t in trajectories)),
        "staleness_mean": float(lag.mean()) if lag.size else 0.0,
        "staleness_max": float(lag.max()) if lag.size else 0.0,
        "multi_version_trajectories": float(multi_version),
        "zero_std_groups": float(sum(1 for g in groups if len({t.reward for t in g.trajectories}) <= 1)),
    }
    for k, count in enumerate(np.bincount(lag) if lag.size else []):
        stats[f"staleness_hist_{k}"] = float(count)
    return stats

