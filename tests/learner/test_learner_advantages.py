"""GRPO advantages against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from learner.advantages import grpo_advantages


def test_one_group_is_centred_and_scaled_by_the_bessel_std() -> None:
    # mean 0.5; unbiased std = sqrt(4 * 0.25 / 3) = 0.57735; A = ±0.5 / 0.57735 = ±0.866025
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([0, 0, 0, 0]), eps=1e-6)
    expected = 0.5 / math.sqrt(1 / 3)
    assert torch.allclose(adv, torch.tensor([expected, -expected, -expected, expected]), atol=1e-5)


def test_interleaved_groups_are_normalised_separately() -> None:
    # group 0 = {1, 3}: mean 2, std sqrt(2) -> ∓0.70711; group 1 = {5, 5}: no contrast -> 0
    adv = grpo_advantages(torch.tensor([1.0, 5.0, 3.0, 5.0]), torch.tensor([7, 9, 7, 9]))
    assert torch.allclose(adv, torch.tensor([-1 / math.sqrt(2), 0.0, 1 / math.sqrt(2), 0.0]), atol=1e-5)


def test_without_std_normalisation_only_the_mean_is_removed() -> None:
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.zeros(4, dtype=torch.long), std_normalize=False)
    assert torch.allclose(adv, torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_equal_rewards_give_exact_zeros_not_rounding_noise_over_eps() -> None:
    adv = grpo_advantages(torch.tensor([0.1, 0.1, 0.1]), torch.zeros(3, dtype=torch.long), eps=1e-12)
    assert torch.equal(adv, torch.zeros(3))


def test_singleton_group_is_zero() -> None:
    assert torch.equal(grpo_advantages(torch.tensor([3.0]), torch.tensor([0])), torch.zeros(1))


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="non-finite reward"):
        grpo_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="equal length"):
        grpo_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="eps"):
        grpo_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), eps=0.0)
