"""The pieces of local-steps (DiLoCo) training without a network: pseudo-gradients, the outer step, the settings."""

from __future__ import annotations

import pytest
import torch

from monitor.launcher import LocalSwarmConfig
from peer.local_steps import LocalStepsSwarm, make_inner_optimizer, set_schedule_epoch
from peer.outer_step import nesterov_outer_step, pseudo_gradients
from peer.swarm.config import OptimConfig
from peer.swarm.optimizer import make_scheduler
from peer.swarm.outer_state import copy_into
from peer.training_mode import TrainingMode


def test_pseudo_gradient_is_outer_minus_local_in_float32():
    outer = [torch.tensor([1.0, 2.0]), torch.tensor([[0.5]])]
    local = [torch.tensor([0.75, 2.5], dtype=torch.float16), torch.tensor([[0.0]], dtype=torch.bfloat16)]
    result = pseudo_gradients(outer, local)
    assert [tensor.dtype for tensor in result] == [torch.float32, torch.float32]
    assert result[0].tolist() == [0.25, -0.5] and result[1].tolist() == [[0.5]]


def test_outer_step_by_hand():
    # lr 0.7, momentum 0.9, gradient 0.5 twice. Step 1: buffer 0.5, update 0.5 + 0.9 * 0.5 = 0.95, weight
    # 1 - 0.7 * 0.95 = 0.335. Step 2: buffer 0.9 * 0.5 + 0.5 = 0.95, update 0.5 + 0.9 * 0.95 = 1.355,
    # weight 0.335 - 0.7 * 1.355 = -0.6135
    weight, buffer = torch.tensor([1.0]), torch.zeros(1)
    nesterov_outer_step([weight], [torch.tensor([0.5])], [buffer], 0.7, 0.9)
    assert weight.item() == pytest.approx(0.335) and buffer.item() == pytest.approx(0.5)
    nesterov_outer_step([weight], [torch.tensor([0.5])], [buffer], 0.7, 0.9)
    assert weight.item() == pytest.approx(-0.6135) and buffer.item() == pytest.approx(0.95)


def test_outer_step_matches_torch_nesterov_sgd():
    generator = torch.Generator().manual_seed(0)
    ours = [torch.randn(3, 4, generator=generator), torch.randn(5, generator=generator)]
    reference = [torch.nn.Parameter(tensor.clone()) for tensor in ours]
    buffers = [torch.zeros_like(tensor) for tensor in ours]
    sgd = torch.optim.SGD(reference, lr=0.7, momentum=0.9, nesterov=True)
    for _ in range(5):
        gradients = [torch.randn(tensor.shape, generator=generator) for tensor in ours]
        for parameter, gradient in zip(reference, gradients):
            parameter.grad = gradient.clone()
        sgd.step()
        nesterov_outer_step(ours, gradients, buffers, 0.7, 0.9)
    for mine, theirs in zip(ours, reference):
        torch.testing.assert_close(mine, theirs.detach())
    for mine, parameter in zip(buffers, reference):
        torch.testing.assert_close(mine, sgd.state[parameter]["momentum_buffer"])


def test_copy_into_refuses_another_shape_and_copies_nothing():
    targets = [torch.zeros(2), torch.zeros(3)]
    with pytest.raises(ValueError, match=r"shape \(4,\) cannot replace one of \(3,\)"):
        copy_into(targets, [torch.ones(2), torch.ones(4)])
    assert targets[0].tolist() == [0.0, 0.0] and targets[1].tolist() == [0.0, 0.0, 0.0]


def test_schedule_set_to_an_epoch_equals_stepping_to_it():
    optim = OptimConfig(learning_rate=0.01, warmup_epochs=10, total_epochs=100)
    stepped_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=optim.learning_rate)
    stepped = make_scheduler(stepped_optimizer, optim)
    jumped_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=optim.learning_rate)
    jumped = make_scheduler(jumped_optimizer, optim)
    for epoch in (1, 7, 30):
        while stepped.last_epoch < epoch:
            stepped_optimizer.step()
            stepped.step()
        set_schedule_epoch(jumped, epoch)
        assert jumped_optimizer.param_groups[0]["lr"] == pytest.approx(stepped_optimizer.param_groups[0]["lr"])
        assert jumped.get_last_lr() == pytest.approx(stepped.get_last_lr())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"local_steps": -1}, "local_steps must be zero or positive"),
        ({"outer_learning_rate": 0.0}, "outer_learning_rate must be positive"),
        ({"outer_momentum": 1.0}, r"outer_momentum must be in \[0, 1\)"),
        (
            {"local_steps": 4, "delay_optimizer_step": True, "delay_grad_averaging": True},
            "--local-steps takes no --delay-grad-averaging",
        ),
    ],
)
def test_bad_local_steps_settings_are_refused_by_name(settings, message):
    with pytest.raises(ValueError, match=message):
        OptimConfig(**settings)


def test_local_steps_default_to_the_synchronous_mode_and_diloco_outer_settings():
    optim = OptimConfig()
    assert (optim.local_steps, optim.outer_learning_rate, optim.outer_momentum) == (0, 0.7, 0.9)


def test_the_local_steps_mode_has_every_member_of_the_seam():
    members = {name for name in dir(TrainingMode) if not name.startswith("_")}
    assert members <= set(dir(LocalStepsSwarm)), members - set(dir(LocalStepsSwarm))


def test_albert_swarm_hands_local_steps_to_every_process():
    flags = LocalSwarmConfig(local_steps=3).optimizer_flags()  # given to the monitor and to each peer alike
    assert flags[flags.index("--local_steps") + 1] == "3"
    assert LocalSwarmConfig().optimizer_flags()[flags.index("--local_steps") + 1] == "0"
    with pytest.raises(ValueError, match="local_steps must be zero or positive, got -1"):
        LocalSwarmConfig(local_steps=-1)


@pytest.mark.parametrize(("name", "kind"), [("lamb", "ClippedLamb"), ("adamw", "ClippedAdamW")])
def test_the_inner_optimizer_is_chosen_by_flag_and_skips_a_non_finite_gradient(name, kind):
    weight = torch.nn.Parameter(torch.ones(3))
    inner = make_inner_optimizer([{"params": [weight]}], OptimConfig(inner_optimizer=name, learning_rate=0.1))
    assert type(inner).__name__ == kind
    weight.grad = torch.tensor([1.0, float("nan"), 0.0])
    inner.step()
    assert weight.tolist() == [1.0, 1.0, 1.0] and inner.guard.refused()["non_finite"] == 1
    weight.grad = torch.tensor([1.0, -1.0, 0.5])
    inner.step()
    assert weight[0] < 1.0 < weight[1]


def test_an_unknown_inner_optimizer_is_refused_by_name():
    with pytest.raises(ValueError, match="inner_optimizer must be lamb or adamw, got 'sgd'"):
        OptimConfig(inner_optimizer="sgd")
