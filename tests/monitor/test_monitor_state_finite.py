"""The monitor's state keeper never checkpoints or resumes a non-finite state (a real DHT, averager and store)."""

from __future__ import annotations

import hivemind
import pytest
import safetensors.torch
import torch

from monitor.checkpoint import CheckpointStore, write_manifest
from monitor.history import History
from monitor.state import NonFiniteState, StateKeeper, build_run_model
from peer.swarm.config import OptimConfig, SwarmConfig


@pytest.fixture(scope="module")
def keeper():
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    keeper = StateKeeper(dht, SwarmConfig(run_id="finite-test"), OptimConfig(), build_run_model("tiny", None))
    keeper.has_state = True  # as after a download: the keeper would share and checkpoint it
    yield keeper
    keeper.shutdown()
    dht.shutdown()


@pytest.fixture
def store(tmp_path):
    return CheckpointStore(tmp_path / "ckpt", History(tmp_path / "h.sqlite"), keep=1)


def poison(tensor: torch.Tensor):
    """Sets one element to NaN; returns a function that restores it."""
    saved = tensor.view(-1)[0].item()
    with torch.no_grad():
        tensor.view(-1)[0] = float("nan")

    def restore():
        with torch.no_grad():
            tensor.view(-1)[0] = saved

    return restore


def test_finite_state_is_checkpointed_and_resumable(keeper, store):
    assert keeper.state_problem() is None
    keeper.averager.local_epoch = 3
    entry = store.write(3, keeper.write)
    keeper.averager.local_epoch = 0
    assert keeper.resume(store.directory(entry)) == 3


@pytest.mark.parametrize("where", ["parameter", "optimizer statistic"])
def test_non_finite_state_is_never_written_and_the_good_checkpoint_stays(keeper, store, where):
    good = store.write(3, keeper.write)
    if where == "parameter":
        restore = poison(next(keeper.run_model.model.parameters()))
    else:
        restore = poison(next(iter(keeper.averager.optimizer.state.values()))["exp_avg"])
    try:
        assert where.split()[-1] in keeper.state_problem()
        with pytest.raises(NonFiniteState, match="not writing a checkpoint of epoch"):
            store.write(4, keeper.write)
    finally:
        restore()
    assert store.list() == [good]
    assert not list(store.root.glob(".tmp-*"))


def test_a_non_finite_checkpoint_is_not_resumed(keeper, store):
    """A checkpoint whose weights were replaced by NaN and its manifest rewritten to match (it passes the sums)."""
    directory = store.directory(store.write(5, keeper.write))
    weights = directory / "model.safetensors"
    tensors = safetensors.torch.load_file(weights)
    next(iter(tensors.values())).view(-1)[0] = float("nan")
    safetensors.torch.save_file(tensors, weights, metadata={"format": "pt"})
    write_manifest(directory, epoch=5)
    with pytest.raises(NonFiniteState, match="cannot be resumed: the model parameters hold NaN"):
        keeper.resume(directory)
