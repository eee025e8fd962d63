"""The monitor's outer-state keeper (local-steps mode) on disk: a checkpoint it writes resumes exactly; a checkpoint
of the synchronous mode, a damaged momentum or a non-finite state is refused by name, and nothing non-finite is
written. Real DHTs and averager processes on 127.0.0.1 in this process's main thread (the swarm test,
test_monitor_local_steps.py, downloads and serves through them)."""

from __future__ import annotations

import hivemind
import pytest
import torch

from monitor.outer_state import OuterStateKeeper
from monitor.state import NonFiniteState, build_run_model
from peer.swarm.config import OptimConfig, SwarmConfig

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
OPTIM = OptimConfig(local_steps=2)


@pytest.fixture
def keepers():
    made = []

    def make(weights_from=None) -> OuterStateKeeper:
        dht = hivemind.DHT(start=True, host_maddrs=LOOPBACK)  # one each: an averager's prefix is one per DHT
        made.append(dht)
        run_model = build_run_model("tiny", None, weights_from=weights_from)
        made.append(OuterStateKeeper(dht, SwarmConfig(run_id="outer-keeper", host_maddrs=LOOPBACK), OPTIM, run_model))
        return made[-1]

    yield make
    for part in reversed(made):
        part.shutdown()


def trained(keeper: OuterStateKeeper, epoch: int) -> OuterStateKeeper:
    """The keeper holding a made-up outer state of ``epoch`` (as if downloaded)."""
    generator = torch.Generator().manual_seed(epoch)
    tensors = [torch.randn(t.shape, generator=generator) for t in (*keeper.outer, *keeper.momentum)]
    keeper._take(epoch, tensors)
    return keeper


def flat(tensors) -> torch.Tensor:
    return torch.cat([tensor.detach().flatten().float() for tensor in tensors])


@pytest.mark.timeout(120)
def test_a_written_checkpoint_resumes_the_outer_state_exactly(keepers, tmp_path):
    original = trained(keepers(), 5)
    original.write(tmp_path)
    state = torch.load(tmp_path / "training_state.pt", weights_only=True)
    assert (state["mode"], state["outer_step"], state["epoch"]) == ("local-steps", 5, 5)

    resumed = keepers(weights_from=tmp_path)
    assert resumed.epoch == -1 and resumed.resume(tmp_path) == 5
    torch.testing.assert_close(flat(resumed.outer), flat(original.outer), rtol=0, atol=0)
    torch.testing.assert_close(flat(resumed.momentum), flat(original.momentum), rtol=0, atol=0)
    assert resumed.averager.allow_state_sharing and resumed.averager.state_sharing_priority == 4.5


@pytest.mark.timeout(120)
def test_a_checkpoint_of_another_mode_or_a_damaged_momentum_is_refused_by_name(keepers, tmp_path):
    trained(keepers(), 3).write(tmp_path)
    path = tmp_path / "training_state.pt"
    state = torch.load(path, weights_only=True)
    keeper = keepers(weights_from=tmp_path)

    torch.save({"epoch": 3, "optimizer": {}, "scheduler": None}, path)  # what the synchronous mode writes
    with pytest.raises(ValueError, match=r"training_state\.pt is not a training state of this run's mode: it lacks"):
        keeper.resume(tmp_path)
    torch.save({**state, "outer_momentum": state["outer_momentum"][:-1]}, path)
    with pytest.raises(ValueError, match="its outer momentum does not fit"):
        keeper.resume(tmp_path)
    torch.save({**state, "outer_momentum": [torch.full_like(t, float("nan")) for t in state["outer_momentum"]]}, path)
    with pytest.raises(NonFiniteState, match="holds NaN or infinite values"):
        keeper.resume(tmp_path)
    assert keeper.epoch == -1 and not keeper.averager.allow_state_sharing  # nothing taken, nothing served


@pytest.mark.timeout(120)
def test_a_non_finite_outer_state_is_not_written(keepers, tmp_path):
    keeper = trained(keepers(), 4)
    keeper.outer[0][0] = float("inf")
    with pytest.raises(NonFiniteState, match="not writing a checkpoint of outer step 4"):
        keeper.write(tmp_path)
    assert not any(tmp_path.iterdir())
