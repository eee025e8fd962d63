"""How far one round's mean may move a peer's own tensors: a bound on the whole set and on each tensor of scale.

A state round or an outer-state re-sync writes the swarm's mean straight into the weights, past the optimizer (LAMB
bounds each tensor's step by its trust ratio; these writes have no such bound). A bound on the set's norm alone lets
a sender put the whole allowance into one small tensor: 5% of the tiny preset's parameter norm (53.5 at
initialisation) is 2.7, which is a third of a LayerNorm gain's norm (8). So a tensor with a scale of its own (a norm
at least its even share of the set's: the set's norm x sqrt(its elements / the set's)) moves at most the same
fraction of its own norm.

Tensors below their even share (biases, which start at zero) are bounded by the set's bound only: two honest peers'
biases were measured 0.6x their own norm apart, 6-11x a 5% bound on the larger of their norm and their share, in the
backups of epochs 1-9 of a run of tests/peer/test_state_rounds.py (LAMB moves a zero tensor by the learning rate
per element at each step, so the steps peers take apart leave their biases far apart), so a bound there would keep
honest peers apart.
The gains and matrices of those same rounds moved at most 0.31x that bound.

Only the state rounds' parameters take the per-tensor bound. Their LAMB moments take the set's: LAMB bounds each step
by its trust ratio whatever the moments, and held per tensor, two honest peers' moments were 13.7% apart at epoch 7
and 0.6% at best by epoch 11, a state round every epoch (tests/peer/test_swarm.py in CI; under 0.1% before). The
local-steps re-sync takes the set's bound too: held per tensor, peers that came apart stayed apart and re-synced
again and again (4x the re-sync bytes of tests/peer/test_local_steps_int4.py in CI).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Bounded:
    """What ``bound_moves`` decided: a factor per tensor to multiply its move by (each in [0, 1]).

    ``change``: the whole move's norm over the set's own norm before bounding (0 if nothing moves, inf if the set is
    all zeros and something does); ``held``: how many tensors their own bound scaled down.
    """

    factors: list[float]
    change: float
    held: int

    @property
    def bounded(self) -> bool:
        return any(factor < 1.0 for factor in self.factors)

    def apply(self, moves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [move if factor == 1.0 else move * factor for move, factor in zip(moves, self.factors, strict=True)]

    def moved(self, own: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``own`` moved toward ``target`` as far as allowed (new tensors; ``own`` is unchanged)."""
        return [a + factor * (b - a) for a, b, factor in zip(own, target, self.factors, strict=True)]


@torch.no_grad()
def bound_moves(
    moves: Sequence[torch.Tensor], own: Sequence[torch.Tensor], bound: float, per_tensor: bool = True
) -> Bounded:
    """Scale ``moves`` (one per tensor of ``own``) so that the set moves at most ``bound`` x its own norm, and with
    ``per_tensor`` each tensor whose norm is at least its even share of the set's at most ``bound`` x its own.

    A set of all zeros (optimizer statistics before a peer's first step) has no scale to bound a move by: it stays.
    So does every tensor when a norm is not finite even in float64 (the callers refuse non-finite values first; finite
    float32 values of 1e19 would overflow a float32 norm, and inf x 0 would then lift every bound).
    """
    own_norms = torch.stack([torch.linalg.vector_norm(tensor, dtype=torch.float64).cpu() for tensor in own])
    moving = torch.stack([torch.linalg.vector_norm(move, dtype=torch.float64).cpu() for move in moves])
    whole, moved = float(torch.linalg.vector_norm(own_norms)), float(torch.linalg.vector_norm(moving))
    if not (math.isfinite(whole) and math.isfinite(moved)):
        return Bounded([0.0] * len(own_norms), float("inf"), 0)
    if moved == 0.0:
        return Bounded([1.0] * len(own_norms), 0.0, 0)
    if whole == 0.0:
        return Bounded([0.0] * len(own_norms), float("inf"), 0)
    sizes = torch.tensor([tensor.numel() for tensor in own], dtype=torch.float64)
    shares = whole * torch.sqrt(sizes / sizes.sum())
    limits = torch.where(own_norms >= shares, bound * own_norms, torch.inf) if per_tensor else torch.inf
    held = torch.where(moving > limits, limits / moving.clamp_min(1e-300), torch.ones_like(moving))
    after = float(torch.linalg.vector_norm(moving * held))
    overall = min(1.0, bound * whole / after) if after > 0 else 1.0
    factors = [factor * overall for factor in held.tolist()]
    return Bounded(factors, moved / whole, int((held < 1.0).sum()))
