"""A few numbers that tell whether two peers' outer states (weights and momentum) are the same, without sending them.

The local-steps mode re-syncs the outer state (a whole-model round) to undo drift between peers. Since every member
of an outer round receives the same mean (peer/hivemind_gaps/mean_replies.py), peers that took part in the same whole
rounds hold the same outer state, and a re-sync would send ~2x the model per peer to change nothing. Each peer
gathers the fingerprint of its state with its pseudo-gradient, and a group re-syncs only where its members' differ.

Per list of tensors (weights, then momentum): the norm, and the alternating sum ``x0 - x1 + x2 - ...`` over all
values, in float64. Peers that received a round in part, stepped alone or split into two groups differ on whole
slices of the vector: their alternating sums differ by ~||difference|| (a random walk of the differences), measured
against the state's norm. Rounding left by an overlapped re-sync's correction differs by ulps (~1e-7 of the norm);
TOLERANCE sits between. Not a hash: one pass of sums, and differences that cancel in both sums go unseen (two
peers differing in exactly that way would have to be built so).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# the largest difference of two fingerprints, relative to the larger norm, that still counts as the same state; the
# ulps an overlapped re-sync's correction leaves are ~1e-7 of it, a round received in part ~1e-4 or more (module doc)
TOLERANCE = 1e-5
LENGTH = 4  # (norm, alternating sum) of the weights, then of the momentum


@torch.no_grad()
def fingerprint(outer: Sequence[torch.Tensor], momentum: Sequence[torch.Tensor]) -> list[float]:
    """[norm, alternating sum] of ``outer``, then of ``momentum`` (float64 sums of float32 values)."""
    return [*_norm_and_alternating_sum(outer), *_norm_and_alternating_sum(momentum)]


def _norm_and_alternating_sum(tensors: Sequence[torch.Tensor]) -> tuple[float, float]:
    squares = alternating = 0.0
    offset = 0  # the sign of a value follows its index in the whole vector, not in its tensor
    for tensor in tensors:
        flat = tensor.reshape(-1)
        squares += float(torch.linalg.vector_norm(flat, dtype=torch.float64)) ** 2
        even, odd = flat[offset % 2 :: 2], flat[1 - offset % 2 :: 2]
        alternating += float(even.sum(dtype=torch.float64)) - float(odd.sum(dtype=torch.float64))
        offset += flat.numel()
    return math.sqrt(squares), alternating


def is_fingerprint(value) -> bool:
    """True for what ``fingerprint`` returns (as a member's gathered data arrives: a list of finite floats)."""
    return (
        isinstance(value, list | tuple)
        and len(value) == LENGTH
        and all(type(number) is float and math.isfinite(number) for number in value)
    )


def same_state(first: Sequence[float], second: Sequence[float], tolerance: float = TOLERANCE) -> bool:
    """Whether two fingerprints are of one state, up to ``tolerance`` of the larger norm (weights and momentum apart)."""
    for start in range(0, LENGTH, 2):
        scale = max(abs(first[start]), abs(second[start]))
        for index in (start, start + 1):
            if abs(first[index] - second[index]) > tolerance * scale:
                return False
    return True
