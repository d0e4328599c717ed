"""GRPO advantages: each trajectory's reward relative to the other samples of its prompt group. Pure, no I/O.

For a group g with rewards r_1..r_G (G samples of one prompt):

    mean_g = (1/G) Σ_i r_i
    std_g  = sqrt( Σ_i (r_i − mean_g)² / (G − 1) )          (Bessel-corrected; 0 when G = 1)
    A_i    = (r_i − mean_g) / (std_g + ε)                   std_normalize=True  (GRPO, DeepSeekMath)
    A_i    =  r_i − mean_g                                   std_normalize=False (Dr. GRPO: no std scaling)

A group whose rewards are all equal carries no signal: its advantages are exactly 0 (computed explicitly, so that
floating-point noise in `r − mean` is not blown up by 1/ε).
"""
from __future__ import annotations

import torch


def grpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    eps: float = 1e-6,
    std_normalize: bool = True,
) -> torch.Tensor:
    """Group-normalised advantages, one per trajectory.

    rewards:   float [N], one scalar reward per trajectory.
    group_ids: int [N], trajectories with the same id form one group (any ids, any order).
    Returns float32 [N]. Raises ValueError on shape mismatch or non-finite rewards.
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must be 1-D of equal length, got {tuple(rewards.shape)} and "
            f"{tuple(group_ids.shape)}"
        )
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    rewards = rewards.to(torch.float64)
    if not torch.isfinite(rewards).all():
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()
        raise ValueError(f"non-finite reward(s) at positions {bad}")
    advantages = torch.zeros_like(rewards)
    for gid in torch.unique(group_ids):
        members = group_ids == gid
        r = rewards[members]
        if r.numel() < 2 or bool(r.max() == r.min()):
            continue  # no within-group contrast: zero advantage
        centred = r - r.mean()
        advantages[members] = centred / (r.std(unbiased=True) + eps) if std_normalize else centred
    return advantages.to(torch.float32)
