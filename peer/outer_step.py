"""The arithmetic of local-steps (DiLoCo) training, apart from any network: pseudo-gradients and the outer step.

DiLoCo (arXiv 2311.08105, Algorithm 1): every peer starts a round from the same outer weights, takes inner steps on
its own data, and sends its pseudo-gradient ``outer - local``; the swarm's average of those is applied to the outer
weights by SGD with Nesterov momentum (the paper's 0.7 learning rate and 0.9 momentum). Kept in float32 on the CPU:
the outer state is what the swarm agrees on, and every peer must compute the same update from the same average.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def pseudo_gradients(outer: Sequence[torch.Tensor], local: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``outer - local`` per tensor, in float32 on the CPU (the direction the inner steps moved, reversed)."""
    return [start - now.detach().float().cpu() for start, now in zip(outer, local, strict=True)]


@torch.no_grad()
def nesterov_outer_step(
    outer: Sequence[torch.Tensor],
    gradients: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    learning_rate: float,
    momentum: float,
) -> None:
    """One step of SGD with Nesterov momentum, in place, as ``torch.optim.SGD(nesterov=True, dampening=0)``.

    ``buffer = momentum * buffer + g``; ``outer -= learning_rate * (g + momentum * buffer)``. The buffers start at
    zero (torch starts them at the first gradient, which is the same: 0.9 * 0 + g = g).
    """
    for weight, gradient, buffer in zip(outer, gradients, momentum_buffers, strict=True):
        buffer.mul_(momentum).add_(gradient)
        weight.sub_(gradient + momentum * buffer, alpha=learning_rate)
