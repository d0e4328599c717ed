"""From received TrajectoryGroups to training samples: validation on receipt, samples with GRPO advantages, group
staleness, the wire form of a step's batch (rank 0 → all ranks) and per-step rollout statistics.

Tool outages: an episode flagged `tool_failed` (a tool call failed for infrastructure reasons and ended it) is
trained *without*, not replayed: its group's advantages are computed over the other episodes, it becomes no sample
(zero loss weight, no tokens in the loss's denominator) and it stays out of the reward statistics. A group left
with fewer than MIN_SCORED_EPISODES unflagged episodes has no contrast to learn from and is dropped, counted
(`split_tool_failed`). A replay would only meet the same outage again, and wait for the tool to come back.

Planning and collation of the samples into model inputs live in learner/packing.py.
"""
from __future__ import annotations

from typing import Sequence

import msgspec
import numpy as np
import torch

from learner.admission import spans_versions, token_staleness
from learner.advantages import grpo_advantages
from learner.config import AlgoConfig
from learner.packing import Sample
from protocol import ProtocolError, Trajectory, TrajectoryGroup, decode, encode, from_ndarray
from protocol.images import ImageError, image_size

MIN_SCORED_EPISODES = 2  # a group with tool_failed episodes needs this many others to be trained


class InvalidGroup(ValueError):
    """A received group cannot be trained on; the message says which trajectory and why."""


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
                width, height = image_size(data)
            except ImageError as exc:
                raise InvalidGroup(f"{where} image {j}: unreadable ({exc})") from exc
            if width * height > max_image_pixels:
                raise InvalidGroup(f"{where} image {j}: {width}x{height} exceeds {max_image_pixels} pixels")


def scored(group: TrajectoryGroup) -> list[Trajectory]:
    """The group's episodes that count: all but those a tool outage ended (`tool_failed`)."""
    return [traj for traj in group.trajectories if not traj.tool_failed]


def split_tool_failed(groups: Sequence[TrajectoryGroup]
                      ) -> tuple[list[TrajectoryGroup], list[TrajectoryGroup]]:
    """(groups to train, groups to drop): a group with tool_failed episodes and fewer than MIN_SCORED_EPISODES
    others is dropped; every other group is trained (its flagged episodes left out by `samples_from_groups`)."""
    keep, drop = [], []
    for group in groups:
        usable = len(scored(group))
        (drop if usable < len(group.trajectories) and usable < MIN_SCORED_EPISODES else keep).append(group)
    return keep, drop


def samples_from_groups(groups: Sequence[TrajectoryGroup], algo: AlgoConfig) -> list[Sample]:
    """Flatten groups into samples (group order, then trajectory order) with GRPO advantages over each group's
    scored episodes; tool_failed episodes become no sample at all."""
    rewards, group_index, samples = [], [], []
    for g, group in enumerate(groups):
        for traj in scored(group):
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


def group_staleness(group: TrajectoryGroup, version: int) -> int:
    """The largest lag `version − v_t` over the group's generated tokens (0 when it has none): how many versions
    behind the policy being updated its oldest token is. Admission keeps this <= max_staleness in steady state."""
    lag = 0
    for traj in group.trajectories:
        lags = token_staleness(version, from_ndarray(traj.versions), from_ndarray(traj.loss_mask))
        if lags.size:
            lag = max(lag, int(lags.max()))
    return lag


def split_stale(groups: Sequence[TrajectoryGroup], version: int,
                max_staleness: int) -> tuple[list[TrajectoryGroup], list[TrajectoryGroup]]:
    """(fresh, stale): stale groups have a token more than `max_staleness` versions behind `version`."""
    fresh, stale = [], []
    for group in groups:
        (stale if group_staleness(group, version) > max_staleness else fresh).append(group)
    return fresh, stale


class StaleGroupError(RuntimeError):
    """algo.stale_policy=error and a group older than max_staleness reached the trainer."""


def apply_stale_policy(groups: Sequence[TrajectoryGroup], version: int, max_staleness: int,
                       policy: str) -> tuple[list[TrajectoryGroup], list[TrajectoryGroup]]:
    """(groups to train, stale groups dropped) under `policy` for groups taken at `version`:
    drop_counted → train the fresh ones, drop the stale ones; train → train all (the stale ones too);
    error → raise StaleGroupError naming the stale groups (when there are any)."""
    fresh, stale = split_stale(groups, version, max_staleness)
    if not stale or policy == "train":
        return list(groups), []
    if policy == "drop_counted":
        return fresh, stale
    if policy == "error":
        raise StaleGroupError(f"groups {[g.group_id for g in stale]} are more than max_staleness={max_staleness} "
                              f"versions behind version {version} (algo.stale_policy=error)")
    raise ValueError(f"unknown stale policy {policy!r}; expected drop_counted, train or error")


# --------------------------------------------------------------------------------- wire form of a step's batch

def pack_groups(groups: Sequence[TrajectoryGroup]) -> bytes:
    """One msgpack blob (a list of encoded groups) to broadcast from rank 0; no pickle."""
    return msgspec.msgpack.encode([encode(g) for g in groups])


def unpack_groups(blob: bytes) -> list[TrajectoryGroup]:
    return [decode(frame, TrajectoryGroup) for frame in msgspec.msgpack.decode(blob, type=list[bytes])]


# ------------------------------------------------------------------------------------------------ batch metrics

def batch_stats(groups: Sequence[TrajectoryGroup], version: int, max_staleness: int = 0) -> dict[str, float]:
    """Rollout statistics of one step's groups; staleness is relative to `version`, the policy being updated.

    The token-lag histogram has one key per lag, `staleness_hist_K` = generated tokens sampled K versions behind,
    always for K = 0..max_staleness (stable columns) and for any larger lag present; `stale_tokens` counts the
    tokens beyond max_staleness (non-zero only when stale groups were trained, stale_policy=train).
    Per search label L of the step's groups: `search_ratio_L` and `accuracy_L` (the launch plots read them).

    `trajectories`, tokens, searches, tool errors, staleness and the search ratios count every episode of the
    groups (a tool_failed episode did decide to search: that is where the outage met it); reward_mean, accuracy and
    zero_std_groups only the scored ones (an outage must not read as a worse policy); `tool_failed_masked` counts
    the tool_failed episodes left out of the loss."""
    trajectories = [t for g in groups for t in g.trajectories]
    kept = [t for g in groups for t in scored(g)]
    n, n_all = max(len(kept), 1), max(len(trajectories), 1)
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
        "reward_mean": float(sum(t.reward for t in kept) / n),
        "accuracy": float(sum(t.reward_parts.get("accuracy", 0.0) for t in kept) / n),
        "search_ratio": float(sum(1 for t in trajectories if t.image_searches + t.text_searches > 0) / n_all),
        "image_searches": float(sum(t.image_searches for t in trajectories)),
        "text_searches": float(sum(t.text_searches for t in trajectories)),
        "tool_errors": float(sum(t.tool_errors for t in trajectories)),
        "staleness_mean": float(lag.mean()) if lag.size else 0.0,
        "staleness_max": float(lag.max()) if lag.size else 0.0,
        "multi_version_trajectories": float(multi_version),
        "zero_std_groups": float(sum(1 for g in groups if len({t.reward for t in scored(g)}) <= 1)),
        "tool_failed_masked": float(len(trajectories) - len(kept)),
    }
    for label in sorted({g.search_label for g in groups if g.search_label}):  # e.g. search_free / search_required
        everyone = [t for g in groups if g.search_label == label for t in g.trajectories]
        members = [t for g in groups if g.search_label == label for t in scored(g)]
        stats[f"search_ratio_{label}"] = float(
            sum(1 for t in everyone if t.image_searches + t.text_searches > 0) / max(len(everyone), 1))
        stats[f"accuracy_{label}"] = float(sum(t.reward_parts.get("accuracy", 0.0) for t in members)
                                           / max(len(members), 1))
    counts = np.bincount(lag, minlength=max_staleness + 1) if lag.size else np.zeros(max_staleness + 1, np.int64)
    for k, count in enumerate(counts):
        stats[f"staleness_hist_{k}"] = float(count)
    stats["stale_tokens"] = float((lag > max_staleness).sum()) if lag.size else 0.0
    return stats

