"""Finite or nothing: the check every node applies to the numbers it is about to keep or share."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite.

    A peer asks it of its gradients at every batch, so the common case is one fused pass: the norm of all of them is
    finite only if every element is (a NaN or an inf makes it NaN or inf). Only when it is not (a non-finite element,
    or finite values so large that their squares overflow) is each element looked at, which tells those apart. On
    the tiny preset's 1.6 M gradient values: 0.26 ms against 3.4 ms for the element-wise check alone (one CPU thread).
    """
    tensors = list(tensors)
    if not tensors:
        return True
    floating = all(tensor.is_floating_point() for tensor in tensors)
    if floating and bool(torch.isfinite(torch.nn.utils.get_total_norm(tensors))):
        return True
    return bool(torch.stack([torch.isfinite(tensor).all() for tensor in tensors]).all())
