"""The attacker's modes on their own (tests/peer/byzantine.py), without a swarm: ALIE's z follows the paper's formula,
the statistical attacks send what their docstring says from the attacker's own gradients, and label flipping keeps
the batch's tokens but moves its targets (label-flip among themselves, label-shift and label-invert to other ids)."""

from __future__ import annotations

import pytest
import torch

from tests.peer.byzantine import (
    IGNORED_LABEL,
    HonestEstimate,
    WrongLabels,
    alie_z,
    flat_gradient,
    remap_labels,
    shuffle_labels,
    statistical_attack,
)


def test_alie_z_is_the_papers_bound_and_zero_where_no_honest_peer_can_be_swayed():
    # s = floor(n/2 + 1) - m honest peers must be swayed; z = inv_cdf((n - s) / n)
    assert alie_z(5, 2) == pytest.approx(0.8416, abs=1e-4)  # s = 1: Phi^-1(0.8)
    assert alie_z(8, 3) == pytest.approx(0.6745, abs=1e-4)  # s = 2: Phi^-1(0.75)
    assert alie_z(4, 1) == pytest.approx(0.0, abs=1e-12)  # s = 2: Phi^-1(0.5): the estimate of the mean itself
    assert alie_z(50, 24) > 1.5
    with pytest.raises(ValueError, match="0 < --attackers < --peers"):
        alie_z(4, 4)


def model_with_gradients(gradients: list[torch.Tensor]) -> tuple[torch.nn.Module, HonestEstimate]:
    """A linear model whose own step gradients were `gradients` (each a flat vector of its 6 values)."""
    model = torch.nn.Linear(2, 2)
    estimate = HonestEstimate(window=len(gradients))
    for flat in gradients:
        model.weight.grad, model.bias.grad = flat[:4].view(2, 2).clone(), flat[4:].clone()
        estimate.add(model)
    return model, estimate


def test_alie_sends_mean_minus_z_std_of_a_round_and_ipm_minus_epsilon_mean():
    generator = torch.Generator().manual_seed(0)
    gradients = [torch.randn(6, generator=generator) for _ in range(4)]
    stacked = torch.stack(gradients)
    model, estimate = model_with_gradients(gradients)
    estimate.steps_per_round = 4  # a round averages 4 steps: its spread is std / 2
    statistical_attack(model, "alie", estimate, z=0.84, epsilon=0.0)
    expected = stacked.mean(0) - 0.84 * stacked.std(0) / 2
    assert torch.allclose(flat_gradient(model), expected, atol=1e-6)
    statistical_attack(model, "ipm", estimate, z=0.0, epsilon=0.1)
    assert torch.allclose(flat_gradient(model), -0.1 * stacked.mean(0), atol=1e-6)
    # the sent part is small and inside the spread: a norm check cannot tell it from an honest one
    assert flat_gradient(model).norm() < stacked.norm(dim=1).min()


def test_label_flip_moves_the_targets_not_the_tokens():
    labels = torch.full((2, 16), IGNORED_LABEL)
    labels[0, [1, 5, 9]] = torch.tensor([11, 12, 13])
    labels[1, [0, 7, 15]] = torch.tensor([14, 15, 16])
    batch = {"input_ids": torch.arange(32).view(2, 16), "labels": labels}
    flipped = shuffle_labels(batch, torch.Generator().manual_seed(1))
    assert torch.equal(flipped["input_ids"], batch["input_ids"])
    masked = labels != IGNORED_LABEL
    assert torch.equal(flipped["labels"] != IGNORED_LABEL, masked)  # same positions are targets
    assert sorted(flipped["labels"][masked].tolist()) == list(range(11, 17))  # same target tokens
    assert (flipped["labels"][masked] != labels[masked]).sum() >= 4  # most at the wrong place
    assert torch.equal(batch["labels"], labels)  # the original batch is left alone


@pytest.mark.parametrize("attack, expected", [("label-shift", [1, 42, 0]), ("label-invert", [99, 58, 0])])
def test_label_remaps_target_another_token_id_within_the_vocabulary(attack, expected):
    labels = torch.full((1, 8), IGNORED_LABEL)
    labels[0, [2, 3, 6]] = torch.tensor([0, 41, 99])
    batch = {"input_ids": torch.arange(8).view(1, 8), "labels": labels}
    remapped = remap_labels(batch, vocab_size=100, attack=attack)
    assert remapped["labels"][0, [2, 3, 6]].tolist() == expected
    assert torch.equal(remapped["labels"] == IGNORED_LABEL, labels == IGNORED_LABEL)  # unmasked stay ignored
    assert torch.equal(batch["labels"], labels)


def test_wrong_labels_pass_batches_through_until_active():
    labels = torch.tensor([[IGNORED_LABEL, 5]])
    batches = WrongLabels(iter([{"labels": labels}] * 2), "label-shift", vocab_size=10)
    assert next(batches)["labels"].tolist() == [[IGNORED_LABEL, 5]]
    batches.active = True
    assert next(batches)["labels"].tolist() == [[IGNORED_LABEL, 6]]
