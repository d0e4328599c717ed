"""The policy-gradient loss with its off-policy corrections, as one pure function of tensors (no I/O, no model).

Notation, per generated token t of trajectory s (only where the loss mask is 1):
    log π_θ   current policy (`logp`, carries the gradient)
    log π_prox proximal policy: the learner's weights at the start of this step, recomputed without grad
    log μ     behaviour policy: the log-prob the inference engine reported when it sampled the token
    A         the trajectory's advantage (broadcast to its tokens)

Clipped surrogate on a ratio u, with ε_l = clip_low, ε_h = clip_high:
    ℓ_PPO(u) = max( −A·u, −A·clip(u, 1−ε_l, 1+ε_h) )
    dual clip (c = dual_clip > 1, Ye et al. 2020):  ℓ = min(ℓ_PPO, −c·A)  where A < 0, else ℓ_PPO

Per-token loss ℓ_t = w_t · ℓ(u_t), by `correction`:
    decoupled      u = π_θ/π_prox,  w = min(π_prox/μ, is_cap)      (AReaL decoupled PPO, truncated token IS)
    decoupled_mis  as decoupled, and trajectory s is masked out entirely when its geometric-mean ratio
                   ρ_s = exp( mean_t (log π_prox − log μ) ) lies outside [mis_low, mis_high]   (masked IS)
    bypass         u = π_θ/μ,       w = 1                          (no proximal pass: μ is the PPO anchor)
    naive          u = π_θ/π_prox,  w = 1                          (ignores μ: plain PPO as if on-policy)
w never carries a gradient.

Aggregation over the tokens with mask m (m already zero for MIS-masked trajectories in the numerator):
    token_mean           L = Σ_{s,t} m·ℓ / N_tokens                     N_tokens = Σ mask (before MIS)
    seq_mean_token_mean  L = Σ_s ( Σ_t m·ℓ / n_s ) / N_seqs              n_s = Σ_t mask, N_seqs = #{s: n_s > 0}
`total` overrides N_tokens / N_seqs so that micro-batches and ranks can each compute their share of one global
mean (the sum of the shares is the mean over the whole batch).

Metrics (over masked tokens): clip_frac (fraction where a clip bound cut the gradient), is_weight_mean/max (of w),
masked_frac (fraction removed by MIS), approx_kl (k3 estimator  u − 1 − log u  of KL(anchor ‖ π_θ), anchor = π_prox
or μ for bypass), tokens (the count the means are over, for weighting across micro-batches).
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch


class LossConfig(Protocol):
    """The fields `policy_loss` reads; `learner.config.AlgoConfig` provides them."""

    correction: str
    clip_low: float
    clip_high: float
    is_cap: float
    mis_low: float
    mis_high: float
    dual_clip: Optional[float]
    agg: str


def _check_finite(name: str, values: torch.Tensor, mask: torch.Tensor) -> None:
    bad = mask & ~torch.isfinite(values)
    if bool(bad.any()):
        where = torch.nonzero(bad)[:5].tolist()
        raise ValueError(f"policy_loss: non-finite {name} at masked (seq, token) positions {where}")


def policy_loss(
    logp: torch.Tensor,
    prox_logp: Optional[torch.Tensor],
    behav_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    *,
    total: Optional[float] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped, off-policy-corrected policy-gradient loss (formulas in the module docstring).

    logp, prox_logp, behav_logp, mask: [B, T] (prox_logp may be None only for correction="bypass").
    advantages: [B] (one per trajectory) or [B, T]. Returns (scalar loss with grad, metrics of plain floats).
    Raises ValueError on shape mismatch, a missing proximal tensor, or non-finite values under the mask.
    """
    if logp.dim() != 2:
        raise ValueError(f"policy_loss: logp must be [B, T], got shape {tuple(logp.shape)}")
    mask = mask.to(torch.bool)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1).expand_as(logp)
    for name, tensor in (("behav_logp", behav_logp), ("advantages", advantages), ("mask", mask)) + (
        (("prox_logp", prox_logp),) if prox_logp is not None else ()
    ):
        if tensor.shape != logp.shape:
            raise ValueError(f"policy_loss: {name} has shape {tuple(tensor.shape)}, logp has {tuple(logp.shape)}")
    uses_prox = cfg.correction in ("decoupled", "decoupled_mis", "naive")
    if uses_prox and prox_logp is None:
        raise ValueError(f"policy_loss: correction={cfg.correction!r} needs prox_logp")
    if cfg.correction not in ("decoupled", "decoupled_mis", "naive", "bypass"):
        raise ValueError(f"policy_loss: unknown correction {cfg.correction!r}")
    if cfg.agg not in ("token_mean", "seq_mean_token_mean"):
        raise ValueError(f"policy_loss: unknown agg {cfg.agg!r}")

    _check_finite("logp", logp.detach(), mask)
    _check_finite("behav_logp", behav_logp, mask)
    _check_finite("advantages", advantages, mask)
    if prox_logp is not None and uses_prox:
        _check_finite("prox_logp", prox_logp, mask)

    anchor = (prox_logp if uses_prox else behav_logp).detach()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # Masked positions are zeroed *before* exp so padding can never produce inf·0 = NaN.
    log_u = torch.where(mask, logp - anchor, zero)
    u = torch.exp(log_u)
    surrogate = -advantages * u
    surrogate_clipped = -advantages * torch.clamp(u, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    per_token = torch.maximum(surrogate, surrogate_clipped)
    clipped = surrogate_clipped > surrogate
    if cfg.dual_clip is not None:
        bound = -advantages * cfg.dual_clip
        dual = (advantages < 0) & (bound < per_token)
        per_token = torch.where(dual, bound, per_token)
        clipped = clipped | dual

    keep = mask
    if cfg.correction in ("decoupled", "decoupled_mis"):
        log_w = torch.where(mask, prox_logp.detach() - behav_logp, zero)
        weight = torch.clamp(torch.exp(log_w), max=cfg.is_cap)
        if cfg.correction == "decoupled_mis":
            n_s = mask.sum(dim=1).clamp(min=1)
            geo_ratio = torch.exp(log_w.sum(dim=1) / n_s)
            keep = mask & ((geo_ratio >= cfg.mis_low) & (geo_ratio <= cfg.mis_high)).unsqueeze(1)
    else:
        weight = torch.ones_like(u)
    weight = torch.where(mask, weight, zero).detach()

    token_loss = torch.where(keep, weight * per_token, zero)
    n_tokens = mask.sum()
    if cfg.agg == "token_mean":
        denominator = float(total) if total is not None else float(n_tokens.clamp(min=1))
        loss = token_loss.sum() / denominator
    else:
        per_seq = token_loss.sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        n_seqs = (mask.sum(dim=1) > 0).sum()
        denominator = float(total) if total is not None else float(n_seqs.clamp(min=1))
        loss = per_seq.sum() / denominator

    with torch.no_grad():
        count = int(n_tokens)
        safe = max(count, 1)
        metrics = {
            "tokens": float(count),
            "clip_frac": float((clipped & mask).sum()) / safe,
            "is_weight_mean": float(weight[mask].sum()) / safe,
            "is_weight_max": float(weight[mask].max()) if count else 0.0,
            "masked_frac": float((mask & ~keep).sum()) / safe,
            "approx_kl": float(torch.where(mask, u - 1.0 - log_u, zero).sum()) / safe,
        }
    return loss, metrics
