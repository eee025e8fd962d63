"""A local-steps peer's backup holds everything to resume its trajectory: outer weights and momentum, the inner
optimizer and its schedule, the epoch; a backup of the synchronous mode is refused by name. Real DHTs and averagers
on 127.0.0.1 in this process (its main thread), one peer each: its rounds find no partner and it steps alone."""

from __future__ import annotations

import hivemind
import pytest
import torch

from peer.backup import Backups
from peer.local_steps import build_local_steps
from peer.swarm.config import OptimConfig, SwarmConfig

pytestmark = [pytest.mark.slow]
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
# one outer step per 8 samples; a lone peer's round gives up after the averaging timeout and steps alone
OPTIM = OptimConfig(
    local_steps=1, target_batch_size=8, matchmaking_time=1, averaging_timeout=3, learning_rate=0.01, warmup_epochs=2
)


def small_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def train_steps(model: torch.nn.Module, mode, steps: int) -> None:
    for _ in range(steps):
        model(torch.randn(4, 6)).pow(2).sum().backward()
        mode.step(4)
        mode.zero_grad()


@pytest.fixture
def started():
    dhts, modes = [], []

    def start(run_id: str, model: torch.nn.Module):
        dhts.append(hivemind.DHT(start=True, host_maddrs=LOOPBACK))
        modes.append(build_local_steps(dhts[-1], model, SwarmConfig(run_id=run_id, host_maddrs=LOOPBACK), OPTIM))
        return modes[-1]

    yield start
    for mode in modes:
        mode.shutdown()
    for dht in dhts:
        dht.shutdown()


def flat(tensors) -> torch.Tensor:
    return torch.cat([tensor.detach().flatten().float() for tensor in tensors])


@pytest.mark.timeout(120)
def test_a_backup_restores_outer_state_inner_optimizer_and_epoch(started, tmp_path):
    model = small_model(0)
    mode = started("ls-state-a", model)
    train_steps(model, mode, 5)  # two outer steps alone, then one inner step into the third round
    assert mode.epoch == 2 and flat(mode.momentum).norm() > 0
    assert not torch.equal(flat(model.parameters()), flat(mode.outer))  # mid-round: local weights moved on
    backups = Backups(tmp_path, keep=3, model_hash="test")
    backups.save(model, mode)

    restored_model = small_model(1)
    restored = started("ls-state-b", restored_model)
    assert backups.restore(2, restored_model, restored)
    assert restored.epoch == 2
    torch.testing.assert_close(flat(restored.outer), flat(mode.outer), rtol=0, atol=0)
    torch.testing.assert_close(flat(restored.momentum), flat(mode.momentum), rtol=0, atol=0)
    torch.testing.assert_close(flat(restored_model.parameters()), flat(model.parameters()), rtol=0, atol=0)
    assert restored.inner.param_groups[0]["lr"] == mode.inner.param_groups[0]["lr"]
    mine, theirs = mode.inner.state_dict()["state"], restored.inner.state_dict()["state"]
    assert mine.keys() == theirs.keys() and mine
    for index in mine:
        torch.testing.assert_close(theirs[index]["exp_avg"], mine[index]["exp_avg"], rtol=0, atol=0)
    # and both go on identically from there: the same batch gives the same inner step
    batch = torch.randn(4, 6)
    for each_model, each_mode in ((model, mode), (restored_model, restored)):
        each_model(batch).pow(2).sum().backward()
        each_mode.inner.step()
    torch.testing.assert_close(flat(restored_model.parameters()), flat(model.parameters()), rtol=0, atol=0)


@pytest.mark.timeout(60)
def test_a_synchronous_backup_is_refused_by_name(started):
    model = small_model(0)
    mode = started("ls-state-c", model)
    before = flat(mode.outer).clone()
    with pytest.raises(ValueError, match=r"no local-steps state \(written in synchronous mode\?\)"):
        mode.load_state_dict({"epoch": 7, "optimizer": {}, "scheduler": {}})
    assert mode.epoch == 0 and torch.equal(flat(mode.outer), before)
