"""policy_loss, one hand-computed case per correction plus dual clip, aggregation and bad input.

Inputs are built from chosen ratios: logp = prox + log u, behav = prox − log(π_prox/μ).
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from learner.config import AlgoConfig
from learner.losses import aggregate, entropy_from_logits, kl_penalty, policy_loss

BASE = AlgoConfig(clip_low=0.2, clip_high=0.28, is_cap=2.0, mis_low=0.5, mis_high=2.0)


def cfg(**changes: object) -> AlgoConfig:
    return dataclasses.replace(BASE, **changes)


def tensors(u: list[list[float]], prox_over_behav: list[list[float]], mask: list[list[int]]):
    prox = torch.full((len(u), len(u[0])), -1.0)
    logp = (prox + torch.log(torch.tensor(u))).requires_grad_(True)
    behav = prox - torch.log(torch.tensor(prox_over_behav))
    return logp, prox, behav, torch.tensor(mask, dtype=torch.bool)


def test_decoupled_clips_u_and_truncates_w() -> None:
    # t1: u=1.5 -> clipped to 1.28, w=min(3, 2)=2 -> 2·(−1.28) = −2.56;  t2: u=0.9 in range, w=0.5 -> −0.45
    logp, prox, behav, mask = tensors([[1.0, 1.5, 0.9]], [[1.0, 3.0, 0.5]], [[0, 1, 1]])
    loss, m = policy_loss(logp, prox, behav, torch.tensor([1.0]), mask, cfg(correction="decoupled"))
    assert loss.item() == pytest.approx((-2.56 - 0.45) / 2, abs=1e-5)
    assert m["clip_frac"] == pytest.approx(0.5)
    assert m["is_weight_mean"] == pytest.approx(1.25, abs=1e-5)
    assert m["is_weight_max"] == pytest.approx(2.0, abs=1e-5)
    kl = (1.5 - 1 - math.log(1.5)) + (0.9 - 1 - math.log(0.9))
    assert m["approx_kl"] == pytest.approx(kl / 2, abs=1e-5)
    loss.backward()
    # d/dlogp of w·(−A·u)/N: clipped token -> 0; t2 -> 0.5·(−0.9)/2 = −0.225; unmasked -> 0
    assert torch.allclose(logp.grad, torch.tensor([[0.0, 0.0, -0.225]]), atol=1e-5)


def test_decoupled_mis_masks_whole_sequences_outside_the_band() -> None:
    # seq 0: geometric mean of π_prox/μ = sqrt(1.5·1.0)=1.22 (kept); seq 1: 4 (masked out)
    logp, prox, behav, mask = tensors([[1.1, 1.0], [1.1, 1.0]], [[1.5, 1.0], [4.0, 4.0]], [[1, 1], [1, 1]])
    loss, m = policy_loss(logp, prox, behav, torch.tensor([1.0, 1.0]), mask, cfg(correction="decoupled_mis"))
    # seq 0 tokens: w=1.5, u=1.1 -> −1.65; w=1, u=1 -> −1; denominator counts all 4 loss tokens
    assert loss.item() == pytest.approx((-1.65 - 1.0) / 4, abs=1e-5)
    assert m["masked_frac"] == pytest.approx(0.5)
    plain, _ = policy_loss(logp, prox, behav, torch.tensor([1.0, 1.0]), mask, cfg(correction="decoupled"))
    assert plain.item() == pytest.approx((-1.65 - 1.0 - 2.0 * 1.1 - 2.0) / 4, abs=1e-5)


def test_bypass_anchors_on_behaviour_and_needs_no_proximal() -> None:
    # u = π/μ = 0.5 with A = −1: max(0.5, clip(0.5)=0.8) = 0.8 (clipped)
    logp = torch.log(torch.tensor([[0.5, 0.5]])).requires_grad_(True)
    behav = torch.zeros(1, 2)
    loss, m = policy_loss(logp, None, behav, torch.tensor([-1.0]), torch.tensor([[0, 1]]), cfg(correction="bypass"))
    assert loss.item() == pytest.approx(0.8, abs=1e-6)
    assert m["clip_frac"] == 1.0 and m["is_weight_mean"] == 1.0


def test_naive_ignores_behaviour_logprobs() -> None:
    # u = 1.1 within [0.8, 1.28], A = 2 -> −2.2 whatever μ is
    logp, prox, behav, mask = tensors([[1.1]], [[1.0]], [[1]])
    for shift in (0.0, 5.0):
        loss, m = policy_loss(logp, prox, behav - shift, torch.tensor([2.0]), mask, cfg(correction="naive"))
        assert loss.item() == pytest.approx(-2.2, abs=1e-5)
        assert m["is_weight_max"] == 1.0


def test_dual_clip_bounds_negative_advantage_losses() -> None:
    # A = −1, u = 5: PPO keeps max(5, 1.28) = 5; dual clip c=3 caps it at 3 and stops the gradient
    logp, prox, behav, mask = tensors([[5.0]], [[1.0]], [[1]])
    plain, _ = policy_loss(logp, prox, behav, torch.tensor([-1.0]), mask, cfg(correction="naive"))
    dual, m = policy_loss(logp, prox, behav, torch.tensor([-1.0]), mask, cfg(correction="naive", dual_clip=3.0))
    assert plain.item() == pytest.approx(5.0, abs=1e-4)
    assert dual.item() == pytest.approx(3.0, abs=1e-6)
    assert m["clip_frac"] == 1.0
    dual.backward()
    assert logp.grad.abs().sum().item() == 0.0


def test_seq_mean_token_mean_and_total_override() -> None:
    # naive, u=1 everywhere so each token's loss is −A: seq 0 = [−1, −3] (A per token), seq 1 = [−2]
    logp, prox, behav, mask = tensors([[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]], [[1, 1], [1, 0]])
    adv = torch.tensor([[1.0, 3.0], [2.0, 0.0]])
    loss, _ = policy_loss(logp, prox, behav, adv, mask, cfg(correction="naive", agg="seq_mean_token_mean"))
    assert loss.item() == pytest.approx((-2.0 + -2.0) / 2)
    token, _ = policy_loss(logp, prox, behav, adv, mask, cfg(correction="naive"))
    assert token.item() == pytest.approx(-6.0 / 3)
    share, _ = policy_loss(logp, prox, behav, adv, mask, cfg(correction="naive"), total=12)
    assert share.item() == pytest.approx(-6.0 / 12)


def test_padding_values_never_leak_into_loss_or_gradient() -> None:
    logp = torch.tensor([[0.0, -1.0, float("-inf")]], requires_grad=True)
    prox = torch.tensor([[0.0, -1.0, float("nan")]])
    behav = torch.tensor([[0.0, -1.0, float("inf")]])
    loss, _ = policy_loss(logp, prox, behav, torch.tensor([1.0]), torch.tensor([[0, 1, 0]]), cfg())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()


def test_empty_mask_gives_zero_loss_that_still_backpropagates() -> None:
    logp, prox, behav, _ = tensors([[1.2, 1.0]], [[1.0, 1.0]], [[0, 0]])
    loss, m = policy_loss(logp, prox, behav, torch.tensor([1.0]), torch.zeros(1, 2, dtype=torch.bool), cfg())
    loss.backward()
    assert loss.item() == 0.0 and m["tokens"] == 0.0 and logp.grad is not None


@pytest.mark.parametrize("name", ["logp", "prox", "behav", "adv"])
def test_non_finite_masked_inputs_raise(name: str) -> None:
    logp, prox, behav, mask = tensors([[1.0, 1.0]], [[1.0, 1.0]], [[0, 1]])
    adv = torch.tensor([1.0])
    values = {"logp": logp.detach().clone(), "prox": prox, "behav": behav, "adv": adv}
    values[name] = values[name].clone()
    values[name].view(-1)[-1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        policy_loss(values["logp"], values["prox"], values["behav"], values["adv"], mask, cfg())


def test_config_and_shape_errors() -> None:
    logp, prox, behav, mask = tensors([[1.0]], [[1.0]], [[1]])
    with pytest.raises(ValueError, match="needs prox_logp"):
        policy_loss(logp, None, behav, torch.tensor([1.0]), mask, cfg(correction="decoupled"))
    with pytest.raises(ValueError, match="shape"):
        policy_loss(logp, prox, behav[:, :0], torch.tensor([1.0]), mask, cfg())
    with pytest.raises(ValueError, match="correction"):
        AlgoConfig(correction="tis")
    with pytest.raises(ValueError, match="dual_clip"):
        AlgoConfig(dual_clip=0.5)
    with pytest.raises(ValueError, match="unknown AlgoConfig keys"):
        AlgoConfig.from_dict({"clip_hgh": 0.3})


# ----------------------------------------------------------------------------------------- edge-case matrix
# Every correction × {all-masked sequence, zero-variance group, extreme ratios, non-finite input}, by hand.
CORRECTIONS = ["decoupled", "decoupled_mis", "bypass", "naive"]
E20 = math.exp(20.0)  # the log-ratio clamp: u, w <= e^20


def anchored(correction: str, log_u: list[list[float]], log_w: list[list[float]]):
    """logp, prox, behav with log(π_θ/anchor) = log_u (anchor = μ for bypass, π_prox otherwise) and
    log(π_prox/μ) = log_w."""
    lu, lw = torch.tensor(log_u), torch.tensor(log_w)
    prox = torch.full_like(lu, -3.0)
    behav = prox - lw
    logp = (behav if correction == "bypass" else prox) + lu
    return logp.clone().requires_grad_(True), prox, behav


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("correction", CORRECTIONS)
def test_an_all_masked_sequence_adds_nothing_and_is_not_counted(correction: str, agg: str) -> None:
    # seq 0: no loss token and garbage everywhere; seq 1: one token with log u = log 1.1, log w = log 1.5, A = 1.
    logp, prox, behav = anchored(correction, [[0.0, 0.0], [0.0, math.log(1.1)]], [[0.0, 0.0], [0.0, math.log(1.5)]])
    nan = float("nan")
    with torch.no_grad():
        logp[0] = nan
    prox[0], behav[0] = float("inf"), -float("inf")
    adv = torch.tensor([nan, 1.0])
    mask = torch.tensor([[0, 0], [0, 1]], dtype=torch.bool)
    loss, m = policy_loss(logp, prox, behav, adv, mask, cfg(correction=correction, agg=agg))
    # decoupled(_mis): u = 1.1 in [0.8, 1.28], w = 1.5 -> −1.65 (MIS: ρ = 1.5 in [0.5, 2], kept)
    # bypass: u = 1.1 (anchored on μ), w = 1 -> −1.1;  naive: u = 1.1, w = 1 -> −1.1
    expected = {"decoupled": -1.65, "decoupled_mis": -1.65, "bypass": -1.1, "naive": -1.1}[correction]
    assert loss.item() == pytest.approx(expected, abs=1e-5)  # one token, one sequence: both means divide by 1
    assert m["tokens"] == 1.0 and m["masked_frac"] == 0.0
    loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0].abs().sum().item() == 0.0


@pytest.mark.parametrize("correction", CORRECTIONS)
def test_a_zero_variance_group_gives_exactly_zero_loss_and_gradient(correction: str) -> None:
    from learner.advantages import grpo_advantages

    adv = grpo_advantages(torch.tensor([0.7, 0.7, 0.7]), torch.zeros(3, dtype=torch.long))  # all equal -> 0
    logp, prox, behav = anchored(correction, [[0.3, -0.2], [0.1, 0.0], [2.0, -1.0]],
                                 [[0.1, 0.2], [-0.5, 0.0], [1.0, 1.0]])
    mask = torch.ones(3, 2, dtype=torch.bool)
    loss, m = policy_loss(logp, prox, behav, adv, mask, cfg(correction=correction, dual_clip=3.0))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logp.grad).item() == 0
    assert m["clip_frac"] == 0.0 and m["tokens"] == 6.0


@pytest.mark.parametrize("correction", CORRECTIONS)
def test_extreme_ratios_give_finite_hand_computed_losses(correction: str) -> None:
    # t0: log u = +30 -> u = e^20 (clamped), A = −1: PPO keeps max(e^20, 1.28) = e^20 (no dual clip)
    # t1: log u = −30 -> u = e^−20, A = +1: max(−e^−20, −0.8) = −e^−20
    # decoupled: log w = +30 on t0 -> w = min(e^20, 2) = 2; −30 on t1 -> w = e^−20.  MIS: ρ = e^((20 − 20)/2) = 1.
    logp, prox, behav = anchored(correction, [[30.0, -30.0]], [[30.0, -30.0]])
    adv = torch.tensor([[-1.0, 1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, m = policy_loss(logp, prox, behav, adv, mask, cfg(correction=correction))
    w0, w1 = (2.0, 1 / E20) if correction.startswith("decoupled") else (1.0, 1.0)
    assert loss.item() == pytest.approx((w0 * E20 - w1 / E20) / 2, rel=1e-5)
    assert m["is_weight_max"] == pytest.approx(w0) and math.isfinite(m["approx_kl"])
    loss.backward()
    # beyond the clamp no gradient; t1's is −w·u·A/N ≈ −e^−40 or −e^−20/2: finite and negligible
    assert torch.isfinite(logp.grad).all() and logp.grad.abs().max().item() < 1e-8
    dual, m = policy_loss(logp, prox, behav, adv, mask, cfg(correction=correction, dual_clip=3.0))
    assert dual.item() == pytest.approx((w0 * 3.0 - w1 / E20) / 2, rel=1e-5)  # t0 capped at c·|A| = 3


def test_mis_masks_a_sequence_with_an_extreme_geometric_ratio() -> None:
    # both tokens log w = +30 -> clamped 20 -> ρ = e^20 > mis_high: the whole sequence is masked
    logp, prox, behav = anchored("decoupled_mis", [[0.1, 0.1]], [[30.0, 30.0]])
    loss, m = policy_loss(logp, prox, behav, torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool),
                          cfg(correction="decoupled_mis"))
    assert loss.item() == 0.0 and m["masked_frac"] == 1.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("correction", CORRECTIONS)
@pytest.mark.parametrize("name", ["logp", "prox", "behav", "adv"])
def test_non_finite_inputs_under_the_mask_raise_for_every_correction(name: str, correction: str,
                                                                     bad: float) -> None:
    logp, prox, behav = anchored(correction, [[0.0, 0.1]], [[0.0, 0.1]])
    values = {"logp": logp.detach().clone(), "prox": prox.clone(), "behav": behav.clone(),
              "adv": torch.tensor([[1.0, 1.0]])}
    values[name][0, 1] = bad
    mask = torch.tensor([[0, 1]], dtype=torch.bool)
    args = (values["logp"], values["prox"], values["behav"], values["adv"], mask, cfg(correction=correction))
    if name == "prox" and correction == "bypass":  # bypass never reads π_prox
        loss, _ = policy_loss(*args)
        assert torch.isfinite(loss)
        return
    expected = {"logp": "logp", "prox": "prox_logp", "behav": "behav_logp", "adv": "advantages"}[name]
    with pytest.raises(ValueError, match=rf"non-finite {expected} at masked .*\[\[0, 1\]\]"):
        policy_loss(*args)


# ------------------------------------------------------------------------------------------ KL and entropy

def test_kl_penalty_estimators_by_hand() -> None:
    # π_θ = 0.5, π_ref = 0.25: r = log π_ref − log π_θ = −log 2
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25)]])
    ln2 = math.log(2.0)
    expected = {"kl": ln2, "mse": 0.5 * ln2**2, "low_var_kl": 0.5 + ln2 - 1.0, "abs": ln2}
    grads = {"kl": 1.0, "mse": ln2, "low_var_kl": 1.0 - 0.5, "abs": 1.0}  # d/d log π_θ
    for kind, value in expected.items():
        logp.grad = None
        kl = kl_penalty(logp, ref, kind)
        assert kl.item() == pytest.approx(value, abs=1e-6), kind
        kl.sum().backward()
        assert logp.grad.item() == pytest.approx(grads[kind], abs=1e-6), kind


def test_low_var_kl_is_non_negative_clamped_and_masked() -> None:
    logp = torch.tensor([[0.0, -1.0, -50.0, float("nan")]])
    ref = torch.tensor([[0.0, -3.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    kl = kl_penalty(logp, ref, "low_var_kl", mask)
    # r = 0 -> 0;  r = −2 -> e^−2 + 2 − 1;  r = +50 clamped to 20 -> e^20 − 21;  masked NaN -> 0
    assert kl[0, :3].tolist() == pytest.approx([0.0, math.exp(-2) + 1.0, E20 - 21.0], rel=1e-5)
    assert kl[0, 3].item() == 0.0 and (kl >= 0).all()
    with pytest.raises(ValueError, match="non-finite logp"):
        kl_penalty(logp, ref, "low_var_kl")  # without a mask every position is read
    with pytest.raises(ValueError, match="unknown kind"):
        kl_penalty(logp, ref, "k4")
    with pytest.raises(ValueError, match="shape"):
        kl_penalty(logp, ref[:, :2], "kl")


def test_entropy_from_logits_by_hand() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, -float("inf"), -float("inf")]])
    p = math.exp(2) / (math.exp(2) + 1)
    expected = [math.log(4.0), -(p * math.log(p) + (1 - p) * math.log(1 - p))]
    assert entropy_from_logits(logits).tolist() == pytest.approx(expected, abs=1e-6)


def test_aggregate_divides_by_tokens_or_sequences() -> None:
    values = torch.tensor([[1.0, 3.0, 9.0], [4.0, 0.0, 0.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    assert aggregate(values, mask, "token_mean").item() == pytest.approx(8.0 / 3)
    assert aggregate(values, mask, "seq_mean_token_mean").item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate(values, mask, "token_mean", total=8).item() == pytest.approx(1.0)
    assert aggregate(values, torch.zeros_like(mask), "token_mean").item() == 0.0
    with pytest.raises(ValueError, match="agg"):
        aggregate(values, mask, "sum")
