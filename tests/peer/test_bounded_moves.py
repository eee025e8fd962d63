"""bound_moves: a round's mean moves the whole set at most the bound, and cannot put all of that into one tensor."""

from __future__ import annotations

import math

import pytest
import torch

from model import LeanAlbertForMaskedLM, load_config
from peer.swarm.bounded_moves import bound_moves

BOUND = 0.05


def norm(tensors) -> float:
    return math.sqrt(sum(float(t.float().pow(2).sum()) for t in tensors))


@pytest.fixture(scope="module")
def tiny_parameters() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = LeanAlbertForMaskedLM(load_config("tiny", vocab_size=8000))
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def test_a_mean_within_the_bound_is_taken_whole():
    own = [torch.ones(1000), torch.ones(10)]
    moves = [torch.full((1000,), 0.01), torch.full((10,), 0.01)]
    decided = bound_moves(moves, own, BOUND)
    assert not decided.bounded and decided.held == 0
    assert decided.factors == [1.0, 1.0]
    assert decided.change == pytest.approx(0.01)


def test_nothing_to_move_and_nothing_to_scale_by():
    own = [torch.ones(4), torch.zeros(4)]
    assert bound_moves([torch.zeros(4), torch.zeros(4)], own, BOUND).change == 0.0
    zeros = bound_moves([torch.ones(4), torch.ones(4)], [torch.zeros(4), torch.zeros(4)], BOUND)
    assert zeros.factors == [0.0, 0.0] and zeros.change == math.inf  # statistics before a first step stay


def test_a_move_put_into_one_layernorm_gain_moves_it_by_the_bound_of_its_own_norm(tiny_parameters):
    """All of the set's allowance aimed at one LayerNorm gain (its norm is far above its even share of the set's):
    the set's bound alone would move it by a third of its norm; with its own bound, by 5%."""
    names = list(tiny_parameters)
    own = list(tiny_parameters.values())
    target = names.index("lean_albert.embeddings.layer_norm.weight")
    moves = [torch.zeros_like(t) for t in own]
    moves[target] = own[target] * 1000  # an attacker's x1000 in a mean of a few
    whole = norm(own)
    gain = float(own[target].norm())
    set_bound_only = min(1.0, BOUND * whole / float(moves[target].norm())) * float(moves[target].norm()) / gain
    assert set_bound_only > 0.3  # 2.7 of 8: what the set's bound alone let through, per round
    alone = bound_moves(moves, own, BOUND, per_tensor=False)  # the re-sync's and LAMB moments' bound (module doc)
    assert alone.held == 0 and float(alone.apply(moves)[target].norm()) / gain == pytest.approx(set_bound_only)

    decided = bound_moves(moves, own, BOUND)
    moved = decided.apply(moves)
    assert decided.bounded and decided.held == 1
    assert float(moved[target].norm()) / gain == pytest.approx(BOUND, rel=1e-5)
    assert all(float(m.norm()) == 0.0 for i, m in enumerate(moved) if i != target)


def test_a_bias_below_its_even_share_is_bounded_by_the_sets_bound_only(tiny_parameters):
    """Honest peers' biases lie far apart relative to their norms (module doc): only the set's bound holds them."""
    names = list(tiny_parameters)
    own = list(tiny_parameters.values())
    target = names.index("mlm_head.layer_norm.bias")
    assert float(own[target].norm()) == 0.0
    moves = [torch.zeros_like(t) for t in own]
    moves[target] = torch.full_like(own[target], 50.0)
    decided = bound_moves(moves, own, BOUND)
    assert decided.held == 0
    assert float(decided.apply(moves)[target].norm()) == pytest.approx(BOUND * norm(own), rel=1e-5)


def test_a_far_mean_everywhere_moves_the_set_by_the_bound_and_each_tensor_toward_it(tiny_parameters):
    own = list(tiny_parameters.values())
    target = [t * 3 for t in own]  # a member's x3 in a mean of two: the mean is 2x, 100% away
    decided = bound_moves([b - a for a, b in zip(own, target)], own, BOUND)
    moved = decided.moved(own, target)
    assert decided.change == pytest.approx(2.0, rel=1e-5)
    moves = [m - a for a, m in zip(own, moved)]
    assert norm(moves) / norm(own) == pytest.approx(BOUND, rel=1e-4)
    assert all(0.0 <= factor <= 1.0 for factor in decided.factors)
    whole, total = norm(own), sum(t.numel() for t in own)
    gains = [(a, move) for a, move in zip(own, moves) if float(a.norm()) >= whole * math.sqrt(a.numel() / total)]
    assert len(gains) == 5  # the LayerNorm gains: each at most 5% of itself
    assert all(float(move.norm()) <= BOUND * float(a.norm()) * (1 + 1e-5) for a, move in gains)


def test_a_huge_finite_move_lifts_no_bound(tiny_parameters):
    """1e19 per value is finite in float32, but its float32 norm is not: computed so, the gain's factor was 0 and
    inf x 0 lifted the set's bound (a bias moved 800 against a bound of 2.7). In float64 both bounds hold."""
    names = list(tiny_parameters)
    own = list(tiny_parameters.values())
    gain, bias = names.index("lean_albert.embeddings.layer_norm.weight"), names.index("mlm_head.layer_norm.bias")
    moves = [torch.zeros_like(t) for t in own]
    moves[gain] = torch.full_like(own[gain], 1e19)
    moves[bias] = torch.full_like(own[bias], 100.0)
    moved = bound_moves(moves, own, BOUND).apply(moves)
    assert all(bool(torch.isfinite(m).all()) for m in moved)
    assert norm(moved) <= BOUND * norm(own) * (1 + 1e-5)
    assert float(moved[gain].norm()) <= BOUND * float(own[gain].norm()) * (1 + 1e-5)
