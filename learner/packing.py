"""From samples to model inputs: the rank/micro-batch plan (gradient accumulation to a token budget) and collation,
either packed (several trajectories in one row, block-diagonal attention) or padded (one trajectory per row).

Token ids are exactly what the engine consumed and produced, with each image's placeholder already expanded to
grid_t·grid_h·grid_w / merge² `<|image_pad|>` tokens (4 for a 56×56 image), so collation never re-tokenises: it
only runs the image processor and checks that the placeholder counts agree with the processed grids.

Packing (transformers 5.19, Qwen2-VL / Qwen2.5-VL): the trajectories of a micro-batch are concatenated into one row
with no attention mask and `position_ids` of shape [4, 1, L]: row 0 holds text positions that restart at 0 for each
trajectory — the model derives its block-diagonal causal mask from those restarts (`find_packed_sequence_indices`;
flash-attention varlen on GPU) — and rows 1–3 hold each trajectory's own 3-D M-RoPE positions, computed with the
model's `get_rope_index` on that trajectory alone. Image features are scattered into placeholder tokens in order,
so the images of all packed trajectories are processed together. Checked: packed log-probs equal padded ones
(max |Δ| ~1e-6 on the tiny Qwen2.5-VL; tests/learner/test_learner_packing.py).

Every micro-batch carries at least one image (a masked dummy segment or row when it has none) because FSDP2 needs
every rank to run the same modules — the vision tower included — in every forward. A first token of a trajectory is
never a loss token (validated on receipt), so the cross-trajectory "prediction" at a packed boundary is never scored.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from protocol.images import decode_image, encode_png

# (input_ids [1, n], mm_token_type_ids [1, n], image_grid_thw [k, 3] | None) -> (positions [3, 1, n], deltas)
RopeIndex = Callable[..., tuple[torch.Tensor, torch.Tensor]]


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
    """Tensors of one forward/backward.

    Model inputs are [R, L] rows: R = 1 packed row, or one row per sample (+ a dummy-image row) when padded.
    Per-sample tensors are [S, T] (T = the longest sample): `token_index` maps sample s, token t to its position in
    the flattened [R·L] model output, so the loss sees the same [S, T] layout in both modes.
    """

    input_ids: torch.Tensor  # long [R, L]
    attention_mask: Optional[torch.Tensor]  # long [R, L] (padded) | None (packed)
    position_ids: Optional[torch.Tensor]  # long [4, R, L] (packed) | None (the model computes them)
    mm_token_type_ids: torch.Tensor  # int [R, L], 1 on image tokens
    pixel_values: torch.Tensor  # float [patches, C·t·p·p]
    image_grid_thw: torch.Tensor  # long [images, 3]
    token_index: torch.Tensor  # long [S, T]
    loss_mask: torch.Tensor  # bool [S, T]
    behav_logp: torch.Tensor  # float [S, T]
    advantages: torch.Tensor  # float [S]
    num_samples: int

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    @property
    def model_tokens(self) -> int:
        """Tokens the model actually computes (padding included when padded)."""
        return int(self.input_ids.numel())

    def model_inputs(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        inputs = {
            "input_ids": self.input_ids.to(device),
            "mm_token_type_ids": self.mm_token_type_ids.to(device),
            "pixel_values": self.pixel_values.to(device, dtype),
            "image_grid_thw": self.image_grid_thw.to(device),
        }
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask.to(device)
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids.to(device)
        return inputs


@dataclass(frozen=True)
class StepPlan:
    """What one rank trains on in one step; identical micro-batch counts on every rank (FSDP2 lock-step)."""

    micro_batches: list[list[int]]  # sample indices per micro-batch ([] = dummy-only micro-batch)
    total_tokens: int  # loss-mask tokens in the whole batch (all ranks): the token_mean denominator
    total_seqs: int  # trajectories with >= 1 loss token in the whole batch: the seq_mean denominator


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


def plan_micro_batches(indices: Sequence[int], lengths: Sequence[int], max_tokens: int,
                       packed: bool = False) -> list[list[int]]:
    """Group samples (longest first) into micro-batches within the token budget; a longer sample rides alone.

    packed: first-fit decreasing on Σ lengths <= max_tokens (what a packed row computes).
    padded: consecutive in length order while rows × longest row <= max_tokens (what a padded batch computes).
    Gradients accumulate over the micro-batches, so the budget bounds activation memory, not the batch size."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(indices, key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    if packed:
        loads: list[int] = []
        for index in order:
            for b, load in enumerate(loads):
                if load + lengths[index] <= max_tokens:
                    batches[b].append(index)
                    loads[b] += lengths[index]
                    break
            else:
                batches.append([index])
                loads.append(lengths[index])
        return batches
    for index in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def plan_step(samples: Sequence[Sample], world_size: int, rank: int, micro_batch_tokens: int,
              packed: bool = False) -> StepPlan:
    """This rank's micro-batches, padded with empty ones to the largest count of any rank."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    lengths = [s.num_tokens for s in samples]
    shares = assign_to_ranks(lengths, world_size)
    per_rank = [plan_micro_batches(share, lengths, micro_batch_tokens, packed) for share in shares]
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
    return encode_png(Image.new("RGB", (side, side)))


class Collator:
    """Turns samples into a MicroBatch with the model's image processor and special-token ids.

    `rope_index` is the model's `get_rope_index` (Qwen2-VL / Qwen2.5-VL `model.model.get_rope_index`); packing
    needs it to give each packed trajectory its own M-RoPE positions."""

    def __init__(self, image_processor: Any, image_token_id: int, pad_token_id: int,
                 rope_index: Optional[RopeIndex] = None, packed: bool = False) -> None:
        if packed and rope_index is None:
            raise ValueError("packed collation needs the model's rope_index (model.model.get_rope_index)")
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.pad_token_id = pad_token_id
        self.rope_index = rope_index
        self.packed = packed
        # transformers 5.19 marks image tokens with mm_token_type_ids; older 5.x find them by token id instead.
        self._rope_takes_types = rope_index is not None and "mm_token_type_ids" in inspect.signature(
            rope_index).parameters
        self.merge = int(getattr(image_processor, "merge_size", 2))
        self._dummy = dummy_image_bytes()
        self._dummy_tokens = int(self._process([self._dummy])[1].prod(-1).sum()) // self.merge**2

    def _process(self, images: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
        pil = [decode_image(data) for data in images]
        out = self.image_processor(images=pil, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"].to(torch.long)

    def __call__(self, samples: Sequence[Sample]) -> MicroBatch:
        rows = [s.input_ids for s in samples]
        images = [image for s in samples for image in s.images]
        image_counts = [len(s.images) for s in samples]
        if images:
            pixel_values, grid_thw = self._process(images)
            tokens_per_image = (grid_thw.prod(-1) // self.merge**2).tolist()
            self._check_placeholders(samples, tokens_per_image)
        else:
            pixel_values, grid_thw = self._process([self._dummy])
            rows = rows + [np.full(self._dummy_tokens, self.image_token_id, dtype=np.int64)]
            image_counts = image_counts + [1]
        width = max([s.num_tokens for s in samples] + [1])
        loss_mask = torch.zeros((len(samples), width), dtype=torch.bool)
        behav = torch.zeros((len(samples), width), dtype=torch.float32)
        advantages = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
        for r, s in enumerate(samples):
            loss_mask[r, : s.num_tokens] = torch.from_numpy(s.loss_mask)
            behav[r, : s.num_tokens] = torch.from_numpy(s.behav_logp)
        if self.packed:
            model_part = self._packed_inputs(rows, image_counts, grid_thw)
        else:
            model_part = self._padded_inputs(rows)
        input_ids, attention, position_ids, starts, row_width = model_part
        token_index = torch.zeros((len(samples), width), dtype=torch.long)
        for r, s in enumerate(samples):
            token_index[r, : s.num_tokens] = starts[r] + torch.arange(s.num_tokens)
        valid = attention.bool() if attention is not None else torch.ones_like(input_ids, dtype=torch.bool)
        mm_token_type_ids = ((input_ids == self.image_token_id) & valid).to(torch.int32)
        return MicroBatch(input_ids, attention, position_ids, mm_token_type_ids, pixel_values, grid_thw,
                          token_index, loss_mask, behav, advantages, num_samples=len(samples))

    def _padded_inputs(self, rows: list[np.ndarray]):
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            input_ids[r, : len(row)] = torch.from_numpy(row)
            attention[r, : len(row)] = 1
        starts = [r * width for r in range(len(rows))]
        return input_ids, attention, None, starts, width

    def _packed_inputs(self, rows: list[np.ndarray], image_counts: list[int], grid_thw: torch.Tensor):
        assert self.rope_index is not None
        text_positions, mrope_positions, starts = [], [], []
        cursor, image_cursor = 0, 0
        for row, count in zip(rows, image_counts):
            ids = torch.from_numpy(row).unsqueeze(0)
            grids = grid_thw[image_cursor: image_cursor + count] if count else None
            image_cursor += count
            types = (ids == self.image_token_id).to(torch.int32)
            extra = {"mm_token_type_ids": types} if self._rope_takes_types else {}
            positions, _ = self.rope_index(ids, image_grid_thw=grids, **extra)
            mrope_positions.append(positions.to(torch.long))
            text_positions.append(torch.arange(len(row), dtype=torch.long).view(1, 1, -1))
            starts.append(cursor)
            cursor += len(row)
        input_ids = torch.from_numpy(np.concatenate(rows)).to(torch.long).unsqueeze(0)
        position_ids = torch.cat([torch.cat(text_positions, dim=-1), torch.cat(mrope_positions, dim=-1)], dim=0)
        return input_ids, None, position_ids, starts, cursor

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
