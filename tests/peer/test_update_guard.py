"""The update guard and the downloaded-state check on crafted inputs, in-process (the swarm tests are elsewhere)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch_optimizer
from hivemind.optim.state_averager import TrainingStateAverager

from peer.hivemind_gaps.state_check import MAX_EPOCH, FastSchedulerCatchUp, StateRefused, check_state
from peer.hivemind_gaps.state_layout import StateLayout
from peer.hivemind_gaps.update_guard import (
    ABOVE_CAP,
    NON_FINITE,
    OUTLIER,
    WARMUP,
    WEIGHT_FACTOR,
    UpdateGuard,
    WeightRelativeGuard,
)
from peer.swarm.config import OptimConfig
from peer.swarm.optimizer import make_optimizer, make_scheduler


def grads_of_norm(norm: float, size: int = 1000) -> list[torch.Tensor]:
    """Two float32 tensors whose joint L2 norm is ``norm``."""
    direction = torch.randn(size)
    direction *= norm / direction.norm()
    return [direction[: size // 2].clone(), direction[size // 2 :].clone()]


def honest_norms(steps: int) -> list[float]:
    generator = torch.Generator().manual_seed(0)
    return [float(2.0 + torch.rand((), generator=generator)) for _ in range(steps)]  # 2..3, like a calm run


def test_honest_sequence_is_always_admitted():
    guard = UpdateGuard()
    assert all(guard.admit(grads_of_norm(norm)) for norm in honest_norms(200))
    assert guard.refused() == {NON_FINITE: 0, ABOVE_CAP: 0, OUTLIER: 0}
    assert 2.0 <= guard.median() <= 3.0


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_gradient_is_refused_even_in_one_element(poison):
    guard = UpdateGuard()
    grads = grads_of_norm(2.0)
    grads[1][7] = poison
    assert not guard.admit(grads)
    assert guard.refused()[NON_FINITE] == 1


def test_1e30_is_refused_by_the_absolute_cap_from_the_first_step():
    guard = UpdateGuard()
    grads = [torch.full((1000,), 1e30)]  # finite entries whose float32 squares overflow: a huge norm, not a NaN
    assert not guard.admit(grads)
    assert guard.refused()[ABOVE_CAP] == 1


def test_outlier_is_refused_after_warmup_only():
    guard = UpdateGuard(factor=50)
    assert guard.admit(grads_of_norm(500.0))  # in warm-up only the absolute cap applies
    for norm in honest_norms(WARMUP + 5):
        assert guard.admit(grads_of_norm(norm))
    assert not guard.admit(grads_of_norm(200.0))  # > 50x the median (~2.5)
    assert guard.admit(grads_of_norm(100.0))  # < 50x: a spike the run may really have
    assert guard.refused()[OUTLIER] == 1


def test_the_outer_guard_judges_by_the_weights_so_histories_do_not_matter():
    """The local-steps outer guard: two guards with different pasts (a long-running peer's and a joiner's) take and
    refuse the same updates of the same weights, and updates that grow with the weights are never locked out (the
    median guard refuses for good once honest norms outgrow its median 50x, as bench_wan's diverging runs showed)."""
    veteran, joiner, median_guard = WeightRelativeGuard(), WeightRelativeGuard(), UpdateGuard()
    for norm in honest_norms(30):  # only the veteran and the median guard saw these
        weights = grads_of_norm(10 * norm)
        assert veteran.admit_for(grads_of_norm(norm), weights) and median_guard.admit(grads_of_norm(norm))
    for scale in (1, 10, 100, 1000):  # weights and updates growing together, as the diverging run's
        weights, update = grads_of_norm(10.0 * scale), grads_of_norm(2.0 * scale)
        assert veteran.admit_for(update, weights) and joiner.admit_for(update, weights)
    assert not median_guard.admit(grads_of_norm(2000.0))  # the median guard: 800x its median, refused
    weights = grads_of_norm(10.0)
    too_far = grads_of_norm(10.0 * WEIGHT_FACTOR * 1.01)
    assert not veteran.admit_for(too_far, weights) and not joiner.admit_for(too_far, weights)
    assert veteran.refused()[OUTLIER] == joiner.refused()[OUTLIER] == 1
    nan = grads_of_norm(1.0)
    nan[0][3] = float("nan")
    assert not joiner.admit_for(nan, weights) and joiner.refused()[NON_FINITE] == 1


def test_zero_norms_do_not_drag_the_median_down():
    guard = UpdateGuard()
    for _ in range(3 * WARMUP):
        assert guard.admit([torch.zeros(10)])  # hivemind's zero-gradient initialisation step, an empty round
    assert guard.median() is None
    assert guard.admit(grads_of_norm(3.0))


def test_counts_are_exact_under_concurrent_steps():
    guard = UpdateGuard()
    poisoned = [torch.full((10,), float("nan"))]

    def refuse_many():
        for _ in range(200):
            guard.admit(poisoned)

    threads = [threading.Thread(target=refuse_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert guard.refused()[NON_FINITE] == 800


def lamb_with_state() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4)
    optimizer = make_optimizer(model.parameters(), OptimConfig(max_grad_norm=1.0))
    for _ in range(3):  # real moments to keep
        model(torch.randn(8, 16)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def snapshot(model, optimizer) -> list[torch.Tensor]:
    moments = [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    return [tensor.detach().clone() for tensor in (*model.parameters(), *moments)]


def test_without_the_guard_one_nan_in_the_averaged_gradient_poisons_parameters_and_moments():
    """The issue, on hivemind's optimizer as it was (clip then LAMB): clipping by a NaN norm spreads the NaN."""
    model, optimizer = lamb_with_state()
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    next(model.parameters()).grad[0, 0] = float("nan")
    torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
    torch_optimizer.Lamb.step(optimizer)
    moments = [state[key] for state in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq")]
    assert all(not torch.isfinite(tensor).all() for tensor in (*model.parameters(), *moments))


@pytest.mark.parametrize("poison", [float("nan"), 1e30])
def test_refused_step_leaves_parameters_and_moments_untouched(poison):
    model, optimizer = lamb_with_state()
    before = snapshot(model, optimizer)
    steps_before = [state["step"] for state in optimizer.state.values()]
    for param in model.parameters():
        param.grad = torch.full_like(param, poison)
    optimizer.step()
    after = snapshot(model, optimizer)
    assert all(torch.equal(old, new) for old, new in zip(before, after))
    assert [state["step"] for state in optimizer.state.values()] == steps_before
    assert sum(optimizer.guard.refused().values()) == 1


def test_admitted_step_still_clips_and_moves_the_parameters():
    model, optimizer = lamb_with_state()
    before = snapshot(model, optimizer)
    for param in model.parameters():
        param.grad = torch.randn_like(param) * 100  # norm >> max_grad_norm 1.0: clipped, not refused (warm-up)
    optimizer.step()
    assert all(torch.isfinite(tensor).all() for tensor in snapshot(model, optimizer))
    assert not torch.equal(before[0], next(model.parameters()))
    assert sum(optimizer.guard.refused().values()) == 0


def honest_state(epoch: int = 7) -> tuple[dict, list[torch.Tensor]]:
    metadata = {"epoch": epoch, "group_bits": "", "optimizer_metadata": [{"type": "value", "value": 0.05}]}
    return metadata, [torch.randn(4, 4), torch.zeros(3), torch.arange(5)]


def test_honest_state_passes():
    metadata, tensors = honest_state()
    check_state(metadata, tensors, 100, StateLayout(StateLayout.slots(tensors)))


@pytest.mark.parametrize(
    ("metadata_change", "tensor_index", "match"),
    [
        ({}, 0, "tensor 0 .* NaN"),
        ({"epoch": 2**62}, None, "epoch 4611686018427387904 is outside"),
        ({"epoch": 101}, None, "outside \\[0, 100\\]"),
        ({"epoch": -1}, None, "outside"),
        ({"epoch": "7"}, None, "not an integer"),
        ({"epoch": True}, None, "not an integer"),
        ({"epoch": 7.0}, None, "not an integer"),
        ({"optimizer_metadata": [{"type": "value", "value": float("inf")}]}, None, "non-finite value inf"),
    ],
)
def test_poisoned_state_is_refused_with_the_reason(metadata_change, tensor_index, match):
    metadata, tensors = honest_state()
    layout = StateLayout(StateLayout.slots(tensors))  # the layout fits: the values are refused
    metadata.update(metadata_change)
    if tensor_index is not None:
        tensors[tensor_index][1, 2] = float("nan")
    with pytest.raises(StateRefused, match=match):
        check_state(metadata, tensors, 100, layout)


def test_metadata_that_is_no_dict_is_refused():
    with pytest.raises(StateRefused, match="not a dict"):
        check_state(["epoch", 3], [], MAX_EPOCH, StateLayout(()))


class SlowHolder:
    """The two attributes hivemind's _update_scheduler reads, and that loop (one step per epoch) itself."""

    _update_scheduler = TrainingStateAverager._update_scheduler

    def __init__(self, scheduler, local_epoch: int):
        self.scheduler, self.local_epoch = scheduler, local_epoch


class SchedulerHolder(FastSchedulerCatchUp, SlowHolder):
    """The same with the one-step catch-up in front, as in the project's state averagers."""


def fresh_scheduler():
    optim = OptimConfig(learning_rate=0.01, warmup_epochs=100, total_epochs=10_000)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=optim.learning_rate)
    return make_scheduler(optimizer, optim)


@pytest.mark.parametrize("epoch", [0, 1, 57, 3000, 20_000])
def test_scheduler_catch_up_in_one_step_matches_hiveminds_loop(epoch):
    fast, slow = SchedulerHolder(fresh_scheduler(), epoch), SlowHolder(fresh_scheduler(), epoch)
    fast._update_scheduler()
    slow._update_scheduler()
    for name in ("_step_count", "last_epoch"):
        assert getattr(fast.scheduler, name) == getattr(slow.scheduler, name)
    assert fast.scheduler.get_last_lr() == pytest.approx(slow.scheduler.get_last_lr())


def test_scheduler_catch_up_to_a_huge_epoch_is_instant():
    started = time.monotonic()
    holder = SchedulerHolder(fresh_scheduler(), 2**62)
    holder._update_scheduler()
    assert holder.scheduler.last_epoch == 2**62
    assert time.monotonic() - started < 1.0
