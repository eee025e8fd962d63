"""The state a peer serves is one epoch's, and loaded optimizer statistics stay the ones its averager averages."""

from __future__ import annotations

import contextlib
import copy
import threading
from functools import partial

import hivemind
import pytest
import torch
import torch_optimizer
from hivemind.optim.state_averager import TrainingStateAverager

from peer.hivemind_gaps.averagers import ConsistentTrainingStateAverager

STEP_PAUSE = 8.0  # seconds the step waits halfway for the test's snapshot (the consistent averager makes it wait)


class PausingSGD(torch.optim.SGD):
    """SGD that stops after updating its first parameter until released (or STEP_PAUSE), like a long step."""

    def __init__(self, params, halfway: threading.Event, resume: threading.Event, **kwargs):
        super().__init__(params, **kwargs)
        self.halfway, self.resume = halfway, resume

    def step(self, closure=None):
        parameters = [parameter for group in self.param_groups for parameter in group["params"]]
        for index, parameter in enumerate(parameters):
            parameter.data.add_(parameter.grad, alpha=-self.param_groups[0]["lr"])
            if index == 0:
                self.halfway.set()
                self.resume.wait(timeout=STEP_PAUSE)


@pytest.fixture
def dht():
    # one per test: in two fresh-clone runs on the development machine the module's shared DHT process died (exit
    # code 1) after the third test, and each later test waited for an averager that could not start until timeout
    node = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    yield node
    node.shutdown()


def snapshot_during_step(averager_class, dht) -> tuple[int, list[float]]:
    """Start an optimizer step (one epoch) in a thread, take the served state mid-step; its epoch and parameters."""
    parameters = [torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]
    halfway, resume = threading.Event(), threading.Event()
    averager = averager_class(
        dht=dht,
        params=parameters,
        optimizer=partial(PausingSGD, lr=1.0, halfway=halfway, resume=resume),
        prefix=f"consistency-{averager_class.__name__}",
        initialize_optimizer=False,
        start=True,
    )
    try:
        for parameter in parameters:
            parameter.grad = torch.ones_like(parameter)
        stepping = threading.Thread(target=averager.step, kwargs={"increment_epoch": True, "optimizer_step": True})
        stepping.start()
        assert halfway.wait(timeout=30), "the optimizer step never began"
        metadata, tensors, _ = averager.get_current_state()  # what a joiner would download now
        # read at once: on CPU the served tensors are the live parameters, which hivemind serialises right away
        served = metadata["epoch"], [tensor[0].item() for tensor in tensors[: len(parameters)]]
        resume.set()
        stepping.join(timeout=30)
        return served
    finally:
        averager.shutdown()


@pytest.mark.timeout(120)
def test_hivemind_alone_serves_a_torn_state(dht):
    """The bug this project guards against, shown on plain hivemind: parameters of two epochs, one label."""
    epoch, values = snapshot_during_step(TrainingStateAverager, dht)
    assert len(set(values)) > 1, (epoch, values)


@pytest.mark.timeout(120)
def test_served_state_belongs_to_one_epoch(dht):
    epoch, values = snapshot_during_step(ConsistentTrainingStateAverager, dht)
    assert (epoch, values) == (1, [-1.0, -1.0, -1.0])


def offloaded_lamb_averager(averager_class, dht, prefix: str):
    """A state averager set up like a peer's: offloaded LAMB whose first moments are averaged (in place)."""
    return averager_class(
        dht=dht,
        params=[torch.nn.Parameter(torch.ones(2)) for _ in range(2)],
        optimizer=partial(torch_optimizer.Lamb, lr=0.1),
        prefix=prefix,
        offload_optimizer=True,
        custom_gradients=True,
        average_opt_statistics=("exp_avg",),
        start=True,
    )


def averaged_statistics(averager) -> list[float]:
    """The first moments the averager would average with peers now."""
    with averager.get_tensors() as averaged:
        return [value for tensor in averaged[2:] for value in tensor.tolist()]


def load_moments_of_seven(averager) -> None:
    """What a backup restore does: optimizer.load_state_dict of a state whose first moments are 7.0."""
    state = copy.deepcopy(averager.optimizer.state_dict())
    for entry in state["state"].values():
        entry["exp_avg"] = torch.full_like(entry["exp_avg"], 7.0)
    with getattr(averager, "statistics_kept_in_place", contextlib.nullcontext)():
        averager.optimizer.load_state_dict(state)


@pytest.mark.timeout(120)
def test_hivemind_alone_averages_statistics_the_optimizer_no_longer_uses(dht):
    averager = offloaded_lamb_averager(TrainingStateAverager, dht, "statistics-plain")
    try:
        load_moments_of_seven(averager)
        assert averaged_statistics(averager) != [7.0] * 4
    finally:
        averager.shutdown()


@pytest.mark.timeout(120)
def test_loaded_statistics_are_the_averaged_ones(dht):
    averager = offloaded_lamb_averager(ConsistentTrainingStateAverager, dht, "statistics-restore")
    try:
        load_moments_of_seven(averager)
        assert averaged_statistics(averager) == [7.0] * 4
    finally:
        averager.shutdown()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("joiner_class", [TrainingStateAverager, ConsistentTrainingStateAverager])
def test_a_joiner_averages_the_moments_it_downloaded(dht, joiner_class):
    """A joiner (its own DHT node) downloads a state whose moments are 7.0; only ours then averages those."""
    prefix = f"statistics-download-{joiner_class.__name__}"
    source = offloaded_lamb_averager(ConsistentTrainingStateAverager, dht, prefix)
    joiner_dht = hivemind.DHT(
        start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=[str(a) for a in dht.get_visible_maddrs()]
    )
    joiner = offloaded_lamb_averager(joiner_class, joiner_dht, prefix)
    try:
        load_moments_of_seven(source)
        source.local_epoch = 5  # newer than the joiner's, or it refuses the state
        joiner.load_state_from_peers(timeout=30)
        assert joiner.local_epoch == 5, "the joiner did not download the state"
        downloaded = [
            value
            for parameter in joiner.optimizer.param_groups[0]["params"]
            for value in joiner.optimizer.state[parameter]["exp_avg"].tolist()
        ]
        assert downloaded == [7.0] * 4
        assert (averaged_statistics(joiner) == [7.0] * 4) == (joiner_class is ConsistentTrainingStateAverager)
    finally:
        joiner.shutdown()
        joiner_dht.shutdown()
        source.shutdown()
