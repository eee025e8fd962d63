"""all_finite: the fused fast path answers as the element-wise check does, huge finite values and other dtypes
included."""

from __future__ import annotations

import pytest
import torch

from peer.swarm.finite import all_finite


@pytest.mark.parametrize(
    ("tensors", "finite"),
    [
        ([], True),
        ([torch.ones(3), torch.zeros(2, 2)], True),
        ([torch.ones(3), torch.tensor([1.0, float("nan")])], False),
        ([torch.tensor([float("inf")]), torch.ones(2)], False),
        ([torch.tensor([-float("inf"), float("inf")])], False),  # inf - inf: whatever the sum, not finite
        ([torch.full((4,), 1e30)], True),  # finite, but their squares overflow: the element-wise check decides
        ([torch.full((4,), 60000.0, dtype=torch.float16)], True),  # fp16's norm overflows at 65504
        ([torch.full((4,), 60000.0, dtype=torch.float16), torch.tensor([float("nan")])], False),
        ([torch.ones(3, dtype=torch.bfloat16), torch.ones(2, dtype=torch.float64)], True),
        ([torch.arange(4), torch.ones(2)], True),  # an integer tensor: no norm, the element-wise check
        ([torch.empty(0), torch.ones(1)], True),
    ],
)
def test_all_finite_answers_as_the_element_wise_check(tensors, finite):
    assert all_finite(tensors) is finite
    assert all_finite(iter(tensors)) is finite  # a generator, as gradients_finite passes
