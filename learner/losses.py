"""The policy-gradient loss with its off-policy corrections, the KL penalty and the entropy term, as pure functions
of tensors (no I/O, no model).

Notation, per generated token t of trajectory s (only where the loss mask is 1):
    log π_θ   current policy (`logp`, carries the gradient)
    log π_prox proximal policy: the learner's weights at the start of this step, recomputed without grad
    log μ     behaviour policy: the log-prob the inference engine reported when it sampled the token
    log π_ref frozen reference policy (the starting checkpoint), for the KL penalty
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

Extreme ratios: every log-ratio (log u, log w) is clamped to ±LOG_RATIO_LIMIT (20, i.e. ratios in
[2.1e-9, 4.9e8]) before exp, so a token whose probabilities differ by more than e^20 gives a finite loss instead of
inf/NaN; beyond the clamp that token carries no gradient (where PPO's clip has not already removed it).

Aggregation over the tokens with mask m (m already zero for MIS-masked trajectories in the numerator):
    token_mean           L = Σ_{s,t} m·ℓ / N_tokens                     N_tokens = Σ mask (before MIS)
    seq_mean_token_mean  L = Σ_s ( Σ_t m·ℓ / n_s ) / N_seqs              n_s = Σ_t mask, N_seqs = #{s: n_s > 0}
`total` overrides N_tokens / N_seqs so that micro-batches and ranks can each compute their share of one global
mean (the sum of the shares is the mean over the whole batch). A sequence with no loss token adds nothing and is
not counted; a batch with none gives L = 0 (still connected to the graph, so backward runs).

KL penalty per token, r = log π_ref − log π_θ (Schulman's estimators of KL(π_θ ‖ π_ref), sampled from π_θ):
    kl          k1 = −r                         unbiased, high variance, can be negative
    mse         k2 = ½ r²                       biased, low variance
    low_var_kl  k3 = e^r − r − 1  (r clamped)   unbiased, ≥ 0, low variance (GRPO's choice)
    abs         |r|
Entropy per token from the logits z over the vocabulary: H = −Σ_v p_v log p_v, p = softmax(z).
The trainer's total loss is  L_policy + kl_coef · agg(KL) − entropy_coef · agg(H), each aggregated like ℓ.

Metrics (over masked tokens): clip_frac (fraction where a clip bound cut the gradient), is_weight_mean/max (of w),
masked_frac (fraction removed by MIS), approx_kl (k3 estimator  u − 1 − log u  of KL(anchor ‖ π_θ), anchor = π_prox
or μ for bypass), tokens (the count the means are over, for weighting across micro-batches).

Inputs that are NaN or ±inf under the mask raise ValueError naming the tensor and the positions; values under
mask 0 (padding) are never read into the result, so they may be anything.
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch

LOG_RATIO_LIMIT = 20.0
KL_KINDS = ("low_var_kl", "kl", "mse", "abs")


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


def check_finite(name: str, values: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise ValueError naming up to 5 (seq, token) positions where `values` is NaN/±inf under `mask`."""
    bad = mask & ~torch.isfinite(values)
    if bool(bad.any()):
        where = torch.nonzero(bad)[:5].tolist()
        raise ValueError(f"non-finite {name} at masked (seq, token) positions {where}")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, agg: str, total: Optional[float] = None) -> torch.Tensor:
    """Σ over masked tokens divided by the token count (token_mean) or the mean of per-sequence token means
    (seq_mean_token_mean); `total` replaces the denominator (the whole batch's count). [B, T] → scalar."""
    mask = mask.to(torch.bool)
    zero = torch.zeros((), dtype=per_token.dtype, device=per_token.device)
    masked = torch.where(mask, per_token, zero)
    if agg == "token_mean":
        denominator = float(total) if total is not None else float(mask.sum().clamp(min=1))
        return masked.sum() / denominator
    if agg == "seq_mean_token_mean":
        counts = mask.sum(dim=1)
        per_seq = masked.sum(dim=1) / counts.clamp(min=1)
        denominator = float(total) if total is not None else float((counts > 0).sum().clamp(min=1))
        return per_seq.sum() / denominator
    raise ValueError(f"unknown agg {agg!r}; expected token_mean or seq_mean_token_mean")


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

    check_finite("logp", logp.detach(), mask)
    check_finite("behav_logp", behav_logp, mask)
    check_finite("advantages", advantages, mask)
    if prox_logp is not None and uses_prox:
        check_finite("prox_logp", prox_logp, mask)

    anchor = (prox_logp if uses_prox else behav_logp).detach()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # Masked positions are zeroed *before* exp so padding can never produce inf·0 = NaN; the clamp keeps extreme
    # (but finite) ratios finite after exp.
    log_u = torch.where(mask, (logp - anchor).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT), zero)
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
        log_w = torch.where(mask, (prox_logp.detach() - behav_logp).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT), zero)
        weight = torch.clamp(torch.exp(log_w), max=cfg.is_cap)
        if cfg.correction == "decoupled_mis":
            n_s = mask.sum(dim=1).clamp(min=1)
            geo_ratio = torch.exp(log_w.sum(dim=1) / n_s)
            keep = mask & ((geo_ratio >= cfg.mis_low) & (geo_ratio <= cfg.mis_high)).unsqueeze(1)
    else:
        weight = torch.ones_like(u)
    weight = torch.where(mask, weight, zero).detach()

    token_loss = torch.where(keep, weight * per_token, zero)
    if cfg.agg == "token_mean":
        denominator = float(total) if total is not None else float(mask.sum().clamp(min=1))
        loss = token_loss.sum() / denominator
    else:  # the per-sequence count is n_s before MIS, as for token_mean
        counts = mask.sum(dim=1)
        per_seq = token_loss.sum(dim=1) / counts.clamp(min=1)
        denominator = float(total) if total is not None else float((counts > 0).sum().clamp(min=1))
        loss = per_seq.sum() / denominator

    with torch.no_grad():
        count = int(mask.sum())
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


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "low_var_kl",
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) (formulas in the module docstring); gradient flows through `logp`.

    logp, ref_logp: same shape. With `mask`, positions under mask 0 are returned as 0 and only masked positions
    are checked for NaN/inf (ValueError); without it every position is checked.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"kl_penalty: unknown kind {kind!r}; expected one of {KL_KINDS}")
    if ref_logp.shape != logp.shape:
        raise ValueError(f"kl_penalty: ref_logp has shape {tuple(ref_logp.shape)}, logp has {tuple(logp.shape)}")
    mask = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    if mask.shape != logp.shape:
        raise ValueError(f"kl_penalty: mask has shape {tuple(mask.shape)}, logp has {tuple(logp.shape)}")
    check_finite("logp", logp.detach(), mask)
    check_finite("ref_logp", ref_logp, mask)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    r = torch.where(mask, ref_logp.detach() - logp, zero)
    if kind == "kl":
        values = -r
    elif kind == "mse":
        values = 0.5 * r * r
    elif kind == "abs":
        values = r.abs()
    else:
        r = r.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
        values = torch.exp(r) - r - 1.0
    return torch.where(mask, values, zero)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy −Σ_v p_v log p_v of the softmax over the last dimension, per position: [..., V] → [...]
    (float32 maths; a −inf logit, i.e. a masked-out token, contributes 0 instead of 0·∞ = NaN)."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    p = log_p.exp()
    return -torch.where(p > 0, p * log_p, torch.zeros((), dtype=p.dtype, device=p.device)).sum(dim=-1)
