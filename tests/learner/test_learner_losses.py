"""policy_loss, one hand-computed case per correction plus dual clip, aggregation and bad input.

Inputs are built from chosen ratios: logp = prox + log u, behav = prox − log(π_prox/μ).
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from learner.config import AlgoConfig
from learner.losses import policy_loss

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
